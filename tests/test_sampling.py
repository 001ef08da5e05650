"""The sampling loop (blip3o.sampling): solvers against ODEs with known answers, CFG, self-conditioning,
the calls it makes, and the DiT's velocity through it."""

import dataclasses
import math

import pytest
import torch

from blip3o.dit import DIT_PRESETS, DiT
from blip3o.flow import SOLVERS, call_times, time_grid
from blip3o.sampling import denoise, dit_velocity, guided_velocity


def sample(v, x_1, times, method="euler", **kwargs):
    """The loop over a plain velocity v(x, t)."""
    return denoise(lambda x, t, call, x_0: v(x, t), x_1, times, method=method, **kwargs)


def test_euler_is_exact_on_a_straight_path():
    # the true velocity field of a single data point x_0 is (x - x_0) / t; Euler integrates it exactly
    x_0, x_1 = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    out = sample(lambda x, t: (x - x_0) / t.view(-1, 1).to(x.dtype), x_1, time_grid(7))
    torch.testing.assert_close(out, x_0)


def test_solvers_converge_at_their_order():
    # dx/dt = x from t=1 to 0: x(0) = x(1) / e
    x_1 = torch.ones(1, 1, dtype=torch.float64)

    def error(method, steps):
        return abs(sample(lambda x, t: x, x_1, [1 - i / steps for i in range(steps + 1)], method).item()
                   - math.exp(-1))

    assert error("euler", 40) < error("euler", 20) * 0.55  # first order: halves
    assert error("heun", 40) < error("heun", 20) * 0.3  # better than first order (last step is Euler)
    assert error("heun", 20) < error("euler", 20) / 5
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(lambda x, t: x, x_1, [1.0, 0.0], "rk9")


def test_guidance_combines_branches_in_one_batch():
    calls = []
    cond = torch.randn(3, 2)
    both = torch.cat([torch.zeros(3, 2), cond])

    def velocity(x, t, call, x_0):
        calls.append(x.shape[0])
        return x + (both if x.shape[0] == 6 else cond)  # linear in the condition

    x, t = torch.randn(3, 2), torch.rand(3)
    torch.testing.assert_close(guided_velocity(velocity, x, t, 0, 3.0, None), x + 3.0 * cond)
    assert calls == [6]  # both branches in one call
    torch.testing.assert_close(guided_velocity(velocity, x, t, 0, 1.0, None), x + cond)
    assert calls == [6, 3]  # guidance 1: the conditional branch alone


def _gaussian_velocity(mean: float, std: float):
    """The exact velocity field of data N(mean, std^2) on the straight path x_t = (1 - t) x_0 + t e."""

    def v(x, t):
        a, t_ = 1 - t.view(-1, 1).to(x.dtype), t.view(-1, 1).to(x.dtype)
        x_0 = mean + a * std**2 / (a**2 * std**2 + t_**2) * (x - a * mean)
        return (x - x_0) / t_

    return v


def test_stochastic_sampler_with_eta_0_is_euler():
    v = _gaussian_velocity(0.3, 0.5)
    x_1 = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times = time_grid(9)
    fresh = torch.randn(9, 64, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(sample(v, x_1, times, "stochastic", eta=0.0, fresh=fresh),
                               sample(v, x_1, times, "euler"), rtol=0, atol=1e-12)
    assert not torch.allclose(sample(v, x_1, times, "stochastic", eta=1.0, fresh=fresh), sample(v, x_1, times))


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_stochastic_sampler_draws_the_data_distribution(eta):
    # with the exact velocity of Gaussian data, DDIM-eta lands on that Gaussian whatever eta (fine grid)
    mean, std, steps, n = 0.3, 0.5, 200, 40_000
    gen = torch.Generator().manual_seed(0)
    x_1 = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    fresh = torch.randn(steps, n, 1, generator=gen, dtype=torch.float64)
    out = sample(_gaussian_velocity(mean, std), x_1, time_grid(steps), "stochastic", eta=eta, fresh=fresh)
    assert abs(out.mean().item() - mean) < 0.01
    assert abs(out.std().item() / std - 1) < 0.02
    # and the fresh noise matters: the same start lands elsewhere than Euler's deterministic path
    euler = sample(_gaussian_velocity(mean, std), x_1, time_grid(steps))
    assert (out - euler).abs().mean().item() > 0.05


def test_stochastic_sampler_rejects_bad_settings():
    x_1 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="fresh noise of shape"):
        sample(lambda x, t: x, x_1, [1.0, 0.5, 0.0], "stochastic")
    with pytest.raises(ValueError, match="fresh noise of shape"):
        sample(lambda x, t: x, x_1, [1.0, 0.5, 0.0], "stochastic", fresh=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="eta must be in"):
        sample(lambda x, t: x, x_1, [1.0, 0.5, 0.0], "stochastic", eta=1.5, fresh=torch.zeros(2, 2, 3))


@pytest.mark.parametrize("method", SOLVERS)
@pytest.mark.parametrize("times", [time_grid(5), [0.9, 0.5, 0.2], time_grid(1)])
def test_call_times_are_the_times_sample_calls_the_velocity_at(method, times):
    seen = []

    def velocity(x, t):
        seen.append(t[0].item())
        return -x

    x = torch.randn(2, 3)
    fresh = torch.randn(len(times) - 1, 2, 3) if method == "stochastic" else None
    sample(velocity, x, times, method, eta=0.5, fresh=fresh)
    assert call_times(times, method) == pytest.approx(seen)
    with pytest.raises(ValueError, match="unknown sampler"):
        call_times(times, "rk4")


