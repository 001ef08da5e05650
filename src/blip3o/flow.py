"""Flow matching: the one time convention of the project, written once.

    x_t = (1 - t) * x_0 + t * x_1,    x_0 = data, x_1 = noise ~ N(0, I)
    v   = dx_t/dt = x_1 - x_0         (what every model in blip3o predicts)

t = 1 is pure noise, t = 0 is data; sampling integrates dx/dt = v from t = 1 down to t = 0.
Every public function takes t as floats in [0, 1]; any x1000 scale lives inside the
timestep embeddings of the networks, never here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t (B,)) -> v
# Where sampling noise comes from: one generator for the whole batch, or one per group of rows
# (a prompt's images), so that each group's noise is what that generator alone would draw.
Generators = torch.Generator | Sequence[torch.Generator] | None


def draw_noise(shape: tuple[int, ...], generator: Generators, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape`, drawn on the generator's device (CPU by default) and moved.

    Drawing on the CPU and moving makes a seed give the same image on every device. With a list of
    k generators, the rows split into k equal consecutive groups and generator i draws group i as if
    alone: a batch of several seeded requests gets, row for row, the noise of each request's own call.
    """
    if generator is None or isinstance(generator, torch.Generator):
        where = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(shape, generator=generator, device=where, dtype=torch.float32)
        return noise.to(device=device, dtype=dtype)
    generators = list(generator)
    if not generators or not all(isinstance(g, torch.Generator) for g in generators):
        raise TypeError("generator must be a torch.Generator or a non-empty sequence of them")
    if shape[0] % len(generators):
        raise ValueError(f"{len(generators)} generators cannot split a batch of {shape[0]} rows into equal groups")
    rows = (shape[0] // len(generators), *shape[1:])
    return torch.cat([draw_noise(rows, g, device, dtype) for g in generators])


def per_row(generator: Generators, batch: int) -> Generators:
    """A list of k group generators as one generator per row (what diffusers' schedulers take)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    generators = list(generator)
    return [g for g in generators for _ in range(batch // len(generators))]


@dataclass
class PathSample:
    x_t: torch.Tensor  # point on the path, same shape as x_0
    v: torch.Tensor  # target velocity x_1 - x_0
    x_0: torch.Tensor  # data
    x_1: torch.Tensor  # noise
    t: torch.Tensor  # (B,) times in [0, 1]


def sample_path(x_0: torch.Tensor, x_1: torch.Tensor, t: torch.Tensor) -> PathSample:
    """Point of the straight path between data x_0 and noise x_1 at times t (B,)."""
    if x_0.shape != x_1.shape:
        raise ValueError(f"x_0 {tuple(x_0.shape)} and x_1 {tuple(x_1.shape)} must have the same shape")
    if t.shape != (x_0.shape[0],):
        raise ValueError(f"t must have shape ({x_0.shape[0]},), got {tuple(t.shape)}")
    t_ = t.view(-1, *([1] * (x_0.ndim - 1))).to(x_0.dtype)
    return PathSample(x_t=(1 - t_) * x_0 + t_ * x_1, v=x_1 - x_0, x_0=x_0, x_1=x_1, t=t)


def sample_t(
    batch: int,
    kind: str = "uniform",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training times (B,): `uniform` on [0, 1] (official BLIP3-o) or `logit_normal` (SD3)."""
    if kind == "uniform":
        t = torch.rand(batch, generator=generator, device=device)
    elif kind == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    else:
        raise ValueError(f"unknown time sampling {kind!r}: use 'uniform' or 'logit_normal'")
    return t


def drop_condition(
    cond: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero whole rows of `cond` (B, ...) with probability p: the unconditional branch of CFG."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {p}")
    keep = torch.rand(cond.shape[0], generator=generator, device=cond.device) >= p
    return cond * keep.view(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)


def flow_matching_loss(v_pred: torch.Tensor, path: PathSample) -> torch.Tensor:
    """Mean squared error between predicted and target velocity, in fp32."""
    return torch.mean((v_pred.float() - path.v.float()) ** 2)


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Resolution time shift (SD3): t' = s t / (1 + (s - 1) t); s > 1 spends more steps near noise."""
    return shift * t / (1 + (shift - 1) * t)


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """Official BLIP3-o grid: linspace(1, 1/steps, steps) then 0, optionally shifted. len = steps + 1."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    ts = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).tolist() + [0.0]
    return [float(shift_time(t, shift)) for t in ts]


def guided(velocity: Callable[..., torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> Velocity:
    """Classifier-free guidance with both branches in one batch.

    velocity(x (2B, ...), t (2B,), cond (2B, ...)) -> v; returns v_u + scale * (v_c - v_u).
    `uncond` may have batch 1 (it is broadcast explicitly to B).
    """
    if uncond.shape[0] == 1 and cond.shape[0] != 1:
        uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
    if uncond.shape != cond.shape:
        raise ValueError(f"uncond {tuple(uncond.shape)} does not match cond {tuple(cond.shape)}")
    if scale == 1.0:
        return lambda x, t: velocity(x, t, cond)
    both = torch.cat([uncond, cond])
    return guided_pair(lambda x2, t2: velocity(x2, t2, both), scale)


def guided_pair(velocity_pair: Velocity, scale: float) -> Velocity:
    """CFG over a velocity that already evaluates the doubled batch [uncond; cond] in one call.

    For models that prepare their condition once per sample (the DiT caches its cross-attention
    keys and values), so the condition is bound before sampling starts.
    """

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_u, v_c = velocity_pair(torch.cat([x, x]), torch.cat([t, t])).chunk(2)
        return v_u + scale * (v_c - v_u)

    return v


SAMPLERS = ("euler", "heun", "stochastic")


def fresh_noise(method: str, x_1: torch.Tensor, intervals: int, generator: Generators) -> torch.Tensor | None:
    """The stochastic sampler's noise for every interval, (intervals, *x_1.shape), drawn after x_1 from the
    same generator(s), row group by row group (None for the deterministic samplers: nothing is drawn)."""
    if method != "stochastic":
        return None
    rows = draw_noise((x_1.shape[0], intervals, *x_1.shape[1:]), generator, x_1.device, x_1.dtype)
    return rows.transpose(0, 1)


def sample(velocity: Velocity, x_1: torch.Tensor, times: Sequence[float], method: str = "euler", *,
           eta: float = 1.0, fresh: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate dx/dt = v from times[0] (noise x_1) to times[-1] (data); returns x at times[-1].

    Euler takes one model call per interval; Heun (2nd order) two, except on the last interval
    when it ends at t = 0, where it falls back to Euler (as EDM does).

    `stochastic` is DDIM with eta on the straight path x_t = (1 - t) x_0 + t e. Each interval reads the
    clean estimate x_0 = x - t v and the noise estimate e = x + (1 - t) v and steps to
    x' = (1 - t') x_0 + sqrt(t'^2 - s^2) e + s z, where s = eta times the DDPM posterior std of x_t' given
    x_t and x_0. eta = 0 is Euler exactly; eta = 1 is DDPM's ancestral sampler. `fresh` holds the z of
    each interval: (len(times) - 1, *x_1.shape), standard normal.
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}: use one of {', '.join(SAMPLERS)}")
    if method == "stochastic":
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if fresh is None or fresh.shape != (len(times) - 1, *x_1.shape):
            got = None if fresh is None else tuple(fresh.shape)
            raise ValueError(f"the stochastic sampler needs fresh noise of shape {(len(times) - 1, *x_1.shape)}, "
                             f"got {got}")
    x = x_1
    batch = x.shape[0]
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
        dt = t_next - t_cur
        t = torch.full((batch,), t_cur, device=x.device, dtype=torch.float32)
        v = velocity(x, t)
        if method == "stochastic" and eta > 0:
            s = eta * ddpm_posterior_std(t_cur, t_next)
            x_0, noise = x - t_cur * v.to(x.dtype), x + (1.0 - t_cur) * v.to(x.dtype)
            x = (1.0 - t_next) * x_0 + max(t_next**2 - s**2, 0.0) ** 0.5 * noise + s * fresh[i].to(x.dtype)
            continue
        x_euler = x + dt * v.to(x.dtype)
        if method == "heun" and t_next > 0:
            v_next = velocity(x_euler, torch.full_like(t, t_next))
            x = x + dt * (0.5 * (v + v_next)).to(x.dtype)
        else:
            x = x_euler
    return x


def ddpm_posterior_std(t: float, t_next: float) -> float:
    """Std of x_t' given x_t and x_0 on the straight path (t' < t): the forward step x_t = r x_t' + n,
    r = (1 - t) / (1 - t'), has variance t^2 - r^2 t'^2, and the posterior std is sqrt(that) t' / t."""
    r = (1.0 - t) / (1.0 - t_next)
    return max(t**2 - (r * t_next) ** 2, 0.0) ** 0.5 * t_next / t


def call_times(times: Sequence[float], method: str = "euler") -> list[float]:
    """The times at which `sample(velocity, x_1, times, method)` calls `velocity`, in call order: each
    interval's start, and for Heun also its end unless that is t = 0. Lets a model prepare every call's
    time-dependent inputs before the loop (`DiT.modulation`)."""
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}: use one of {', '.join(SAMPLERS)}")
    calls: list[float] = []
    for t_cur, t_next in zip(times[:-1], times[1:], strict=True):
        calls.append(t_cur)
        if method == "heun" and t_next > 0:
            calls.append(t_next)
    return calls
