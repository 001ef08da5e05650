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


SCHEDULER_STEPS = 1000  # the original trains with FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1)


def scheduler_sigmas(device: torch.device | str | None = None) -> torch.Tensor:
    """The training sigmas of diffusers' FlowMatchEulerDiscreteScheduler (1000 steps, shift 1), computed as it
    computes them: (1000,) float32, descending from 1 to 0.001. In float32 some 1000 sigma are not integers
    (sigma 0.511: 510.99997), and the original's time embedding reads them so."""
    return torch.arange(SCHEDULER_STEPS, 0, -1, dtype=torch.float32, device=device) / SCHEDULER_STEPS


def grid_times(u: torch.Tensor) -> torch.Tensor:
    """Uniform draws u (B,) in [0, 1) -> sigmas (B,) on the scheduler's grid: sigmas[floor(1000 u)], the
    original's training draw (`indices = (u * num_train_timesteps).long()`)."""
    return scheduler_sigmas(device=u.device)[(u.float() * SCHEDULER_STEPS).long()]


def sample_t(
    batch: int,
    kind: str = "uniform",
    *,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training times (B,): `uniform` on [0, 1), `scheduler_grid` (the same uniform draw taken to the
    original's 1000-step grid, `grid_times`) or `logit_normal` (SD3)."""
    if kind == "uniform":
        t = torch.rand(batch, generator=generator, device=device)
    elif kind == "scheduler_grid":
        t = grid_times(torch.rand(batch, generator=generator, device=device))
    elif kind == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))
    else:
        raise ValueError(f"unknown time sampling {kind!r}: use 'uniform', 'scheduler_grid' or 'logit_normal'")
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


SOLVERS = ("euler", "heun", "stochastic")


def check_solver(method: str) -> None:
    if method not in SOLVERS:
        raise ValueError(f"unknown sampler {method!r}: use one of {', '.join(SOLVERS)}")


def euler_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """x at t_next from x and v at t. Computed in float32 and rounded back to x's dtype once (as diffusers'
    flow-matching scheduler steps), so half-precision sampling loses no more than one rounding a step."""
    return (x.float() + (t_next - t) * v.float()).to(x.dtype)


def heun_step(x: torch.Tensor, v: torch.Tensor, v_next: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    """Heun's (trapezoidal) update from v at t and v_next at the Euler point at t_next; float32 inside."""
    return (x.float() + (t_next - t) * (0.5 * (v.float() + v_next.float()))).to(x.dtype)


def stochastic_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, eta: float,
                    z: torch.Tensor) -> torch.Tensor:
    """DDIM with eta on the straight path x_t = (1 - t) x_0 + t e, float32 inside.

    Reads the clean estimate x_0 = x - t v and the noise estimate e = x + (1 - t) v and steps to
    x' = (1 - t') x_0 + sqrt(t'^2 - s^2) e + s z, where s = eta times the DDPM posterior std of x_t' given
    x_t and x_0: eta = 0 is Euler exactly, eta = 1 is DDPM's ancestral sampler; z is standard normal.
    """
    s = eta * ddpm_posterior_std(t, t_next)
    xf, vf = x.float(), v.float()
    x_0, noise = xf - t * vf, xf + (1.0 - t) * vf
    return ((1.0 - t_next) * x_0 + max(t_next**2 - s**2, 0.0) ** 0.5 * noise + s * z.float()).to(x.dtype)


def ddpm_posterior_std(t: float, t_next: float) -> float:
    """Std of x_t' given x_t and x_0 on the straight path (t' < t): the forward step x_t = r x_t' + n,
    r = (1 - t) / (1 - t'), has variance t^2 - r^2 t'^2, and the posterior std is sqrt(that) t' / t."""
    r = (1.0 - t) / (1.0 - t_next)
    return max(t**2 - (r * t_next) ** 2, 0.0) ** 0.5 * t_next / t


def call_times(times: Sequence[float], method: str = "euler") -> list[float]:
    """The times at which the sampling loop (`blip3o.sampling.denoise`) calls the network, in call order: each
    interval's start, and for Heun also its end unless that is t = 0. Lets a model prepare every call's
    time-dependent inputs before the loop (`DiT.modulation`)."""
    check_solver(method)
    calls: list[float] = []
    for t_cur, t_next in zip(times[:-1], times[1:], strict=True):
        calls.append(t_cur)
        if method == "heun" and t_next > 0:
            calls.append(t_next)
    return calls
