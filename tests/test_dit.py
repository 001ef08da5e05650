"""DiT: parity with diffusers' Lumina-Next on the shared structure, shapes, conditions, errors."""

import dataclasses

import pytest
import torch
from diffusers import LuminaNextDiT2DModel
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

from blip3o.dit import DIT_PRESETS, DiT, DiTConfig, rope_2d
from blip3o.flow import sample_path

torch.manual_seed(0)


def _randomize(model: torch.nn.Module) -> None:
    # Non-trivial weights everywhere: zero-initialised gates and modulations would hide bugs.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)


def _diffusers_twin(cfg: DiTConfig) -> LuminaNextDiT2DModel:
    return LuminaNextDiT2DModel(
        sample_size=cfg.grid_size, patch_size=1, in_channels=cfg.in_channels, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_kv_heads=cfg.kv_heads,
        multiple_of=cfg.multiple_of, ffn_dim_multiplier=cfg.ffn_dim_multiplier, norm_eps=cfg.norm_eps,
        learn_sigma=False, qk_norm=cfg.qk_norm, cross_attention_dim=cfg.hidden_size,
    ).eval()


def _diffusers_velocity(ref, ours: DiT, x_t, t, cond, mask):
    """The reference path: our caption projection (BLIP3-o's addition), then diffusers' Lumina-Next."""
    cfg = ours.config
    grid = x_t.transpose(1, 2).reshape(x_t.shape[0], cfg.in_channels, cfg.grid_size, cfg.grid_size)
    out = ref(
        hidden_states=grid, timestep=1000 * t, encoder_hidden_states=ours.caption_projection(cond),
        encoder_mask=mask, image_rotary_emb=get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384),
        cross_attention_kwargs={},
    ).sample  # (B, C, G, G)
    return out.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_matches_diffusers_lumina_next(kv_heads):
    cfg = DiTConfig(in_channels=24, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=kv_heads,
                    cond_size=40, multiple_of=32)
    ours = DiT(cfg).eval()
    _randomize(ours)
    ref = _diffusers_twin(cfg)
    shared = {k: v for k, v in ours.state_dict().items() if not k.startswith("caption_projection.")}
    missing, unexpected = ref.load_state_dict(shared, strict=False)
    # diffusers' `pad_token` is never read by its forward (and the official BLIP3-o copy lacks it)
    assert not unexpected and missing == ["pad_token"], (missing, unexpected)
    b, l = 3, 7
    x_t, t, cond = torch.randn(b, 64, 24), torch.rand(b), torch.randn(b, l, 40)
    mask = torch.ones(b, l, dtype=torch.long)
    mask[1, 5:] = 0  # a padded condition exercises the masked pooling and cross-attention
    with torch.no_grad():
        ours_v = ours(x_t, t, cond, mask)
        ref_v = _diffusers_velocity(ref, ours, x_t, t, cond, mask)
    err = (ours_v - ref_v).abs().max().item()
    assert err < 1e-4 * ref_v.abs().max().item(), err


def test_rope_matches_lumina_table():
    ours = rope_2d(8, 16)  # (64, 8, 2) = (cos, sin)
    ref = torch.view_as_real(get_2d_rotary_pos_embed_lumina(16, 384, 384)[:8, :8].flatten(0, 1))
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=1e-5)


def test_official_parameter_count_on_meta():
    with torch.device("meta"):
        dit = DiT(DIT_PRESETS["blip3o-8b"])
    cfg = dit.config
    d, f, h, t = 1792, 4864, 3584, 1024
    assert cfg.ffn_dim == f
    attn = 3 * d * d + 2 * 2 * d  # q, k, v + LayerNorm q/k (weight, bias)
    block = (d  # cross-attention gate (heads = 28)... fixed below
             + 2 * attn + d * d  # attn1, attn2, the one to_out
             + 3 * d * f  # SwiGLU
             + (t * 4 * d + 4 * d + d)  # RMSNorm-zero linear + its norm
             + 4 * d)  # ffn_norm1, norm2, ffn_norm2, norm1_context
    block += 28 - d
    expected = (h * d + d + d * d + d  # caption projection
                + d * d + d  # patch embedder (patch 1)
                + 256 * t + t + t * t + t + 2 * d + d * t + t  # time + caption embedding
                + 24 * block
                + t * d + d + d * d + d)  # AdaLN-continuous out + final linear
    n = sum(p.numel() for p in dit.parameters())
    assert n == expected
    assert 1.30e9 < n < 1.42e9  # "about 1.36B"


