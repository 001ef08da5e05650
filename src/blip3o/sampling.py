"""Sampling by flow matching: noise, the time grid, and the one loop every sampler in blip3o runs.

    x_1 ~ N(0, I)                                    draw_noise, on the CPU generator, moved
    times = time_grid(steps, shift)                  1 ... 0 (flow.py holds the time convention)
    for each interval (t, t_next):                   denoise
        v = v_u + guidance (v_c - v_u)                 both CFG branches in one doubled batch
        x = euler / heun / stochastic step             flow.euler_step, heun_step, stochastic_step

A network enters the loop as a `PairVelocity`: a function of the (doubled, when guided) batch, the call's
index and, for a self-conditioned network, the previous call's clean estimate. It holds no state: the loop
carries the clean estimate and counts the calls. The DiT's velocity is `dit_velocity`; the fast paths of
`blip3o.accel` run this same loop with a compiled network inside a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from blip3o.flow import (
    Generators,
    call_times,
    check_solver,
    draw_noise,
    euler_step,
    heun_step,
    stochastic_step,
    time_grid,
)

if TYPE_CHECKING:
    from blip3o.dit import DiT

# (x (kB, ...), t (kB,), call index, previous clean estimate (kB, ...) or None) -> v (kB, ...); k = 2 when guided
PairVelocity = Callable[[torch.Tensor, torch.Tensor, int, "torch.Tensor | None"], torch.Tensor]


def fresh_noise(method: str, x_1: torch.Tensor, intervals: int, generator: Generators) -> torch.Tensor | None:
    """The stochastic sampler's noise for every interval, (intervals, *x_1.shape), drawn after x_1 from the
    same generator(s), row group by row group (None for the deterministic samplers: nothing is drawn)."""
    if method != "stochastic":
        return None
    rows = draw_noise((x_1.shape[0], intervals, *x_1.shape[1:]), generator, x_1.device, x_1.dtype)
    return rows.transpose(0, 1)


def guided_velocity(velocity: PairVelocity, x: torch.Tensor, t: torch.Tensor, call: int, guidance: float,
                    x_0_previous: torch.Tensor | None) -> torch.Tensor:
    """v_u + guidance (v_c - v_u) with both branches in one doubled batch [uncond; cond]; guidance 1 runs the
    conditional branch alone."""
    if guidance == 1.0:
        return velocity(x, t, call, x_0_previous)
    previous = None if x_0_previous is None else x_0_previous.repeat(2, 1, 1)
    v_u, v_c = velocity(torch.cat([x, x]), torch.cat([t, t]), call, previous).chunk(2)
    return v_u + guidance * (v_c - v_u)


def check_stochastic(method: str, eta: float, fresh: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if method != "stochastic":
        return
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if fresh is None or tuple(fresh.shape) != shape:
        got = None if fresh is None else tuple(fresh.shape)
        raise ValueError(f"the stochastic sampler needs fresh noise of shape {shape}, got {got}")


def denoise(velocity: PairVelocity, x: torch.Tensor, times: Sequence[float], *, method: str = "euler",
            guidance: float = 1.0, eta: float = 1.0, fresh: torch.Tensor | None = None,
            self_condition: bool = False) -> torch.Tensor:
    """Integrate dx/dt = v from times[0] (x, noise at t = 1) to times[-1]; returns x there, in x's dtype.

    Euler takes one call per interval; Heun two, except on an interval ending at t = 0, where it falls back
    to Euler (as EDM does); `stochastic` is DDIM with `eta` (`flow.stochastic_step`), `fresh` holding each
    interval's standard normal noise (len(times) - 1, *x.shape). With `self_condition` every call reads the
    clean estimate x - t v of the previous call (zeros at the first), the guided one, fed to both branches.
    """
    check_solver(method)
    check_stochastic(method, eta, fresh, (len(times) - 1, *x.shape))
    x_0 = torch.zeros_like(x) if self_condition else None  # the previous call's clean estimate
    call = 0
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
        t = torch.full((x.shape[0],), t_cur, device=x.device, dtype=torch.float32)
        v = guided_velocity(velocity, x, t, call, guidance, x_0)
        call += 1
        x_0 = clean_estimate(x, t, v) if self_condition else None
        if method == "stochastic" and eta > 0:
            x = stochastic_step(x, v, t_cur, t_next, eta, fresh[i])
        elif method == "heun" and t_next > 0:
            x_euler, t_euler = euler_step(x, v, t_cur, t_next), torch.full_like(t, t_next)
            v_next = guided_velocity(velocity, x_euler, t_euler, call, guidance, x_0)
            call += 1
            x_0 = clean_estimate(x_euler, t_euler, v_next) if self_condition else None
            x = heun_step(x, v, v_next, t_cur, t_next)
        else:
            x = euler_step(x, v, t_cur, t_next)
    return x


def clean_estimate(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x_0 = x_t - t v on the straight path; x_t (B, ...), t (B,)."""
    return x_t - t.view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype) * v.to(x_t.dtype)


