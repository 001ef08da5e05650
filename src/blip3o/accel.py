"""Fast paths for inference on a GPU. All opt-in; each falls back to the plain eager code and gives its answer.

    DiTSampler         the whole fixed-shape sampling loop (condition K/V once, every Euler step with both
                       CFG branches) replayed as ONE CUDA graph: a 30-step sample is 1 launch, not ~10,000
    DecoderLoopGraph   the SDXL decoder's whole sampling loop (50 UNet calls on both CFG branches, the
                       guidance, the scheduler's steps) as ONE CUDA graph, for Euler schedules
    UNetStepGraph      the SDXL decoder's UNet call (both CFG branches) as one CUDA graph per shape (the
                       other schedulers)
    enable_static_cache  transformers' static KV cache (+ its compiled decode step) for `answer`/`chat`
    accelerate         all of the above plus fused DiT projections and a channels-last UNet, on a Blip3o

Why graphs: at batch 1 the 1.4B DiT is launch-bound (~400 small kernels a step); replaying a captured
graph removes the CPU from the loop, leaving the weight-bandwidth floor. A graph reads its input and
weight memory by address, so each captured graph owns static input buffers (a call copies its inputs in,
replays, and clones the output) and is recaptured whenever a weight moves or changes (see `fingerprint`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from blip3o.flow import Generators, call_times, draw_noise, fresh_noise, sample, time_grid

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from blip3o.backbone import Backbone
    from blip3o.decoder.sdxl_unet import SdxlUnetDecoder
    from blip3o.model import Blip3o


# ---------------------------------------------------------------------------- graph capture


class Graph:
    """A captured computation: `inputs` are static buffers to copy into, `replay()` refreshes `out`."""

    def __init__(self, fn: Callable[[], torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> None:
        self.inputs = inputs
        self.fn = fn
        self.out = self.capture()

    def capture(self) -> torch.Tensor:
        return self.fn()

    def replay(self) -> None:
        self.out.copy_(self.fn())

    def __call__(self, *values: torch.Tensor) -> torch.Tensor:
        for buffer, value in zip(self.inputs, values, strict=True):
            buffer.copy_(value)
        self.replay()
        return self.out.clone()  # the next replay overwrites `out`


class EagerGraph(Graph):
    """Same interface, no CUDA: replay re-runs the function into the same output buffer. Lets the
    static-buffer and recapture logic run (and be tested) on a CPU."""


class CudaGraph(Graph):
    """torch.cuda.CUDAGraph over `fn`, after warm-up runs on a side stream (as PyTorch requires: lazy
    initialisation, cuBLAS workspaces, compiled kernels all happen before capture)."""

    warmup: int = 2

    def capture(self) -> torch.Tensor:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self.fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            out = self.fn()
        return out

    def replay(self) -> None:
        self.graph.replay()


class LoopCudaGraph(CudaGraph):
    """A CUDA graph of a whole sampling loop: one warm-up run already runs each kernel once per step."""

    warmup = 1


GraphFactory = Callable[[Callable[[], torch.Tensor], tuple[torch.Tensor, ...]], Graph]


def default_graph(device: torch.device, *, loop: bool = False) -> GraphFactory | None:
    """CUDA graphs on CUDA devices (`loop`: of a whole sampling loop); elsewhere none (eager)."""
    if device.type != "cuda":
        return None
    return LoopCudaGraph if loop else CudaGraph


def fingerprint(module: nn.Module) -> tuple:
    """Where each weight lives and how often it was written: a captured graph is valid while this holds."""
    return tuple((p.data_ptr(), p._version) for p in module.parameters())


# ---------------------------------------------------------------------------- the DiT loop


@dataclass(frozen=True)
class _LoopKey:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    times: tuple[float, ...]
    guidance: float
    sampler: str
    eta: float


class DiTSampler:
    """`Blip3o.sample_tokens` with the whole loop captured as one CUDA graph per (shape, settings).

    Same signature and the same random draws as `sample_tokens` (noise from the CPU generator); on a
    CPU, or with `cuda_graph=False`, it runs exactly `sample_tokens`' eager loop. `compile=True` also
    runs the DiT velocity through `torch.compile` (kernels fused, then captured in the graph).
    `graph` overrides how loops are captured (tests pass `EagerGraph` to run the capture logic on a CPU).
    """

    def __init__(self, model: Blip3o, *, cuda_graph: bool = True, compile: bool = False,
                 graph: GraphFactory | None = None) -> None:
        self.model, self.cuda_graph, self.graph = model, cuda_graph, graph
        dit = model.dit
        self.velocity = torch.compile(dit.velocity, dynamic=False) if compile else dit.velocity
        self._graphs: dict[_LoopKey, Graph] = {}
        self._fingerprint: tuple | None = None

    def loop(self, cond: torch.Tensor, x_1: torch.Tensor, times: list[float], guidance: float,
             method: str, fresh: torch.Tensor | None = None) -> torch.Tensor:
        """The eager sampling loop of `sample_tokens`: cond (B, L, H), noise x_1 (B, N, C) -> tokens
        (`fresh`: the stochastic sampler's noise of every step)."""
        dit = self.model.dit
        velocity = dit.sampling_velocity(cond, guidance, self.velocity, times=call_times(times, method))
        return dit.to_tokens(sample(velocity, x_1, times, method, eta=self.model.config.eta, fresh=fresh))

    @torch.no_grad()
    def __call__(self, cond: torch.Tensor, *, steps: int | None = None, guidance: float | None = None,
                 generator: Generators = None, sampler: str | None = None,
                 time_shift: float | None = None) -> torch.Tensor:
        """cond (B, L, H) -> CLIP tokens (B, N, C); see `Blip3o.sample_tokens`."""
        cfg, dit = self.model.config, self.model.dit
        steps, guidance = steps or cfg.steps, cfg.guidance if guidance is None else guidance
        method = sampler or cfg.sampler
        x_1 = draw_noise((cond.shape[0], dit.config.num_tokens, dit.config.in_channels), generator, cond.device,
                         cond.dtype)
        times = time_grid(steps, time_shift or cfg.time_shift)
        fresh = fresh_noise(method, x_1, len(times) - 1, generator)
        factory = self.graph or (default_graph(cond.device, loop=True) if self.cuda_graph else None)
        if factory is None:
            return self.loop(cond, x_1, times, guidance, method, fresh)
        key = _LoopKey(tuple(cond.shape), cond.dtype, cond.device, tuple(times), float(guidance), method,
                       float(cfg.eta))
        inputs = (cond, x_1) if fresh is None else (cond, x_1, fresh)
        return self._graph_for(key, factory, inputs)(*inputs)

    def _graph_for(self, key: _LoopKey, factory: GraphFactory, inputs: tuple[torch.Tensor, ...]) -> Graph:
        now = fingerprint(self.model.dit)
        if now != self._fingerprint:  # weights moved or changed: every captured graph reads stale memory
            self._graphs.clear()
            self._fingerprint = now
        if key not in self._graphs:
            static = tuple(x.clone() for x in inputs)  # cond, x_1 (and the stochastic sampler's noise)
            self._graphs[key] = factory(
                lambda: self.loop(static[0], static[1], list(key.times), key.guidance, key.sampler, *static[2:]),
                static)
            self._fingerprint = fingerprint(self.model.dit)  # fused weights were built during capture
        return self._graphs[key]

    def clear(self) -> None:
        """Drop the captured graphs (and their memory pools)."""
        self._graphs.clear()


# ---------------------------------------------------------------------------- the decoder's UNet


class UNetStepGraph:
    """The decoder's `predict` (one UNet call on both CFG branches) as a CUDA graph per input shape.

    Installed as `decoder.fast_predict`. The conditioning (token mean, time ids) is built eagerly and
    copied into static buffers: it holds a host-to-device copy that a graph cannot capture.
    """

    def __init__(self, decoder: SdxlUnetDecoder, *, compile: bool = False, graph: GraphFactory | None = None) -> None:
        self.decoder, self.graph = decoder, graph
        self.unet = torch.compile(decoder.unet, dynamic=False) if compile else decoder.unet
        self._graphs: dict[tuple, Graph] = {}
        self._fingerprint: tuple | None = None

    def eager(self, x, t, hidden, text_embeds, time_ids) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, tokens: torch.Tensor, size: int) -> torch.Tensor:
        cond = self.decoder.conditioning(tokens, size)
        added = cond["added_cond_kwargs"]
        t = torch.as_tensor(t, device=x.device)
        inputs = (x, t, cond["encoder_hidden_states"], added["text_embeds"], added["time_ids"])
        factory = self.graph or default_graph(x.device)
        if factory is None:
            return self.eager(*inputs)
        now = fingerprint(self.decoder.unet)
        if now != self._fingerprint:
            self._graphs.clear()
            self._fingerprint = now
        key = tuple((tuple(v.shape), v.dtype, v.device, v.is_contiguous()) for v in inputs) + (size,)
        if key not in self._graphs:
            static = tuple(v.clone() for v in inputs)  # clone keeps the memory format (channels-last)
            self._graphs[key] = factory(lambda: self.eager(*static), static)
        return self._graphs[key](*inputs)

    def clear(self) -> None:
        self._graphs.clear()