def test_condition_cache_and_gate_init():
    cfg = DIT_PRESETS["debug"]
    dit = DiT(cfg).eval()
    assert all((b.gate == 0).all() for b in dit.layers)  # cross-attention starts closed
    _randomize(dit)
    x, t, c = torch.randn(2, 64, cfg.in_channels), torch.rand(2), torch.randn(2, 5, cfg.cond_size)
    with torch.no_grad():
        cond = dit.prepare_condition(c)
        torch.testing.assert_close(dit.velocity(x, t, cond), dit(x, t, c))
        # an all-ones mask is the same as no mask
        torch.testing.assert_close(dit(x, t, c, torch.ones(2, 5)), dit(x, t, c))


def test_padding_of_condition_is_ignored():
    cfg = DIT_PRESETS["debug"]
    dit = DiT(cfg).eval()
    _randomize(dit)
    x, t, c = torch.randn(1, 64, cfg.in_channels), torch.rand(1), torch.randn(1, 5, cfg.cond_size)
    padded = torch.cat([c, torch.randn(1, 3, cfg.cond_size)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        torch.testing.assert_close(dit(x, t, padded, mask), dit(x, t, c), atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_named():
    cfg = DIT_PRESETS["debug"]
    dit = DiT(cfg)
    with pytest.raises(ValueError, match="x_t must be"):
        dit(torch.randn(1, 63, cfg.in_channels), torch.rand(1), torch.randn(1, 4, cfg.cond_size))
    with pytest.raises(ValueError, match="cond must be"):
        dit(torch.randn(1, 64, cfg.in_channels), torch.rand(1), torch.randn(1, 4, cfg.cond_size + 1))
    with pytest.raises(ValueError, match="must match"):
        dit(torch.randn(2, 64, cfg.in_channels), torch.rand(1), torch.randn(2, 4, cfg.cond_size))
    with pytest.raises(ValueError, match="head_dim"):
        DiTConfig(hidden_size=60, num_heads=6)


def test_dtype_cast_keeps_rope_fp32():
    # Module.to(dtype) must not touch the RoPE table (it stays fp32 whatever the model's dtype)
    cfg = DIT_PRESETS["debug"]
    dit = DiT(cfg).eval()
    _randomize(dit)
    x, t, c = torch.randn(2, 64, cfg.in_channels), torch.rand(2), torch.randn(2, 5, cfg.cond_size)
    with torch.no_grad():
        ref = dit(x, t, c)
        dit.to(torch.float64).to(torch.float32)
        torch.testing.assert_close(dit(x, t, c), ref)
        low = dit.to(torch.bfloat16)(x.bfloat16(), t, c.bfloat16()).float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max()


def test_fused_projections_match_and_follow_weight_updates():
    cfg = DIT_PRESETS["debug"]
    dit = DiT(cfg).eval()
    _randomize(dit)
    x, t, c = torch.randn(2, 64, cfg.in_channels), torch.rand(2), torch.randn(2, 5, cfg.cond_size)
    with torch.no_grad():
        ref = dit(x, t, c)
        dit.fuse_projections()
        torch.testing.assert_close(dit(x, t, c), ref, atol=1e-5, rtol=1e-5)
        dit.layers[0].feed_forward.linear_1.weight.mul_(2)  # an in-place update must refresh the copies
        changed = dit(x, t, c)
        dit.fuse_projections(False)
        torch.testing.assert_close(changed, dit(x, t, c), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed, ref)


def test_sample_prediction_reads_the_output_as_clean_tokens():
    """prediction="sample": the network outputs x_0 and velocity() is (x_t - x_0) / t, so one Euler step
    from t to 0 lands exactly on the network's clean tokens."""
    cfg = dataclasses.replace(DIT_PRESETS["debug"], prediction="sample")
    dit = DiT(cfg).eval()
    _randomize(dit)
    x, t, c = torch.randn(3, 64, cfg.in_channels), torch.tensor([1.0, 0.5, 0.25]), torch.randn(3, 5, cfg.cond_size)
    with torch.no_grad():
        cond = dit.prepare_condition(c)
        x_0 = dit.predict(x, t, cond)
        v = dit.velocity(x, t, cond)
        torch.testing.assert_close(v, (x - x_0) / t.view(-1, 1, 1))
        torch.testing.assert_close(x - t.view(-1, 1, 1) * v, x_0, rtol=1e-5, atol=1e-5)
        # the default reads the same output as the velocity itself
        velocity_dit = DiT(DIT_PRESETS["debug"]).eval()
        velocity_dit.load_state_dict(dit.state_dict())
        torch.testing.assert_close(velocity_dit.velocity(x, t, velocity_dit.prepare_condition(c)), x_0)
    with pytest.raises(ValueError, match="prediction"):
        DiTConfig(prediction="noise")


def test_preconditioning_is_exact_and_gives_unit_variance_targets():
    from blip3o.dit import Preconditioning

    g = torch.Generator().manual_seed(0)
    for s in (0.5, 1.0, 2.0):
        t = torch.tensor([0.02, 0.3, 0.7, 1.0])
        x_0 = s * torch.randn(4, 4096, 8, generator=g)
        x_1 = torch.randn(4, 4096, 8, generator=g)
        x_t = sample_path(x_0, x_1, t).x_t
        pre = Preconditioning(t, s)
        target = pre.target(x_t, x_0)
        torch.testing.assert_close(pre.clean(x_t, target), x_0, rtol=1e-4, atol=1e-4)  # F = target gives x_0 back
        torch.testing.assert_close(target.var(dim=(1, 2)), torch.ones(4), rtol=0.05, atol=0.0)  # unit variance
        torch.testing.assert_close((pre.c_in * x_t).var(dim=(1, 2)), torch.ones(4), rtol=0.05, atol=0.0)
    # t = 0: the clean tokens are x_t itself, whatever the network says; t = 1: the network's output
    edge = Preconditioning(torch.tensor([0.0, 1.0]), 1.0)
    x, out = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    clean = edge.clean(x, out)
    torch.testing.assert_close(clean[0], x[0])
    torch.testing.assert_close(clean[1], out[1])


def test_preconditioned_velocity_reads_the_clean_tokens():
    from blip3o.dit import Preconditioning

    cfg = dataclasses.replace(DIT_PRESETS["debug"], prediction="preconditioned", data_std=0.8)
    dit = DiT(cfg).eval()
    _randomize(dit)
    x, t, c = torch.randn(3, 64, cfg.in_channels), torch.tensor([1.0, 0.5, 0.25]), torch.randn(3, 5, cfg.cond_size)
    with torch.no_grad():
        cond = dit.prepare_condition(c)
        x_0 = Preconditioning(t, 0.8).clean(x, dit.predict(x, t, cond))
        # one Euler step from t to 0 lands on the clean tokens
        torch.testing.assert_close(x - t.view(-1, 1, 1) * dit.velocity(x, t, cond), x_0, rtol=1e-5, atol=1e-5)
        # the network reads c_in x_t: the raw network on the scaled input gives the same output
        plain = DiT(dataclasses.replace(cfg, prediction="sample")).eval()
        plain.load_state_dict(dit.state_dict())
        torch.testing.assert_close(dit.predict(x, t, cond),
                                   plain.predict(x * Preconditioning(t, 0.8).c_in, t, plain.prepare_condition(c)))
    with pytest.raises(ValueError, match="data_std"):
        DiTConfig(prediction="preconditioned", data_std=0.0)


@pytest.mark.parametrize("prediction", ["velocity", "sample", "preconditioned"])
def test_loss_compares_the_output_with_its_own_target(prediction):
    cfg = dataclasses.replace(DIT_PRESETS["debug"], prediction=prediction)
    dit = DiT(cfg).eval()
    _randomize(dit)
    x_0, x_1, t, c = (torch.randn(3, 64, cfg.in_channels), torch.randn(3, 64, cfg.in_channels),
                      torch.tensor([0.9, 0.5, 0.1]), torch.randn(3, 5, cfg.cond_size))
    path = sample_path(x_0, x_1, t)
    with torch.no_grad():
        out = dit.predict(path.x_t, t, dit.prepare_condition(c))
        # preconditioned: F's target is (t x_0 - (1 - t) x_1) / sqrt((1 - t)^2 + t^2) at data_std 1
        a, b = (1 - t).view(-1, 1, 1), t.view(-1, 1, 1)
        target = {"velocity": path.v, "sample": x_0,
                  "preconditioned": (b * x_0 - a * x_1) / (a * a + b * b).sqrt()}[prediction]
        torch.testing.assert_close(dit.loss(path, c), ((out - target) ** 2).mean())


def test_token_whitening_gives_unit_variance_and_inverts_exactly():
    from blip3o.dit import TokenWhitening

    g = torch.Generator().manual_seed(0)
    c = 16
    # a few strong shared directions and many weak ones, like contrastive tokens of a small world
    scales = torch.tensor([4.0] * 3 + [0.3] * 9 + [1e-4] * 4)
    basis = torch.linalg.qr(torch.randn(c, c, generator=g))[0]
    x = (torch.randn(20000, c, generator=g) * scales) @ basis.T + 2.0
    white = TokenWhitening(c, eps=1e-2)
    assert not white.is_fitted
    white.fit(x)
    assert white.is_fitted
    z = white(x)
    var = torch.linalg.eigvalsh(torch.cov(z.T.double())).flip(0)
    # directions far above eps come out with unit variance; those far below it stay small
    torch.testing.assert_close(var[:3], torch.ones(3, dtype=torch.float64), atol=0.03, rtol=0)
    assert ((var[3:12] - 0.09 / 0.1).abs() < 0.05).all()
    assert (var[12:] < 1e-5).all()
    torch.testing.assert_close(z.mean(0), torch.zeros(c), atol=1e-3, rtol=0)
    torch.testing.assert_close(white.inverse(z), x, atol=1e-4, rtol=0)
    half = TokenWhitening(c, eps=1e-2)
    half.load_state_dict(white.state_dict())
    half.to(torch.float16)  # a model cast to fp16 (as shipped) still whitens in fp32
    assert half(x.half()).dtype == torch.float16
    torch.testing.assert_close(half.inverse(half(x.half())).float(), x, atol=0.05, rtol=0.01)
    with pytest.raises(ValueError, match="at least 32 token vectors"):
        TokenWhitening(c, 1e-2).fit(x[:10])


def test_token_whitening_is_off_by_default_and_must_be_fitted_before_use():
    plain = DiT(DIT_PRESETS["debug"])
    assert plain.token_whitening is None
    x = torch.randn(2, 64, 32)
    assert plain.to_model_space(x) is x and plain.to_tokens(x) is x
    white = DiT(dataclasses.replace(DIT_PRESETS["debug"], token_whitening=0.01))
    assert {"token_whitening.mean", "token_whitening.whiten", "token_whitening.color",
            "token_whitening.fitted"} <= set(white.state_dict())
    with pytest.raises(RuntimeError, match="not fitted"):
        white.to_model_space(x)
    with pytest.raises(ValueError, match="token_whitening must be >= 0"):
        DiTConfig(token_whitening=-1.0)


# --- self-conditioning ---------------------------------------------------------------------------


def _self_conditioned(prediction: str = "sample") -> tuple[DiT, DiT]:
    """A randomised self-conditioned debug DiT and its plain twin with the same shared weights."""
    cfg = dataclasses.replace(DIT_PRESETS["debug"], prediction=prediction, self_condition=True)
    dit = DiT(cfg).eval()
    _randomize(dit)
    plain = DiT(dataclasses.replace(cfg, self_condition=False)).eval()
    plain.load_state_dict({k: v for k, v in dit.state_dict().items() if not k.startswith("self_condition.")})
    return dit, plain


def test_self_condition_embeds_the_previous_estimate_and_starts_as_the_plain_dit():
    dit, plain = _self_conditioned()
    cfg = dit.config
    x, t, c = torch.randn(2, 64, cfg.in_channels), torch.tensor([0.8, 0.3]), torch.randn(2, 5, cfg.cond_size)
    previous = torch.randn(2, 64, cfg.in_channels)
    with torch.no_grad():
        cond = dit.prepare_condition(c)
        # None reads zeros: only the embedding's bias is added
        torch.testing.assert_close(dit.predict(x, t, cond), dit.predict(x, t, cond, None, torch.zeros_like(x)))
        assert not torch.allclose(dit.predict(x, t, cond, None, previous), dit.predict(x, t, cond))
        # the estimate enters as one more linear embedding added to the patch embedding
        dit.self_condition.weight.zero_()
        dit.self_condition.bias.zero_()
        expected = plain.predict(x, t, plain.prepare_condition(c))
        torch.testing.assert_close(dit.predict(x, t, cond, None, previous), expected)
    fresh = DiT(cfg)  # zero-initialised: a new self-conditioned DiT ignores the estimate
    assert not fresh.self_condition.weight.any() and not fresh.self_condition.bias.any()
    assert "self_condition.weight" not in DiT(DIT_PRESETS["debug"]).state_dict()  # off by default (official)


@pytest.mark.parametrize("prediction", ["velocity", "sample", "preconditioned"])
def test_self_conditioned_loss_reads_a_gradient_free_first_estimate(prediction):
    from blip3o.dit import Preconditioning

    dit, _ = _self_conditioned(prediction)
    cfg = dit.config
    x_0, x_1, t, c = (torch.randn(3, 64, cfg.in_channels), torch.randn(3, 64, cfg.in_channels),
                      torch.tensor([0.9, 0.5, 0.1]), torch.randn(3, 5, cfg.cond_size))
    path = sample_path(x_0, x_1, t)
    use = torch.tensor([True, False, True])
    with torch.no_grad():
        cond = dit.prepare_condition(c)
        pre = Preconditioning(t, cfg.data_std) if prediction == "preconditioned" else None
        first = dit.predict(path.x_t, t, cond, pre)
        estimate = {"velocity": path.x_t - t.view(-1, 1, 1) * first, "sample": first,
                    "preconditioned": pre.clean(path.x_t, first) if pre else None}[prediction]
        out = dit.predict(path.x_t, t, cond, pre, estimate * use.view(-1, 1, 1))
        target = {"velocity": path.v, "sample": x_0,
                  "preconditioned": pre.target(path.x_t, x_0) if pre else None}[prediction]
        torch.testing.assert_close(dit.loss(path, c, use), ((out - target) ** 2).mean())
        # no mask (or nothing selected): every sample reads zeros
        zeros = ((dit.predict(path.x_t, t, cond, pre) - target) ** 2).mean()
        torch.testing.assert_close(dit.loss(path, c), zeros)
        torch.testing.assert_close(dit.loss(path, c, torch.zeros(3, dtype=torch.bool)), zeros)
    # gradients flow through the second pass only
    dit.train()
    dit.loss(path, c, use).backward()
    assert dit.self_condition.weight.grad is not None and dit.self_condition.weight.grad.abs().sum() > 0


def test_condition_select_equals_the_condition_of_those_rows():
    dit, _ = _self_conditioned()
    c = torch.randn(4, 5, dit.config.cond_size)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [1, 1, 0, 0, 0], [1] * 5]).bool()
    rows = torch.tensor([0, 2])
    with torch.no_grad():
        got, want = dit.prepare_condition(c, mask).select(rows), dit.prepare_condition(c[rows], mask[rows])
        one = dit.prepare_condition(c[:1])
    torch.testing.assert_close(got.context, want.context)
    assert torch.equal(got.mask, want.mask)
    for (k, v), (k2, v2) in zip(got.cross_kv, want.cross_kv, strict=True):
        torch.testing.assert_close(k, k2)
        torch.testing.assert_close(v, v2)
    assert one.select(rows) is one  # a batch-1 condition broadcasts to any rows


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_self_conditioned_sampling_feeds_each_step_the_last_guided_estimate(guidance):
    dit, _ = _self_conditioned()
    cfg = dit.config
    c = torch.randn(2, 5, cfg.cond_size)
    x_a, x_b = torch.randn(2, 64, cfg.in_channels), torch.randn(2, 64, cfg.in_channels)
    t_a, t_b = torch.full((2,), 0.9), torch.full((2,), 0.6)
    with torch.no_grad():
        v = dit.sampling_velocity(c, guidance)
        v_a, v_b = v(x_a, t_a), v(x_b, t_b)
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
        # a new sampling velocity starts again from zeros
        again = dit.sampling_velocity(c, guidance)(x_b, t_b)
        torch.testing.assert_close(again, manual(x_b, t_b, torch.zeros_like(x_b)))


# --- absolute position ---------------------------------------------------------------------------


def test_sincos_2d_encodes_row_then_column():
    from blip3o.dit import sincos_2d

    table = sincos_2d(8, 16)  # (64, 16): channels 0-7 the row, 8-15 the column; sines then cosines
    assert table.shape == (64, 16) and table.dtype == torch.float32
    freqs = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    for n in (0, 9, 23, 63):
        row, col = divmod(n, 8)
        expected = torch.cat([torch.sin(row * freqs), torch.cos(row * freqs), torch.sin(col * freqs),
                              torch.cos(col * freqs)]).float()
        torch.testing.assert_close(table[n], expected)
    assert len({tuple(r.tolist()) for r in table}) == 64  # every cell has its own code


def test_absolute_position_adds_the_table_to_the_patch_embedding():
    from blip3o.dit import sincos_2d

    cfg = dataclasses.replace(DIT_PRESETS["debug"], absolute_position=True)
    dit = DiT(cfg).eval()
    _randomize(dit)
    plain = DiT(dataclasses.replace(cfg, absolute_position=False)).eval()
    plain.load_state_dict(dit.state_dict())  # no parameters of its own: the same state dict
    assert set(dit.state_dict()) == set(DiT(DIT_PRESETS["debug"]).state_dict())
    x, t, c = torch.randn(2, 64, cfg.in_channels), torch.tensor([0.8, 0.3]), torch.randn(2, 5, cfg.cond_size)
    with torch.no_grad():
        got = dit.predict(x, t, dit.prepare_condition(c))
        assert not torch.allclose(got, plain.predict(x, t, plain.prepare_condition(c)))
        # the same as the plain DiT with the table added to its patch embedding's output, cell by cell
        table = sincos_2d(8, cfg.hidden_size)
        hook = plain.patch_embedder.proj.register_forward_hook(lambda module, args, out: out + table)
        torch.testing.assert_close(got, plain.predict(x, t, plain.prepare_condition(c)))
        hook.remove()


# --- modulations computed before the sampling loop -------------------------------------------------


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("variant", ["plain", "self_condition", "quantized", "preconditioned"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampling_with_precomputed_modulations_matches_per_step(method, variant, guidance):
    from blip3o.flow import call_times, sample, time_grid

    cfg = DIT_PRESETS["debug"]
    if variant == "self_condition":
        cfg = dataclasses.replace(cfg, self_condition=True, prediction="sample")
    elif variant == "quantized":
        cfg = dataclasses.replace(cfg, quantize_timesteps=True)
    elif variant == "preconditioned":
        cfg = dataclasses.replace(cfg, prediction="preconditioned", data_std=0.7)
    torch.manual_seed(0)  # the same weights whatever ran before
    dit = DiT(cfg).eval()
    _randomize(dit)
    # float64: what is left is the summation order of a GEMM over more rows, far below any wrong modulation
    dit = dit.double()
    c = torch.randn(3, 5, cfg.cond_size, dtype=torch.float64)
    x = torch.randn(3, 64, cfg.in_channels, dtype=torch.float64)
    times = time_grid(6, 2.0)
    with torch.no_grad():
        per_step, calls = dit.sampling_velocity(c, guidance), []

        def recorded(x_t, t):
            calls.append((x_t, t, per_step(x_t, t)))
            return calls[-1][2]

        sample(recorded, x, times, method)
        # the same calls (the per-step loop's inputs, one after another) with the modulations computed up front
        velocity = dit.sampling_velocity(c, guidance, times=call_times(times, method))
        assert len(calls) == len(call_times(times, method))
        for x_t, t, want in calls:
            torch.testing.assert_close(velocity(x_t, t), want, rtol=1e-10, atol=1e-10 * want.abs().max().item())
        with pytest.raises(RuntimeError, match="prepared for"):  # one call more than the times given
            velocity(x, torch.full((3,), 0.1))


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
        v = dit.sampling_velocity(c, 1.0, times=times)  # falls back to per-step modulations: no call limit
        for _ in range(4):
            v(torch.randn(2, 64, dit.config.in_channels), torch.full((2,), 0.5))
