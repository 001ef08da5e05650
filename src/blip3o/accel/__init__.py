"""Fast paths for inference on a GPU. All opt-in; each falls back to the plain eager code and gives its answer.

    DiTLoopGraph       the DiT's whole fixed-shape sampling loop (`sampling.run_dit_loop`: condition K/V once,
                       every step with both CFG branches) replayed as ONE CUDA graph: a 30-step sample is
                       1 launch, not ~10,000
    DecoderLoopGraph   the SDXL decoder's whole sampling loop (50 UNet calls on both CFG branches, the
                       guidance, the scheduler's steps) as ONE CUDA graph, for Euler schedules
    UNetStepGraph      the SDXL decoder's UNet call (both CFG branches) as one CUDA graph per shape (the
                       other schedulers)
    enable_static_cache  transformers' static KV cache (+ its compiled decode step) for `answer`/`chat`
    accelerate         all of the above plus fused DiT projections and a channels-last UNet, on a Blip3o:
                       each goes into the slot the model declares for it (`Blip3o.dit_loop`, ...)

Why graphs: at batch 1 the 1.4B DiT is launch-bound (~400 small kernels a step); replaying a captured
graph removes the CPU from the loop, leaving the weight-bandwidth floor. A graph reads its input and
weight memory by address, so each captured graph owns static input buffers (a call copies its inputs in,
replays, and clones the output) and is recaptured whenever a weight moves or changes (see `fingerprint`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blip3o.accel.decoder import DecoderLoopGraph, UNetStepGraph
from blip3o.accel.dit import DiTLoopGraph
from blip3o.accel.graphs import CudaGraphCall, CudaGraphLoopCall, EagerCall, StaticCall, default_graph, fingerprint

if TYPE_CHECKING:
    from blip3o.backbone import Backbone
    from blip3o.model import Blip3o

__all__ = [
    "AccelOptions",
    "CudaGraphCall",
    "CudaGraphLoopCall",
    "DecoderLoopGraph",
    "DiTLoopGraph",
    "EagerCall",
    "StaticCall",
    "UNetStepGraph",
    "accelerate",
    "default_graph",
    "disable_static_cache",
    "enable_static_cache",
    "fingerprint",
]


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
    # one GEMM for the DiT's q/k/v/q2 and SwiGLU inputs, on CUDA devices (fewer launches); on CPUs one wide GEMM is
    # no faster or slower (28-33 ms against 20-22 ms for the four projections: docs/benchmarks.md), so not there
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
    model.dit_loop = DiTLoopGraph(model.dit, cuda_graph=options.dit_graph, compile=compile)
    if hasattr(model.decoder, "set_channels_last"):
        model.decoder.set_channels_last(options.channels_last)
    if isinstance(model.decoder, SdxlUnetDecoder):
        decoder = model.decoder
        decoder.unet_call = UNetStepGraph(decoder, compile=compile) if options.unet_graph else decoder.unet_output
        decoder.sampling_loop = (
            DecoderLoopGraph(decoder, compile=compile) if options.decoder_loop_graph else decoder.denoise
        )
    if options.static_cache:
        enable_static_cache(model.backbone, compile=compile)
    return model
