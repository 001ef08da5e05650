"""Decoders: tokens (B, 64, C) -> pixels. Tiny random models on CPU, official sizes on meta."""

from __future__ import annotations

import copy
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
from blip3o.images import tensor_to_pil

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


def original_pipeline(d: SdxlUnetDecoder, tokens: torch.Tensor, negative: torch.Tensor | None, steps: int,
                      guidance: float, height: int, width: int, seed: int) -> torch.Tensor:
    """The original's `EmuVisualGenerationPipeline.__call__` and `decode_latents` for one image, written out
    against the diffusers UNet and VAE: its CFG batch [cond; negative], its time ids and its rounding."""
    guided = guidance > 1.0
    scheduler = make_scheduler(d.scheduler_config)
    scheduler.set_timesteps(steps)
    prompt_embeds = torch.cat([tokens, negative]) if guided else tokens
    time_ids = torch.LongTensor([1024, 1024] + [0, 0] + [height, width])
    added = {"time_ids": torch.cat([time_ids, time_ids]) if guided else time_ids,
             "text_embeds": torch.mean(prompt_embeds, dim=1)}
    shape = (1, 4, height // d.vae_downscale, width // d.vae_downscale)
    latents = torch.randn(shape, generator=seeded(seed)) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        eps = d.unet(x, t, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added).sample
        if guided:
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents).prev_sample
    return original_decode_latents(d, latents)


def original_decode_latents(d: SdxlUnetDecoder, latents: torch.Tensor) -> torch.Tensor:
    """The original's `decode_latents`, as float32 pixels in [0, 1] (B, 3, H, W)."""
    latents = 1 / d.vae.config.scaling_factor * latents
    image = d.vae.decode(latents).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    return image.float()


def shapes_by_hand(d: ShapesDecoder, tokens: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    """Euler from noise (t = 1) to data (t = 0), calling the network directly."""
    x = torch.randn(tokens.shape[0], 3, 64, 64, generator=seeded(seed))
    times = time_grid(steps)
    for t_cur, t_next in zip(times[:-1], times[1:], strict=True):
        x = x + (t_next - t_cur) * d(x, torch.full((x.shape[0],), t_cur), tokens)
    return from_model_space(x)


@torch.no_grad()
@pytest.mark.parametrize(("guidance", "height", "width"), [(3.0, 32, 32), (2.0, 24, 40), (1.0, 32, 32), (0.5, 40, 24)])
def test_sdxl_decode_is_the_original_pipeline(sdxl, guidance, height, width):
    tokens, negative = tokens_for(sdxl, batch=1, seed=13), tokens_for(sdxl, batch=1, seed=14)
    out = sdxl.decode(tokens, negative=negative, guidance=guidance, steps=3, height=height, width=width,
                      generator=seeded(3))
    assert out.shape == (1, 3, height, width)
    want = original_pipeline(sdxl, tokens, negative, 3, guidance, height, width, seed=3)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


@torch.no_grad()
def test_guidance_at_or_below_one_is_one_conditional_pass(sdxl, shapes):
    tokens = tokens_for(shapes)
    want = shapes_by_hand(shapes, tokens, steps=3, seed=3)
    for guidance in (1.0, 0.5, 0):
        torch.testing.assert_close(shapes.decode(tokens, guidance=guidance, steps=3, generator=seeded(3)), want)
    batches = []
    hook = sdxl.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        tokens = tokens_for(sdxl)
        alone = sdxl.decode(tokens, guidance=1.0, steps=2, generator=seeded(3))
        below = sdxl.decode(tokens, negative=tokens_for(sdxl, seed=1), guidance=0.5, steps=2, generator=seeded(3))
        sdxl.decode(tokens, guidance=1.01, steps=1, generator=seeded(3))
    finally:
        hook.remove()
    assert torch.equal(below, alone)
    assert batches == [2, 2, 2, 2, 4]  # the conditional batch alone at 1 and 0.5; both branches just above 1


def test_guidance_with_negative_equal_to_tokens_changes_nothing(decoder):
    # v_u + s (v_c - v_u) = v_c when both branches see the same condition.
    tokens = tokens_for(decoder)
    plain = decoder.decode(tokens, guidance=1.0, steps=2, generator=seeded(4))
    same = decoder.decode(tokens, negative=tokens, guidance=4.0, steps=2, generator=seeded(4))
    torch.testing.assert_close(same, plain, atol=1e-4, rtol=0)
    # The default negative (zeros) does change the result.
    assert not torch.allclose(decoder.decode(tokens, guidance=4.0, steps=2, generator=seeded(4)), plain)


class FirstUNetCall(Exception):
    """Raised by `first_unet_call` to stop a decode once the UNet's inputs are seen."""


def first_unet_call(decoder: SdxlUnetDecoder, **decode_kwargs) -> tuple[tuple, dict]:
    """The (args, kwargs) of the UNet's first call in `decoder.decode(**decode_kwargs)`, without running it."""
    seen = []

    def record(module, args, kwargs):
        seen.append((args, kwargs))
        raise FirstUNetCall

    hook = decoder.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with pytest.raises(FirstUNetCall):
            decoder.decode(**decode_kwargs)
    finally:
        hook.remove()
    return seen[0]


def test_sdxl_unet_sees_emu2_conditioning(sdxl):
    tokens, negative = tokens_for(sdxl, seed=5), tokens_for(sdxl, batch=1, seed=6)
    args, kwargs = first_unet_call(sdxl, tokens=tokens, guidance=1.0, steps=2, height=48, width=24,
                                   generator=seeded(0))
    assert args[0].shape == (2, 4, 24, 12)  # latents (B, 4, H / 2, W / 2): the debug VAE downscales by 2
    assert torch.equal(kwargs["encoder_hidden_states"], tokens)
    assert torch.equal(kwargs["added_cond_kwargs"]["text_embeds"], tokens.mean(1))
    # The original's size conditioning: original size 1024 x 1024, crop (0, 0), then the target (H, W).
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[1024, 1024, 0, 0, 48, 24]] * 2
    # With guidance both branches share one batch: [unconditional; conditional].
    args, kwargs = first_unet_call(sdxl, tokens=tokens, negative=negative, guidance=3.0, steps=1, size=32,
                                   generator=seeded(0))
    assert args[0].shape == (4, 4, 16, 16)
    assert torch.equal(kwargs["encoder_hidden_states"], torch.cat([negative.expand(2, -1, -1), tokens]))
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[1024, 1024, 0, 0, 32, 32]] * 4


