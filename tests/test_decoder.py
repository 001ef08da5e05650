"""Decoders: tokens (B, 64, C) -> pixels. Tiny random models on CPU, official sizes on meta."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from blip3o.decoder import (
    DECODER_PRESETS,
    SdxlUnetDecoder,
    ShapesDecoder,
    ShapesDecoderConfig,
    build_decoder,
    decoder_config_from_dict,
)
from blip3o.decoder.sdxl_unet import make_scheduler
from blip3o.decoder.shapes import from_model_space
from blip3o.flow import time_grid

SDXL_UNET_PARAMS = 2_567_463_684  # published SDXL base UNet: cross-attention 2048, add-embedding input 2816
SDXL_VAE_PARAMS = 83_653_863  # SDXL VAE (same layout as SD 1.x / 2.x)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sdxl() -> SdxlUnetDecoder:
    torch.manual_seed(0)
    return build_decoder(DECODER_PRESETS["debug-sdxl-unet"])


@pytest.fixture(scope="module")
def shapes() -> ShapesDecoder:
    torch.manual_seed(0)
    decoder = build_decoder(DECODER_PRESETS["shapes"])
    # Zero-initialised outputs would make every sample the same; give the network some output.
    torch.nn.init.normal_(decoder.conv_out.weight, std=0.05)
    return decoder


@pytest.fixture(params=["sdxl", "shapes"])
def decoder(request):
    return request.getfixturevalue(request.param)


def tokens_for(decoder, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 64, decoder.token_width, generator=seeded(seed))


def test_star_import_gives_every_public_name():
    import blip3o.decoder

    namespace: dict = {}
    exec("from blip3o.decoder import *", namespace)
    missing = [name for name in blip3o.decoder.__all__ if name not in namespace]
    assert not missing, missing
    assert namespace["Decoder"] is blip3o.decoder.base.Decoder  # one base class, defined in base.py


def test_config_dict_round_trip_and_errors():
    for config in DECODER_PRESETS.values():
        d = json.loads(json.dumps(dataclasses.asdict(config)))
        assert decoder_config_from_dict(d) == config
    assert decoder_config_from_dict({"kind": "shapes", "token_width": 64}).token_width == 64
    with pytest.raises(ValueError, match="sdxl-unet"):
        decoder_config_from_dict({"kind": "vqgan"})
    with pytest.raises(ValueError, match="unknown fields"):
        decoder_config_from_dict({"kind": "shapes", "width": 3})
    with pytest.raises(ValueError, match="levels"):
        ShapesDecoderConfig(channels=(32, 64))


def test_decode_shape_range_and_seeds(decoder):
    tokens = tokens_for(decoder)
    out = decoder.decode(tokens, steps=3, generator=seeded(1))
    size = decoder.default_size
    assert out.shape == (2, 3, size, size) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out, decoder.decode(tokens, steps=3, generator=seeded(1)))
    assert not torch.equal(out, decoder.decode(tokens, steps=3, generator=seeded(2)))


def sdxl_by_hand(d: SdxlUnetDecoder, tokens: torch.Tensor, steps: int, size: int, seed: int) -> torch.Tensor:
    """Emu2-Gen's loop without guidance, calling the diffusers UNet and VAE directly."""
    scheduler = make_scheduler(d.scheduler_config)
    scheduler.set_timesteps(steps)
    side = size // 2  # the debug VAE downscales by 2
    latents = torch.randn(tokens.shape[0], 4, side, side, generator=seeded(seed)) * scheduler.init_noise_sigma
    added = {
        "text_embeds": tokens.mean(1),
        "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * tokens.shape[0], dtype=torch.float32),
    }
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        eps = d.unet(x, t, encoder_hidden_states=tokens, added_cond_kwargs=added).sample
        latents = scheduler.step(eps, t, latents).prev_sample
    image = d.vae.decode(latents / d.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)


