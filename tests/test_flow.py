"""Flow matching: the time convention pinned, the solver steps exact, the noise draws."""


import pytest
import torch

from blip3o.flow import (
    ddpm_posterior_std,
    drop_condition,
    euler_step,
    flow_matching_loss,
    heun_step,
    sample_path,
    sample_t,
    shift_time,
    stochastic_step,
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


def test_ddpm_posterior_std_bounds():
    assert ddpm_posterior_std(1.0, 0.9) == pytest.approx(0.9)  # from pure noise every bit of noise is new
    assert ddpm_posterior_std(0.5, 0.0) == 0.0  # the last step is deterministic
    s = ddpm_posterior_std(0.5, 0.45)
    assert 0 < s < 0.45


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_steps_compute_in_float32_and_round_once(dtype):
    """Each update upcasts x and v, computes in float32 and rounds back once (as diffusers' flow-matching
    scheduler step): the result is the float32 reference rounded, not a chain of half-precision roundings."""
    g = torch.Generator().manual_seed(0)
    x, v, v2, z = (torch.randn(4, 64, 32, generator=g).to(dtype) for _ in range(4))
    t, t_next = 0.7333333333333334, 0.7

    def reference(fn):
        return fn(*(a.float() for a in (x, v, v2, z))).to(dtype)

    assert torch.equal(euler_step(x, v, t, t_next), reference(lambda x, v, v2, z: x + (t_next - t) * v))
    assert torch.equal(heun_step(x, v, v2, t, t_next),
                       reference(lambda x, v, v2, z: x + (t_next - t) * (0.5 * (v + v2))))
    s = 0.5 * ddpm_posterior_std(t, t_next)
    want = reference(lambda x, v, v2, z: (1 - t_next) * (x - t * v) + (t_next**2 - s**2) ** 0.5 * (x + (1 - t) * v)
                     + s * z)
    assert torch.equal(stochastic_step(x, v, t, t_next, 0.5, z), want)
    assert euler_step(x, v, t, t_next).dtype == dtype
    # what rounding in half precision would give differs: the test can tell the two apart
    assert not torch.equal(euler_step(x, v, t, t_next), x + (t_next - t) * v)
