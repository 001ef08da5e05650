"""The DiT's sampling loop captured as one CUDA graph: `sampling.run_dit_loop`, replayed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from blip3o.accel.graphs import CallFactory, StaticCall, default_graph, fingerprint
from blip3o.sampling import run_dit_loop

if TYPE_CHECKING:
    from blip3o.dit import DiT


@dataclass(frozen=True)
class _LoopKey:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    times: tuple[float, ...]
    guidance: float
    method: str
    eta: float


class DiTLoopGraph:
    """A `sampling.DiTLoop`: the same loop as `sampling.run_dit_loop`, captured as one CUDA graph per (shape,
    settings) and replayed: a 30-step sample is one launch, not ~10,000.

    `compile=True` also runs the DiT's velocity through `torch.compile` (kernels fused, then captured). On a
    CPU, or with `cuda_graph=False`, it runs the eager loop (with the compiled velocity, if any). `graph`
    overrides how loops are captured (tests pass `EagerCall` to run the capture logic on a CPU).
    """

    def __init__(self, dit: DiT, *, cuda_graph: bool = True, compile: bool = False,
                 graph: CallFactory | None = None) -> None:
        self.cuda_graph, self.graph = cuda_graph, graph
        self.predict = torch.compile(dit.velocity, dynamic=False) if compile else None
        self._graphs: dict[_LoopKey, StaticCall] = {}
        self._fingerprint: tuple | None = None

    @torch.no_grad()
    def __call__(self, dit: DiT, cond: torch.Tensor, x_1: torch.Tensor, times: list[float], *, guidance: float,
                 method: str, eta: float, fresh: torch.Tensor | None,
                 source: torch.Tensor | None = None) -> torch.Tensor:
        """cond (B, L, H), noise x_1 (B, N, C) -> CLIP tokens (B, N, C); see `sampling.run_dit_loop`. An edit's
        loop (source tokens given) runs eagerly, with the compiled velocity if any."""
        factory = self.graph or (default_graph(cond.device, loop=True) if self.cuda_graph else None)
        if factory is None or source is not None:
            return run_dit_loop(dit, cond, x_1, times, guidance=guidance, method=method, eta=eta, fresh=fresh,
                                predict=self.predict, source=source)
        key = _LoopKey(tuple(cond.shape), cond.dtype, cond.device, tuple(times), float(guidance), method, float(eta))
        inputs = (cond, x_1) if fresh is None else (cond, x_1, fresh)
        return self._graph_for(dit, key, factory, inputs)(*inputs)

    def _graph_for(self, dit: DiT, key: _LoopKey, factory: CallFactory,
                   inputs: tuple[torch.Tensor, ...]) -> StaticCall:
        if fingerprint(dit) != self._fingerprint:  # weights moved or changed: every captured graph reads stale memory
            self._graphs.clear()
        if key not in self._graphs:
            static = tuple(x.clone() for x in inputs)  # cond, x_1 (and the stochastic sampler's noise)
            fresh = static[2] if len(static) > 2 else None

            def loop() -> torch.Tensor:
                return run_dit_loop(dit, static[0], static[1], list(key.times), guidance=key.guidance,
                                    method=key.method, eta=key.eta, fresh=fresh, predict=self.predict)

            self._graphs[key] = factory(loop, static)
        self._fingerprint = fingerprint(dit)  # fused weights were built during capture
        return self._graphs[key]

    def clear(self) -> None:
        """Drop the captured graphs (and their memory pools)."""
        self._graphs.clear()
