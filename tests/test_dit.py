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
        multiple_of=cfg.multiple_of, ffn_dim_multiplier=None, norm_eps=cfg.norm_eps,
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


@pytest.mark.parametrize("prediction", ["velocity", "sample"])
def test_loss_compares_the_output_with_its_own_target(prediction):
    cfg = dataclasses.replace(DIT_PRESETS["debug"], prediction=prediction)
    dit = DiT(cfg).eval()
    _randomize(dit)
    x_0, x_1, t, c = (torch.randn(3, 64, cfg.in_channels), torch.randn(3, 64, cfg.in_channels),
                      torch.tensor([0.9, 0.5, 0.1]), torch.randn(3, 5, cfg.cond_size))
    path = sample_path(x_0, x_1, t)
    with torch.no_grad():
        out = dit.predict(path.x_t, t, dit.prepare_condition(c))
        target = {"velocity": path.v, "sample": x_0}[prediction]
        torch.testing.assert_close(dit.loss(path, c), ((out - target) ** 2).mean())


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
        torch.testing.assert_close(dit.predict(x, t, cond), dit.predict(x, t, cond, torch.zeros_like(x)))
        assert not torch.allclose(dit.predict(x, t, cond, previous), dit.predict(x, t, cond))
        # the estimate enters as one more linear embedding added to the patch embedding
        dit.self_condition.weight.zero_()
        dit.self_condition.bias.zero_()
        expected = plain.predict(x, t, plain.prepare_condition(c))
        torch.testing.assert_close(dit.predict(x, t, cond, previous), expected)
    fresh = DiT(cfg)  # zero-initialised: a new self-conditioned DiT ignores the estimate
    assert not fresh.self_condition.weight.any() and not fresh.self_condition.bias.any()
    assert "self_condition.weight" not in DiT(DIT_PRESETS["debug"]).state_dict()  # off by default (official)


@pytest.mark.parametrize("prediction", ["velocity", "sample"])
def test_self_conditioned_loss_reads_a_gradient_free_first_estimate(prediction):
    dit, _ = _self_conditioned(prediction)
    cfg = dit.config
    x_0, x_1, t, c = (torch.randn(3, 64, cfg.in_channels), torch.randn(3, 64, cfg.in_channels),
                      torch.tensor([0.9, 0.5, 0.1]), torch.randn(3, 5, cfg.cond_size))
    path = sample_path(x_0, x_1, t)
    use = torch.tensor([True, False, True])
    with torch.no_grad():
        cond = dit.prepare_condition(c)
        first = dit.predict(path.x_t, t, cond)
        estimate = {"velocity": path.x_t - t.view(-1, 1, 1) * first, "sample": first}[prediction]
        out = dit.predict(path.x_t, t, cond, estimate * use.view(-1, 1, 1))
        target = {"velocity": path.v, "sample": x_0}[prediction]
        torch.testing.assert_close(dit.loss(path, c, use), ((out - target) ** 2).mean())
        # no mask (or nothing selected): every sample reads zeros
        zeros = ((dit.predict(path.x_t, t, cond) - target) ** 2).mean()
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


@pytest.mark.parametrize("fused", [False, True])
def test_feed_forward_silu_runs_in_float32_in_half_precision(fused, monkeypatch):
    """Lumina-Next's blocks compute the SwiGLU's SiLU in float32 and round back once (diffusers' FP32SiLU): every
    SiLU of a bfloat16 DiT reads float32, on the plain and the fused inference path."""
    import blip3o.dit as dit_module

    seen = []
    silu = torch.nn.functional.silu
    monkeypatch.setattr(dit_module.F, "silu", lambda x, *a, **k: seen.append(x.dtype) or silu(x, *a, **k))
    torch.manual_seed(0)
    dit = DiT(DIT_PRESETS["debug"]).eval()
    _randomize(dit)
    dit.to(torch.bfloat16).fuse_projections(fused)
    c, x = torch.randn(2, 5, dit.config.cond_size).bfloat16(), torch.randn(2, 64, 32).bfloat16()
    with torch.no_grad():
        out = dit.layers[0].feed_forward(x.new_ones(2, 64, dit.config.hidden_size))
        dit(x, torch.tensor([0.7, 0.2]), c)
    assert out.dtype == torch.bfloat16
    # the feed-forward's SiLUs (one a block, and the direct call) read float32; the adaLN ones stay bfloat16
    assert seen.count(torch.float32) == len(dit.layers) + 1 and torch.bfloat16 in seen