# Schedulers whose whole loop a graph captures: `scale_model_input` and `step` launch device work only, once
# the step index starts from `set_begin_index(0)` (no timestep lookup, a host sync) and the schedule lives on
# the CPU (diffusers keeps Euler's sigmas there: each step's are scalars fixed at capture); they draw no noise.
LOOP_SCHEDULERS = frozenset({"EulerDiscreteScheduler"})


class DecoderLoopGraph:
    """The decoder's `denoise` (every UNet call on both CFG branches, the guidance and the scheduler's steps)
    as ONE CUDA graph per (shapes, steps, guidance, size): a 50-step decode is one launch, no host work
    between the UNet calls.

    Installed as `decoder.fast_loop` (by `accelerate`); `decode` uses it for the schedulers it `supports`.
    The conditioning (token mean, time ids: a host-to-device copy) and the device timesteps are made
    eagerly and read from static buffers. On a CPU, without a graph factory, it runs the eager loop.
    """

    def __init__(self, decoder: SdxlUnetDecoder, *, compile: bool = False, graph: GraphFactory | None = None) -> None:
        self.decoder, self.graph = decoder, graph
        self.unet = torch.compile(decoder.unet, dynamic=False) if compile else decoder.unet
        self._graphs: dict[tuple, Graph] = {}
        self._fingerprint: tuple | None = None

    @staticmethod
    def supports(scheduler_config: dict[str, Any]) -> bool:
        return scheduler_config.get("_class_name") in LOOP_SCHEDULERS

    def __call__(self, latents: torch.Tensor, cond: torch.Tensor, scheduler: SchedulerMixin, guidance: float,
                 size: int) -> torch.Tensor:
        """Starting latents (B, 4, h, w) scaled by the scheduler's init sigma, cond (B or 2B, 64, C), a fresh
        scheduler with its timesteps set on the latents' device -> the loop's last latents; see
        `SdxlUnetDecoder.denoise`."""
        decoder = self.decoder
        factory = self.graph or default_graph(latents.device, loop=True)
        if factory is None:
            return decoder.denoise(latents, cond, scheduler, guidance, size)
        now = fingerprint(decoder.unet)
        if now != self._fingerprint:  # weights moved or changed: every captured graph reads stale memory
            self._graphs.clear()
            self._fingerprint = now
        conditioning = decoder.conditioning(cond, size)
        added = conditioning["added_cond_kwargs"]
        inputs = (latents, cond, added["text_embeds"], added["time_ids"])
        steps = len(scheduler.timesteps)
        key = tuple((tuple(v.shape), v.dtype, v.device) for v in inputs) + (steps, float(guidance), size)
        if key not in self._graphs:
            static = tuple(v.clone() for v in inputs)
            # the timesteps the UNet reads, static on the device
            self._graphs[key] = self._capture(factory, static, scheduler.timesteps.clone(), guidance, size)
        return self._graphs[key](*inputs)

    def _capture(self, factory: GraphFactory, static: tuple[torch.Tensor, ...], timesteps: torch.Tensor,
                 guidance: float, size: int) -> Graph:
        from blip3o.decoder.sdxl_unet import make_scheduler

        decoder, (latents, cond, text_embeds, time_ids) = self.decoder, static
        added = {"text_embeds": text_embeds, "time_ids": time_ids}

        def unet(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            if decoder.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.unet(x, timesteps[i], encoder_hidden_states=cond, added_cond_kwargs=added,
                             return_dict=False)[0]

        def loop() -> torch.Tensor:
            scheduler = make_scheduler(decoder.scheduler_config)
            scheduler.set_timesteps(len(timesteps))  # on the CPU: the schedule's scalars, fixed in the captured kernels
            scheduler.set_begin_index(0)
            return decoder.denoise(latents, cond, scheduler, guidance, size, unet)

        return factory(loop, static)

    def clear(self) -> None:
        """Drop the captured graphs (and their memory pools)."""
        self._graphs.clear()


# ---------------------------------------------------------------------------- understanding


def enable_static_cache(backbone: Backbone, *, compile: bool = True, mode: str = "reduce-overhead") -> None:
    """Make `answer`/`chat` decode with transformers' static KV cache; with `compile`, transformers then
    compiles the one-token decode step (mode "reduce-overhead" = CUDA graphs) on CUDA devices.

    Fixed-size cache tensors are what lets the decode step be captured; on a CPU the static cache runs
    uncompiled (transformers only auto-compiles on accelerators).
    """
    from transformers import CompileConfig

    config = backbone.model.generation_config
    config.cache_implementation = "static"
    config.disable_compile = not compile
    if compile:
        config.compile_config = CompileConfig(fullgraph=False, dynamic=False, mode=mode)


def disable_static_cache(backbone: Backbone) -> None:
    config = backbone.model.generation_config
    config.cache_implementation = None
    config.disable_compile = True


# ---------------------------------------------------------------------------- all at once


@dataclass
class AccelOptions:
    dit_graph: bool = True  # the whole DiT sampling loop as one CUDA graph
    # one GEMM for the DiT's q/k/v/q2 and SwiGLU inputs, on CUDA devices (fewer launches); on CPUs one wide GEMM
    # measured no faster (Xeon) or slower (EPYC: 28-33 ms against 20-22 ms for the four projections), so not there
    fuse_projections: bool = True
    channels_last: bool = True  # the decoder's conv weights and activations in NHWC (cuDNN's and oneDNN's fast layout)
    unet_graph: bool = True  # the UNet's CFG step as a CUDA graph
    decoder_loop_graph: bool = True  # the decoder's whole loop as ONE CUDA graph (Euler; others: unet_graph)
    static_cache: bool = True  # static KV cache for `answer`/`chat`
    compile: bool = False  # torch.compile the DiT velocity, the UNet and the decode step (minutes to warm up)


def accelerate(model: Blip3o, options: AccelOptions | None = None, **overrides: Any) -> Blip3o:
    """Apply the fast paths to `model` in place; returns it. Safe on a CPU: graphs and compilation only
    take effect on CUDA devices (compile is skipped elsewhere with a warning: CPU compile takes minutes)."""
    from blip3o.decoder.sdxl_unet import SdxlUnetDecoder

    options = options or AccelOptions(**overrides)
    compile = options.compile
    if compile and model.device.type != "cuda":
        warnings.warn("accelerate(compile=True) applies on CUDA devices only; compiling skipped", stacklevel=2)
        compile = False
    model.dit.fuse_projections(options.fuse_projections and model.device.type == "cuda")
    model.fast_sampler = DiTSampler(model, cuda_graph=options.dit_graph, compile=compile)
    if hasattr(model.decoder, "set_channels_last"):
        model.decoder.set_channels_last(options.channels_last)
    if isinstance(model.decoder, SdxlUnetDecoder):
        model.decoder.fast_predict = UNetStepGraph(model.decoder, compile=compile) if options.unet_graph else None
        model.decoder.fast_loop = DecoderLoopGraph(model.decoder, compile=compile) \
            if options.decoder_loop_graph else None
    if options.static_cache:
        enable_static_cache(model.backbone, compile=compile)
    return model