@pytest.mark.parametrize(("height", "width"), [(64, 64), (128, 128), (1024, 1024), (1344, 768), (768, 1344)])
def test_time_ids_are_the_originals_at_every_size(sdxl, height, width):
    tokens = tokens_for(sdxl, batch=1)
    args, kwargs = first_unet_call(sdxl, tokens=tokens, steps=1, height=height, width=width, generator=seeded(0))
    assert args[0].shape[-2:] == (height // 2, width // 2)
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[1024, 1024, 0, 0, height, width]] * 2


@torch.no_grad()
def test_latents_to_pixels_rounds_as_the_original_in_bfloat16_and_float32(sdxl):
    latents = torch.randn(2, 4, 16, 24, generator=seeded(15))
    # float32: the latents are multiplied by 1 / scaling_factor, which differs from dividing in the last bit
    scaling = sdxl.vae.config.scaling_factor
    assert not torch.equal(latents * (1 / scaling), latents / scaling)
    assert torch.equal(sdxl.latents_to_pixels(latents), original_decode_latents(sdxl, latents))
    half = copy.deepcopy(sdxl).to(torch.bfloat16)
    got = pil_bytes(half.latents_to_pixels(latents))
    # the original's formula in the VAE's dtype, then float, then uint8
    want = pil_bytes(original_decode_latents(half, latents.bfloat16()))
    assert got == want
    # converting to float before the formula moves some values by a level: the test tells the two apart
    decoded = half.vae.decode(latents.bfloat16() * (1 / scaling)).sample
    assert pil_bytes((decoded.float() / 2 + 0.5).clamp(0, 1)) != want


def pil_bytes(pixels: torch.Tensor) -> list[bytes]:
    """The uint8 images `generate` would return for pixels (B, 3, H, W) in [0, 1]."""
    return [image.tobytes() for image in tensor_to_pil(pixels)]


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
    with pytest.raises(ValueError, match="steps"):
        decoder.decode(tokens, steps=0)
    with pytest.raises(ValueError, match="not both"):
        decoder.decode(tokens, size=decoder.default_size, height=decoder.default_size, steps=1)
    with pytest.raises(ValueError, match="height must be an int"):
        decoder.decode(tokens, height=32.0, steps=1)
    with pytest.raises(ValueError, match=r"pixels of shape \(2, 3, 64, 66\)"):
        decoder.loss(tokens, torch.rand(2, 3, 64, 66))


def test_sdxl_sizes_are_multiples_within_the_pixel_cap(sdxl):
    assert sdxl.size_multiple == 4  # debug: VAE downscale 2, two UNet levels
    sdxl.check_size(4, 2048)
    for (height, width), message in (((30, 32), "height 30 is not a positive multiple of 4"),
                                     ((32, 0), "width 0 is not a positive multiple of 4"),
                                     ((2048, 2052), "2052x2048 .* is 4,202,496 pixels, more than this decoder's "
                                                    "max_pixels 4,194,304")):
        with pytest.raises(ValueError, match=message):
            sdxl.check_size(height, width)
    with pytest.raises(ValueError, match="height 30 is not"):
        sdxl.decode(tokens_for(sdxl), size=30, steps=1)
    with pytest.raises(ValueError, match="width 6 is not"):
        sdxl.decode(tokens_for(sdxl), width=6, steps=1)  # the height left out is the default side
    small = build_decoder(dataclasses.replace(sdxl.config, max_pixels=32 * 48))
    small.check_size(48, 32)
    with pytest.raises(ValueError, match="max_pixels 1,536"):
        small.check_size(48, 36)
    with pytest.raises(ValueError, match="max_pixels must be positive"):
        dataclasses.replace(sdxl.config, max_pixels=0)


def test_shapes_decoder_makes_its_native_square_only(shapes):
    assert shapes.default_size == 64
    out = shapes.decode(tokens_for(shapes, batch=1), height=64, width=64, steps=1, generator=seeded(0))
    assert out.shape == (1, 3, 64, 64)
    for kwargs, got in (({"size": 32}, "32x32"), ({"height": 64, "width": 96}, "96x64"), ({"width": 48}, "48x64")):
        with pytest.raises(ValueError, match=f"makes 64x64 images only .* got {got}"):
            shapes.decode(tokens_for(shapes), steps=1, **kwargs)


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
    decoder.check_size(1024, 1024)
    decoder.check_size(1344, 768)  # SDXL's portrait bucket
    assert decoder.size_multiple == 32
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