# ---------------------------------------------------------------------------- the DiT


class DiTLoop(Protocol):
    """How a model runs the DiT's loop: `run_dit_loop`, or a faster runner of the same loop (blip3o.accel)."""

    def __call__(self, dit: DiT, cond: torch.Tensor, x_1: torch.Tensor, times: list[float], *, guidance: float,
                 method: str, eta: float, fresh: torch.Tensor | None,
                 source: torch.Tensor | None = None) -> torch.Tensor: ...


def dit_velocity(dit: DiT, cond: torch.Tensor, guidance: float, times: list[float],
                 predict: Callable[..., torch.Tensor] | None = None,
                 source: torch.Tensor | None = None) -> PairVelocity:
    """The DiT as a `PairVelocity` for calls at `times` (`flow.call_times` of the loop), given cond (B, L, H).

    The condition's cross-attention K/V and every call's adaLN modulations are computed here, once; with CFG
    (guidance != 1) the unconditional branch is an all-zero condition (as trained with condition dropout).
    `predict` replaces `dit.velocity` (a compiled copy). source (B, K, N, C): an editing DiT's source tokens,
    read by both branches (guidance then pulls towards the instruction, from the source image).
    """
    predict = predict or dit.velocity
    guided = guidance != 1.0
    if guided and source is not None:
        source = torch.cat([source, source])
    prepared = dit.prepare_condition(torch.cat([torch.zeros_like(cond), cond]) if guided else cond, source=source)
    modulation = dit.modulation(list(times), prepared)

    def velocity(x: torch.Tensor, t: torch.Tensor, call: int, x_0_previous: torch.Tensor | None) -> torch.Tensor:
        if call >= len(times):
            raise RuntimeError(f"the DiT's velocity was prepared for {len(times)} calls and is called once more")
        mod = None if modulation is None else modulation.at(call)
        return predict(x, t, prepared, x_0_previous, modulation=mod)

    return velocity


def run_dit_loop(dit: DiT, cond: torch.Tensor, x_1: torch.Tensor, times: list[float], *, guidance: float,
                 method: str, eta: float, fresh: torch.Tensor | None,
                 predict: Callable[..., torch.Tensor] | None = None,
                 source: torch.Tensor | None = None) -> torch.Tensor:
    """cond (B, L, H), noise x_1 (B, N, C) (and an editing DiT's source tokens (B, K, N, C)) -> CLIP tokens
    (B, N, C): `denoise` over the DiT's velocity."""
    velocity = dit_velocity(dit, cond, guidance, call_times(times, method), predict, source)
    return denoise(velocity, x_1, times, method=method, guidance=guidance, eta=eta, fresh=fresh,
                   self_condition=dit.self_condition is not None)


def sample_tokens(dit: DiT, cond: torch.Tensor, *, steps: int, guidance: float, method: str = "euler",
                  eta: float = 1.0, time_shift: float = 1.0, generator: Generators = None,
                  loop: DiTLoop = run_dit_loop, source: torch.Tensor | None = None) -> torch.Tensor:
    """cond (B, L, H) -> CLIP tokens (B, 64, C): noise from `generator` (drawn on the CPU, so a seed gives the
    same tokens on every device), the time grid, then `loop`. source (B, K, N, C): an editing DiT's source
    tokens."""
    check_solver(method)
    c = dit.config
    x_1 = draw_noise((cond.shape[0], c.num_tokens, c.in_channels), generator, cond.device, cond.dtype)
    times = time_grid(steps, time_shift)
    fresh = fresh_noise(method, x_1, len(times) - 1, generator)
    if source is None:
        return loop(dit, cond, x_1, times, guidance=guidance, method=method, eta=eta, fresh=fresh)
    return loop(dit, cond, x_1, times, guidance=guidance, method=method, eta=eta, fresh=fresh, source=source)