def shapes_by_hand(d: ShapesDecoder, tokens: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """Euler from noise (t = 1) to data (t = 0), calling the network directly."""
    x = torch.randn(tokens.shape[0], 3, 64, 64, generator=seeded(seed))
    times = time_grid(steps)
    for t_cur, t_next in zip(times[:-1], times[1:], strict=True):
        x = x + (t_next - t_cur) * d(x, torch.full((x.shape[0],), t_cur), tokens)
    return from_model_space(x)


@torch.no_grad()
def test_guidance_one_is_one_conditional_pass(sdxl, shapes):
    tokens = tokens_for(sdxl)
    out = sdxl.decode(tokens, guidance=1.0, steps=3, size=32, generator=seeded(3))
    torch.testing.assert_close(out, sdxl_by_hand(sdxl, tokens, steps=3, size=32, seed=3))
    tokens = tokens_for(shapes)
    out = shapes.decode(tokens, guidance=1.0, steps=3, generator=seeded(3))
    torch.testing.assert_close(out, shapes_by_hand(shapes, tokens, steps=3, seed=3))


def test_guidance_with_negative_equal_to_tokens_changes_nothing(decoder):
    # v_u + s (v_c - v_u) = v_c when both branches see the same condition.
    tokens = tokens_for(decoder)
    plain = decoder.decode(tokens, guidance=1.0, steps=2, generator=seeded(4))
    same = decoder.decode(tokens, negative=tokens, guidance=4.0, steps=2, generator=seeded(4))
    torch.testing.assert_close(same, plain, atol=1e-4, rtol=0)
    # The default negative (zeros) does change the result.
    assert not torch.allclose(decoder.decode(tokens, guidance=4.0, steps=2, generator=seeded(4)), plain)


def test_sdxl_unet_sees_emu2_conditioning(sdxl):
    seen = []

    def record(module, args, kwargs):
        seen.append((args, kwargs))

    hook = sdxl.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        tokens, negative = tokens_for(sdxl, seed=5), tokens_for(sdxl, batch=1, seed=6)
        sdxl.decode(tokens, guidance=1.0, steps=2, size=48, generator=seeded(0))
        sdxl.decode(tokens, negative=negative, guidance=3.0, steps=1, size=32, generator=seeded(0))
    finally:
        hook.remove()
    assert len(seen) == 3
    args, kwargs = seen[0]
    assert args[0].shape == (2, 4, 24, 24)
    assert torch.equal(kwargs["encoder_hidden_states"], tokens)
    assert torch.equal(kwargs["added_cond_kwargs"]["text_embeds"], tokens.mean(1))
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[48, 48, 0, 0, 48, 48]] * 2
    # With guidance both branches share one batch: [unconditional; conditional].
    args, kwargs = seen[2]
    assert args[0].shape == (4, 4, 16, 16)
    assert torch.equal(kwargs["encoder_hidden_states"], torch.cat([negative.expand(2, -1, -1), tokens]))
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 4


def test_loss_is_finite_and_trains_only_the_denoiser(decoder):
    decoder.zero_grad(set_to_none=True)
    pixels = torch.rand(2, 3, decoder.default_size, decoder.default_size, generator=seeded(7))
    loss = decoder.loss(tokens_for(decoder), pixels, generator=seeded(8))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    trained = [p for p in decoder.parameters() if p.grad is not None]
    assert trained and all(torch.isfinite(p.grad).all() for p in trained)
    if isinstance(decoder, SdxlUnetDecoder):
        assert all(p.grad is None for p in decoder.vae.parameters())
    assert torch.equal(loss, decoder.loss(tokens_for(decoder), pixels, generator=seeded(8)))
    decoder.zero_grad(set_to_none=True)


def test_bad_inputs_raise_clear_errors(decoder):
    tokens = tokens_for(decoder)
    width = decoder.token_width
    ints = torch.zeros(2, 64, width, dtype=torch.long)
    for bad in (tokens[0], tokens[:, :63], torch.randn(2, 64, width + 1), ints):
        with pytest.raises((ValueError, TypeError), match="tokens"):
            decoder.decode(bad, steps=1)
    with pytest.raises(ValueError, match="negative"):
        decoder.decode(tokens, negative=torch.zeros(3, 64, width), steps=1)
    bad_size = 30 if isinstance(decoder, SdxlUnetDecoder) else 32
    with pytest.raises(ValueError, match="size"):
        decoder.decode(tokens, size=bad_size, steps=1)
    with pytest.raises(ValueError, match="steps"):
        decoder.decode(tokens, steps=0)
    with pytest.raises(ValueError, match="pixels"):
        decoder.loss(tokens, torch.rand(2, 3, decoder.default_size, decoder.default_size + 8))


def attention_blocks(layers: int, transformer_layers: tuple[int, ...]) -> list[int]:
    """Transformer blocks per UNet level (down, mid and up paths together) in SDXL's layout."""
    down = [layers * n for n in transformer_layers]
    up = [(layers + 1) * n for n in transformer_layers]
    mid = [0] * (len(transformer_layers) - 1) + [transformer_layers[-1]]
    return [d + u + m for d, u, m in zip(down, up, mid, strict=True)]


def test_official_sizes_on_meta():
    config = DECODER_PRESETS["sdxl-unet"]
    with torch.device("meta"):
        decoder = build_decoder(config)
        sdxl = UNet2DConditionModel(**{**_sdxl_kwargs(), "cross_attention_dim": 2048})
    assert all(p.is_meta for p in decoder.parameters())
    assert sum(p.numel() for p in sdxl.parameters()) == SDXL_UNET_PARAMS
    # Ours differs from SDXL only in the cross-attention keys/values (2048 -> 1792 inputs, no bias)
    # and the add-embedding's first Linear (2816 -> 1792 + 6 * 256 inputs).
    blocks = attention_blocks(2, (0, 2, 10))  # level 0 has no attention
    kv = 2 * (2048 - 1792) * sum(n * c for n, c in zip(blocks, (320, 640, 1280), strict=True))
    add_embedding = (1792 + 6 * 256 - 2816) * 1280
    expected = SDXL_UNET_PARAMS - kv + add_embedding
    assert expected == 2_525_520_644
    assert sum(p.numel() for p in decoder.unet.parameters()) == expected
    assert sum(p.numel() for p in decoder.vae.parameters()) == SDXL_VAE_PARAMS
    assert (decoder.token_width, decoder.default_size, decoder.default_steps, decoder.default_guidance) == (
        1792, 1024, 50, 3.0,
    )
    decoder.check_size(1024)
    assert decoder.scheduler_config["_class_name"] == "EulerDiscreteScheduler"


