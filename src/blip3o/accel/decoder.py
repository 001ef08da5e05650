"""The SDXL decoder's UNet call and whole sampling loop as CUDA graphs.

`SdxlUnetDecoder` samples through two replaceable callables; these are the faster ones (`accelerate` installs
them), each computing what the eager one does:

    decoder.unet_call = UNetStepGraph(decoder)        a `UNetCall`: the UNet on the CFG batch, one graph a shape
    decoder.sampling_loop = DecoderLoopGraph(decoder)  a `SamplingLoop`: `decoder.denoise` captured whole
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from blip3o.accel.graphs import CallFactory, StaticCall, default_graph, fingerprint

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from blip3o.decoder.sdxl_unet import SdxlUnetDecoder


class UNetStepGraph:
    """The decoder's `unet_output` (one UNet call on both CFG branches) as a CUDA graph per input shape.

    A `UNetCall`, for `decoder.unet_call`. The conditioning (token mean, time ids) is built eagerly and
    copied into static buffers: it holds a host-to-device copy that a graph cannot capture. Without a
    graph factory on a CPU it calls the UNet eagerly.
    """

    def __init__(self, decoder: SdxlUnetDecoder, *, compile: bool = False, graph: CallFactory | None = None) -> None:
        self.decoder, self.graph = decoder, graph
        self.unet = torch.compile(decoder.unet, dynamic=False) if compile else decoder.unet
        self._graphs: dict[tuple, StaticCall] = {}
        self._fingerprint: tuple | None = None

    def eager(self, x, t, hidden, text_embeds, time_ids) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float, tokens: torch.Tensor) -> torch.Tensor:
        """Latents x (N, 4, h, w), timestep t, tokens (N, 64, C) -> the UNet's output (N, 4, h, w)."""
        cond = self.decoder.unet_conditioning(tokens, *self.decoder.output_size(x))
        x = self.decoder.unet_layout(x)
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
        # the latents' shape sets the output size, so the time ids too
        key = tuple((tuple(v.shape), v.dtype, v.device, v.is_contiguous()) for v in inputs)
        if key not in self._graphs:
            static = tuple(v.clone() for v in inputs)  # clone keeps the memory format (channels-last)
            self._graphs[key] = factory(lambda: self.eager(*static), static)
        return self._graphs[key](*inputs)

    def clear(self) -> None:
        """Drop the captured graphs (and their memory pools)."""
        self._graphs.clear()


# Schedulers whose whole loop a graph captures: `scale_model_input` and `step` launch device work only, once
# the step index starts from `set_begin_index(0)` (no timestep lookup, a host sync) and the schedule lives on
# the CPU (diffusers keeps Euler's sigmas there: each step's are scalars fixed at capture); they draw no noise.
LOOP_SCHEDULERS = frozenset({"EulerDiscreteScheduler"})


class DecoderLoopGraph:
    """The decoder's `denoise` (every UNet call on both CFG branches, the guidance and the scheduler's steps)
    as ONE CUDA graph per (shapes, steps, guidance): a 50-step decode is one launch, no host work
    between the UNet calls.

    A `SamplingLoop`, for `decoder.sampling_loop`. The captured function is `decoder.denoise` itself, given
    a UNet step that reads the conditioning (token mean, time ids: a host-to-device copy) and the device
    timesteps from static buffers made eagerly. For the schedulers it does not `support`, and on a CPU
    without a graph factory, it runs `decoder.denoise` eagerly.
    """

    def __init__(self, decoder: SdxlUnetDecoder, *, compile: bool = False, graph: CallFactory | None = None) -> None:
        self.decoder, self.graph = decoder, graph
        self.unet = torch.compile(decoder.unet, dynamic=False) if compile else decoder.unet
        self._graphs: dict[tuple, StaticCall] = {}
        self._fingerprint: tuple | None = None

    @staticmethod
    def supports(scheduler_config: dict[str, Any]) -> bool:
        """Whether a graph captures the loop of the scheduler this config builds (see LOOP_SCHEDULERS)."""
        return scheduler_config.get("_class_name") in LOOP_SCHEDULERS

    def __call__(self, latents: torch.Tensor, cond: torch.Tensor, scheduler: SchedulerMixin, guidance: float,
                 **step_kwargs: Any) -> torch.Tensor:
        """Starting latents (B, 4, h, w) scaled by the scheduler's init sigma, cond (B or 2B, 64, C), a fresh
        scheduler with its timesteps set on the latents' device -> the loop's last latents; see
        `SdxlUnetDecoder.denoise`. `step_kwargs` reach `scheduler.step` only in the eager loop: the
        schedulers a graph captures draw no noise."""
        decoder = self.decoder
        factory = self.graph or default_graph(latents.device, loop=True)
        if factory is None or not self.supports(decoder.scheduler_config):
            return decoder.denoise(latents, cond, scheduler, guidance, **step_kwargs)
        now = fingerprint(decoder.unet)
        if now != self._fingerprint:  # weights moved or changed: every captured graph reads stale memory
            self._graphs.clear()
            self._fingerprint = now
        conditioning = decoder.unet_conditioning(cond, *decoder.output_size(latents))
        added = conditioning["added_cond_kwargs"]
        inputs = (latents, cond, added["text_embeds"], added["time_ids"])
        steps = len(scheduler.timesteps)
        key = tuple((tuple(v.shape), v.dtype, v.device) for v in inputs) + (steps, float(guidance))
        if key not in self._graphs:
            static = tuple(v.clone() for v in inputs)
            # the timesteps the UNet reads, static on the device
            self._graphs[key] = self._capture(factory, static, scheduler.timesteps.clone(), guidance)
        return self._graphs[key](*inputs)

    def _capture(self, factory: CallFactory, static: tuple[torch.Tensor, ...], timesteps: torch.Tensor,
                 guidance: float) -> StaticCall:
        from blip3o.decoder.sdxl_unet import make_scheduler

        decoder, (latents, cond, text_embeds, time_ids) = self.decoder, static
        added = {"text_embeds": text_embeds, "time_ids": time_ids}

        def unet_step(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            # timesteps[i], on the device, rather than t: the CPU schedule's scalar would need a host copy
            return self.unet(decoder.unet_layout(x), timesteps[i], encoder_hidden_states=cond,
                             added_cond_kwargs=added, return_dict=False)[0]

        def loop() -> torch.Tensor:
            scheduler = make_scheduler(decoder.scheduler_config)
            scheduler.set_timesteps(len(timesteps))  # on the CPU: the schedule's scalars, fixed in the captured kernels
            scheduler.set_begin_index(0)
            return decoder.denoise(latents, cond, scheduler, guidance, unet_step)

        return factory(loop, static)

    def clear(self) -> None:
        """Drop the captured graphs (and their memory pools)."""
        self._graphs.clear()