def _randomize(model: torch.nn.Module) -> None:
    """Every weight random (zero-initialised gates and modulations included): every branch counts."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)


def _self_conditioned(prediction: str = "sample") -> tuple[DiT, None]:
    """A randomised self-conditioned debug DiT."""
    cfg = dataclasses.replace(DIT_PRESETS["debug"], prediction=prediction, self_condition=True)
    torch.manual_seed(0)
    dit = DiT(cfg).eval()
    _randomize(dit)
    return dit, None


def per_step_predict(dit: DiT):
    """dit.velocity without the modulations computed before the loop: each call computes its own."""
    return lambda x, t, cond, x_0, modulation=None: dit.velocity(x, t, cond, x_0)


def recorded_velocities(dit, c, guidance, times, x_a, x_b):
    """The DiT's guided velocities at its first two calls, made at x_a (times[0]) then x_b (times[1])."""
    velocity = dit_velocity(dit, c, guidance, times)
    previous = torch.zeros_like(x_a)
    t_a, t_b = torch.full((2,), times[0]), torch.full((2,), times[1])
    v_a = guided_velocity(velocity, x_a, t_a, 0, guidance, previous)
    v_b = guided_velocity(velocity, x_b, t_b, 1, guidance, x_a - times[0] * v_a)
    return v_a, v_b


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_self_conditioned_sampling_feeds_each_step_the_last_guided_estimate(guidance):
    dit, _ = _self_conditioned()
    cfg = dit.config
    c = torch.randn(2, 5, cfg.cond_size)
    x_a, x_b = torch.randn(2, 64, cfg.in_channels), torch.randn(2, 64, cfg.in_channels)
    t_a, t_b = torch.full((2,), 0.9), torch.full((2,), 0.6)
    times = [0.9, 0.6, 0.3]
    with torch.no_grad():
        v_a, v_b = recorded_velocities(dit, c, guidance, times, x_a, x_b)
        if guidance == 1.0:
            prepared = dit.prepare_condition(c)

            def manual(x, t, previous):
                return dit.velocity(x, t, prepared, previous)
        else:
            both = dit.prepare_condition(torch.cat([torch.zeros_like(c), c]))

            def manual(x, t, previous):
                u, k = dit.velocity(torch.cat([x, x]), torch.cat([t, t]), both, torch.cat([previous] * 2)).chunk(2)
                return u + guidance * (k - u)

        torch.testing.assert_close(v_a, manual(x_a, t_a, torch.zeros_like(x_a)))
        torch.testing.assert_close(v_b, manual(x_b, t_b, x_a - 0.9 * v_a))




# --- modulations computed before the sampling loop -------------------------------------------------


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("variant", ["plain", "self_condition", "quantized"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampling_with_precomputed_modulations_matches_per_step(method, variant, guidance):
    cfg = DIT_PRESETS["debug"]
    if variant == "self_condition":
        cfg = dataclasses.replace(cfg, self_condition=True, prediction="sample")
    elif variant == "quantized":
        cfg = dataclasses.replace(cfg, quantize_timesteps=True)
    torch.manual_seed(0)  # the same weights whatever ran before
    dit = DiT(cfg).eval()
    _randomize(dit)
    # float64: what is left is the summation order of a GEMM over more rows, far below any wrong modulation
    dit = dit.double()
    c = torch.randn(3, 5, cfg.cond_size, dtype=torch.float64)
    x = torch.randn(3, 64, cfg.in_channels, dtype=torch.float64)
    times = time_grid(6, 2.0)
    with torch.no_grad():
        calls = []
        per_step = dit_velocity(dit, c, guidance, call_times(times, method), per_step_predict(dit))

        def recorded(x_t, t, call, x_0):
            calls.append((x_t, t, call, x_0, per_step(x_t, t, call, x_0)))
            return calls[-1][-1]

        denoise(recorded, x, times, method=method, guidance=guidance, self_condition=dit.self_condition is not None)
        # the same calls (the per-step loop's inputs, one after another) with the modulations computed up front
        velocity = dit_velocity(dit, c, guidance, call_times(times, method))
        assert [call for _, _, call, _, _ in calls] == list(range(len(call_times(times, method))))
        for x_t, t, call, x_0, want in calls:
            got = velocity(x_t, t, call, x_0)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())
        with pytest.raises(RuntimeError, match="prepared for"):  # one call more than the times given
            velocity(x, torch.full((3,), 0.1), len(calls), None)


def test_modulation_is_each_steps_own_and_refused_over_budget():
    dit = DiT(DIT_PRESETS["debug"]).eval()
    _randomize(dit)
    c = torch.randn(2, 5, dit.config.cond_size)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False  # masked pooling of the caption embedding
    with torch.no_grad():
        cond = dit.prepare_condition(c, mask)
        times = [0.9, 0.4, 0.05]
        mod = dit.modulation(times, cond)
        assert len(mod) == 3 and mod.layers[0].shape == (3, 2, 4 * dit.config.hidden_size)
        for i, t in enumerate(times):
            c_t = dit.time_caption_embed(torch.full((2,), t), cond.context, cond.mask)
            layers, out = mod.at(i)
            for block, m in zip(dit.layers, layers, strict=True):
                torch.testing.assert_close(m, block.norm1.modulation(c_t))
            torch.testing.assert_close(out, dit.norm_out.scale(c_t))
        # one GEMM per block over every call's rows, unless that is too large: then each step computes its own
        dit.modulation_budget_bytes = mod.out.numel() * 4 * (4 * len(dit.layers) + 1) - 1
        assert dit.modulation(times, cond) is None
        assert dit.modulation([], cond) is None
        v = dit_velocity(dit, c, 1.0, times)  # falls back to per-step modulations
        x = torch.randn(2, 64, dit.config.in_channels)
        want = dit.velocity(x, torch.full((2,), 0.4), dit.prepare_condition(c))
        torch.testing.assert_close(v(x, torch.full((2,), 0.4), 1, None), want)
