"""Static calls for the fast paths: a computation over static input buffers, replayed (by a CUDA graph).

A graph reads its input and weight memory by address, so each captured graph owns static input buffers (a
call copies its inputs in, replays, and clones the output) and is recaptured whenever a weight moves or
changes (see `fingerprint`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class StaticCall:
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


class EagerCall(StaticCall):
    """Same interface, no CUDA: replay re-runs the function into the same output buffer. Lets the
    static-buffer and recapture logic run (and be tested) on a CPU."""


class CudaGraphCall(StaticCall):
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


class CudaGraphLoopCall(CudaGraphCall):
    """A CUDA graph of a whole sampling loop: one warm-up run already runs each kernel once per step."""

    warmup = 1


CallFactory = Callable[[Callable[[], torch.Tensor], tuple[torch.Tensor, ...]], StaticCall]


def default_graph(device: torch.device, *, loop: bool = False) -> CallFactory | None:
    """CUDA graphs on CUDA devices (`loop`: of a whole sampling loop); elsewhere none (eager)."""
    if device.type != "cuda":
        return None
    return CudaGraphLoopCall if loop else CudaGraphCall


def fingerprint(module: nn.Module) -> tuple:
    """Where each weight lives and how often it was written: a captured graph is valid while this holds."""
    return tuple((p.data_ptr(), p._version) for p in module.parameters())
