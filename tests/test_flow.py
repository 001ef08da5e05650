"""Flow matching: the time convention pinned, solvers checked against ODEs with known answers."""

import math

import pytest
import torch

from blip3o.flow import (
    SAMPLERS,
    call_times,
    ddpm_posterior_std,
    drop_condition,
    flow_matching_loss,
    guided,
    sample,
    sample_path,
    sample_t,
    shift_time,
    time_grid,
)


def test_convention_t1_is_noise_and_v_points_to_noise():
    x_0, x_1 = torch.randn(4, 3), torch.randn(4, 3)
    at0 = sample_path(x_0, x_1, torch.zeros(4))
    at1 = sample_path(x_0, x_1, torch.ones(4))
    torch.testing.assert_close(at0.x_t, x_0)
    torch.testing.assert_close(at1.x_t, x_1)
    torch.testing.assert_close(at0.v, x_1 - x_0)
    mid = sample_path(x_0, x_1, torch.full((4,), 0.25))
    torch.testing.assert_close(mid.x_t, 0.75 * x_0 + 0.25 * x_1)
    assert flow_matching_loss(mid.v, mid).item() == 0.0


def test_official_time_grid():
    grid = time_grid(30)
    assert len(grid) == 31 and grid[0] == 1.0 and grid[-1] == 0.0
    expected = [1 - i * (1 - 1 / 30) / 29 for i in range(30)] + [0.0]
    assert max(abs(a - b) for a, b in zip(grid, expected, strict=True)) < 1e-12
    shifted = time_grid(10, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)


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

    def velocity(x, t, c):
        calls.append(x.shape[0])
        return x + c  # linear in the condition

    x, t = torch.randn(3, 2), torch.rand(3)
    cond, uncond = torch.randn(3, 2), torch.zeros(1, 2)
    v = guided(velocity, cond, uncond, 3.0)(x, t)
    torch.testing.assert_close(v, x + 3.0 * cond)
    assert calls == [6]  # both branches in one call
    torch.testing.assert_close(guided(velocity, cond, uncond, 1.0)(x, t), x + cond)
    with pytest.raises(ValueError, match="does not match"):
        guided(velocity, cond, torch.zeros(2, 2), 2.0)


def test_condition_dropout_and_time_sampling():
    g = torch.Generator().manual_seed(0)
    cond = torch.ones(10000, 4)
    dropped = drop_condition(cond, 0.1, g)
    rate = (dropped.sum(1) == 0).float().mean().item()
    assert 0.08 < rate < 0.12
    assert torch.equal(drop_condition(cond, 0.0, g), cond)
    assert drop_condition(cond, 1.0, g).abs().sum() == 0
    for kind in ("uniform", "logit_normal"):
        t = sample_t(10000, kind, generator=g)
        assert t.min() >= 0 and t.max() <= 1 and abs(t.mean().item() - 0.5) < 0.02
    ln = sample_t(10000, "logit_normal", generator=g)
    assert ((ln - 0.5).abs() < 0.25).float().mean() > 0.6  # concentrated in the middle
    with pytest.raises(ValueError, match="unknown time sampling"):
        sample_t(2, "beta")


def test_draw_noise_gives_each_generator_group_its_solo_draw():
    from blip3o.flow import draw_noise, per_row

    solo = [torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(s)) for s in (3, 4, 5)]
    grouped = draw_noise((6, 5, 7), [torch.Generator().manual_seed(s) for s in (3, 4, 5)])
    assert torch.equal(grouped, torch.cat(solo))
    assert torch.equal(draw_noise((2, 5, 7), torch.Generator().manual_seed(3)), solo[0])
    assert draw_noise((2, 3), None, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="equal groups"):
        draw_noise((5, 2), [torch.Generator(), torch.Generator()])
    with pytest.raises(TypeError, match="Generator"):
        draw_noise((2, 2), [0, 1])
    g = [torch.Generator(), torch.Generator()]
    assert per_row(g, 4) == [g[0], g[0], g[1], g[1]] and per_row(g[0], 4) is g[0]


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


def test_ddpm_posterior_std_bounds():
    assert ddpm_posterior_std(1.0, 0.9) == pytest.approx(0.9)  # from pure noise every bit of noise is new
    assert ddpm_posterior_std(0.5, 0.0) == 0.0  # the last step is deterministic
    s = ddpm_posterior_std(0.5, 0.45)
    assert 0 < s < 0.45


def test_stochastic_sampler_rejects_bad_settings():
    x_1 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="fresh noise of shape"):
        sample(lambda x, t: x, x_1, [1.0, 0.5, 0.0], "stochastic")
    with pytest.raises(ValueError, match="fresh noise of shape"):
        sample(lambda x, t: x, x_1, [1.0, 0.5, 0.0], "stochastic", fresh=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="eta must be in"):
        sample(lambda x, t: x, x_1, [1.0, 0.5, 0.0], "stochastic", eta=1.5, fresh=torch.zeros(2, 2, 3))


@pytest.mark.parametrize("method", SAMPLERS)
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