def _sdxl_kwargs() -> dict:
    from blip3o.decoder.sdxl_unet import unet_kwargs

    return {**unet_kwargs(DECODER_PRESETS["sdxl-unet"]), "projection_class_embeddings_input_dim": 2816}


def test_meta_build_then_assign_gives_same_decoder(decoder):
    with torch.device("meta"):
        twin = build_decoder(decoder.config)
    twin.load_state_dict(decoder.state_dict(), assign=True)
    twin.init_buffers()
    tokens = tokens_for(decoder)
    expected = decoder.decode(tokens, steps=2, generator=seeded(9))
    torch.testing.assert_close(twin.decode(tokens, steps=2, generator=seeded(9)), expected, atol=0, rtol=0)


def test_from_diffusers_folder(sdxl, tmp_path):
    sdxl.unet.save_pretrained(tmp_path / "unet")
    sdxl.vae.save_pretrained(tmp_path / "vae")
    make_scheduler(sdxl.scheduler_config).save_pretrained(tmp_path / "scheduler")
    loaded = SdxlUnetDecoder.from_diffusers_folder(tmp_path, default_steps=4, default_size=32)
    assert dataclasses.replace(loaded.config, scheduler=sdxl.config.scheduler) == sdxl.config
    loaded_schedule, schedule = (make_scheduler(d.scheduler_config).config for d in (loaded, sdxl))
    assert {k: v for k, v in loaded_schedule.items() if k[0] != "_"} == {
        k: v for k, v in schedule.items() if k[0] != "_"
    }
    tokens = tokens_for(sdxl)
    expected = sdxl.decode(tokens, steps=2, generator=seeded(10))
    torch.testing.assert_close(loaded.decode(tokens, steps=2, generator=seeded(10)), expected, atol=0, rtol=0)


def toy_scenes(batch: int) -> torch.Tensor:
    """Flat coloured squares on the Shapes background, (B, 3, 64, 64) in [0, 1]."""
    pixels = torch.full((batch, 3, 64, 64), 240 / 255)
    colours = torch.tensor([[220, 40, 40], [40, 70, 210], [40, 170, 60], [230, 200, 30]]) / 255
    for i in range(batch):
        y, x = 6 + 10 * i, 40 - 8 * i
        pixels[i, :, y : y + 16, x : x + 16] = colours[i % 4].view(3, 1, 1)
    return pixels


def test_shapes_decoder_learns_a_tiny_batch():
    torch.manual_seed(0)
    config = ShapesDecoderConfig(token_width=16, channels=(16, 16, 32, 32), head_dim=16, embed_dim=32)
    decoder = build_decoder(config)
    tokens, pixels = torch.randn(4, 64, 16, generator=seeded(11)), toy_scenes(4)

    def held_out_loss() -> float:
        with torch.no_grad():
            return sum(decoder.loss(tokens, pixels, generator=seeded(100 + i)).item() for i in range(4)) / 4

    before = held_out_loss()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    for step in range(100):
        loss = decoder.loss(tokens, pixels, generator=seeded(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    assert after < 0.5 * before, (before, after)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_is_device_independent(decoder):
    tokens = tokens_for(decoder)
    expected = decoder.decode(tokens, steps=2, generator=seeded(12))
    on_gpu = decoder.to("cuda").decode(tokens.cuda(), steps=2, generator=seeded(12))
    decoder.to("cpu")
    torch.testing.assert_close(on_gpu.cpu(), expected, atol=2e-3, rtol=0)


def test_shapes_decoder_channels_last_gives_the_same_loss_gradients_and_images(shapes):
    pixels = torch.rand(3, 3, 64, 64, generator=seeded(3))
    tokens = tokens_for(shapes, batch=3, seed=4)

    def run():
        shapes.zero_grad(set_to_none=True)
        loss = shapes.loss(tokens, pixels, generator=seeded(5))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in shapes.named_parameters()}
        return loss.detach(), grads, shapes.decode(tokens, steps=3, generator=seeded(6))

    want_loss, want_grads, want_images = run()
    shapes.set_channels_last(True)
    try:
        assert shapes.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        got_loss, got_grads, got_images = run()
    finally:
        shapes.set_channels_last(False)
        shapes.zero_grad(set_to_none=True)
    assert shapes.conv_in.weight.is_contiguous() and not shapes.channels_last
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(got_images, want_images, rtol=1e-4, atol=1e-5)
