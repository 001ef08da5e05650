"""The DiT's sampling loop captured as one CUDA graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from blip3o.accel.graphs import CallFactory, StaticCall, default_graph, fingerprint
from blip3o.flow import Generators, call_times, draw_noise, fresh_noise, sample, time_grid

if TYPE_CHECKING:
    from blip3o.model import Blip3o


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
    `graph` overrides how loops are captured (tests pass `EagerCall` to run the capture logic on a CPU).
    """

    def __init__(self, model: Blip3o, *, cuda_graph: bool = True, compile: bool = False,
                 graph: CallFactory | None = None) -> None:
        self.model, self.cuda_graph, self.graph = model, cuda_graph, graph
        dit = model.dit
        self.velocity = torch.compile(dit.velocity, dynamic=False) if compile else dit.velocity
        self._graphs: dict[_LoopKey, StaticCall] = {}
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

    def _graph_for(self, key: _LoopKey, factory: CallFactory, inputs: tuple[torch.Tensor, ...]) -> StaticCall:
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
