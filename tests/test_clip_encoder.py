"""The frozen image encoders: contract, EVA-CLIP-E layout vs the official checkpoint, exact math."""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from blip3o.clip_encoder import (
    CLIP_ENCODER_PRESETS,
    EvaClipConfig,
    ShapesEncoderConfig,
    SiglipEncoderConfig,
    build_clip_encoder,
    clip_encoder_config_from_dict,
    pool_patch_tokens,
)
from blip3o.clip_encoder.eva import EVA_MEAN, EVA_STD, eva_pixels, resize_crop_plan
from blip3o.clip_encoder.siglip import patchify
from blip3o.images import pil_to_tensor

DEBUG_SIGLIP2 = dataclasses.replace(CLIP_ENCODER_PRESETS["debug-siglip"], variant="siglip2")
SMALL = {
    "debug-eva": CLIP_ENCODER_PRESETS["debug-eva"],
    "debug-siglip": CLIP_ENCODER_PRESETS["debug-siglip"],
    "debug-siglip2": DEBUG_SIGLIP2,
    "shapes": CLIP_ENCODER_PRESETS["shapes"],
    "shapes-window": dataclasses.replace(CLIP_ENCODER_PRESETS["shapes"], window=1),
    "shapes-narrow": dataclasses.replace(CLIP_ENCODER_PRESETS["shapes"], token_dim=16),
}


def _build(config, seed: int = 0):
    torch.manual_seed(seed)
    return build_clip_encoder(config)


def _pixels(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# The contract, for every small encoder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL)
def test_encode_gives_64_frozen_deterministic_tokens(name):
    enc = _build(SMALL[name])
    x = _pixels(2, enc.image_size, enc.image_size).requires_grad_(True)
    a, b = enc.encode(x), enc.encode(x)
    assert a.shape == (2, 64, enc.width) == (2, enc.num_tokens, getattr(enc.config, "token_width", enc.config.width))
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert not a.requires_grad
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    # Batch items are independent (no cross-image leakage through the batch).
    assert torch.allclose(enc.encode(x[1:]), a[1:], atol=1e-5)


@pytest.mark.parametrize("name", SMALL)
def test_odd_input_sizes_are_resized(name):
    enc = _build(SMALL[name])
    for h, w in [(37, 53), (enc.image_size * 2 + 3, enc.image_size + 1), (9, 9)]:
        assert enc.encode(_pixels(1, h, w)).shape == (1, 64, enc.width)


@pytest.mark.parametrize("name", SMALL)
def test_encode_images_accepts_pil(name):
    enc = _build(SMALL[name])
    s = enc.image_size
    rgb = Image.fromarray((_pixels(1, s, s)[0].permute(1, 2, 0) * 255).round().byte().numpy())
    images = [rgb, Image.new("L", (s + 13, s // 2 + 5), 90), Image.new("RGBA", (20, 30), (10, 200, 30, 128))]
    tokens = enc.encode_images(images)
    assert tokens.shape == (3, 64, enc.width)
    # Same pixels through the tensor path give the same tokens.
    assert torch.allclose(tokens[:1], enc.encode(pil_to_tensor([rgb])), atol=1e-6)


@pytest.mark.parametrize("name", SMALL)
def test_bad_inputs_get_clear_errors(name):
    enc = _build(SMALL[name])
    s = enc.image_size
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc.encode(torch.rand(3, s, s))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc.encode(torch.rand(1, 1, s, s))
    with pytest.raises(TypeError, match="float"):
        enc.encode(torch.randint(0, 255, (1, 3, s, s), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        enc.encode(torch.rand(1, 3, s, s) * 255)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        enc.encode(torch.rand(1, 3, s, s) * 2 - 1)
    with pytest.raises(TypeError, match="list"):
        enc.encode_images(Image.new("RGB", (s, s)))


@pytest.mark.parametrize("name", SMALL)
def test_meta_build_then_assign_reproduces_outputs(name):
    ref = _build(SMALL[name])
    with torch.device("meta"):
        enc = build_clip_encoder(SMALL[name])
    enc.load_state_dict(ref.state_dict(), assign=True)
    enc.init_buffers()
    x = _pixels(2, 40, 40)
    assert torch.equal(enc.encode(x), ref.encode(x))
    assert not any(p.requires_grad for p in enc.parameters())


# ---------------------------------------------------------------------------------------------
# EVA-CLIP-E: the official checkpoint layout
# ---------------------------------------------------------------------------------------------


def _eva_e_param_count(c=1792, patch=14, grid=32, depth=64, mlp=15360) -> int:
    """Count written out from the official eva_vit.py modules, independently of our code."""
    patch_embed = 3 * patch * patch * c + c  # Conv2d(3, C, 14, 14) with bias
    cls_and_pos = c + (grid * grid + 1) * c
    norms = 2 * (2 * c)  # norm1, norm2: weight + bias
    attn = (c * 3 * c + 3 * c) + (c * c + c)  # fused qkv with bias, proj
    ffn = (c * mlp + mlp) + (mlp * c + c)  # fc1, fc2
    return patch_embed + cls_and_pos + depth * (norms + attn + ffn)


def test_eva_clip_e_meta_matches_official_layout():
    with torch.device("meta"):
        enc = build_clip_encoder(CLIP_ENCODER_PRESETS["eva-clip-e"])
    sd = enc.state_dict()
    assert len(sd) == 772 == 64 * 12 + 4
    n = sum(t.numel() for t in sd.values())
    assert n == _eva_e_param_count() == 4_350_208_256  # ~4.35B, ~8.7 GB in bf16
    official_shapes = {
        "patch_embed.proj.weight": (1792, 3, 14, 14),
        "patch_embed.proj.bias": (1792,),
        "cls_token": (1, 1, 1792),
        "pos_embed": (1, 1025, 1792),
        "blocks.0.norm1.weight": (1792,),
        "blocks.0.attn.qkv.weight": (5376, 1792),
        "blocks.0.attn.qkv.bias": (5376,),
        "blocks.17.attn.proj.weight": (1792, 1792),
        "blocks.63.norm2.bias": (1792,),
        "blocks.63.mlp.fc1.weight": (15360, 1792),
        "blocks.63.mlp.fc2.weight": (1792, 15360),
    }
    for key, shape in official_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    block_keys = sorted(k[len("blocks.5.") :] for k in sd if k.startswith("blocks.5."))
    assert block_keys == sorted(
        f"{m}.{p}"
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    )
    assert (enc.width, enc.image_size, enc.num_tokens) == (1792, 448, 64)


# ---------------------------------------------------------------------------------------------
# Exact math
# ---------------------------------------------------------------------------------------------


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _reference_eva_tokens(sd: dict, x: torch.Tensor, c: EvaClipConfig) -> torch.Tensor:
    """EVA-CLIP (post-norm) + drop cls + 4x4 mean, written from the formulas, in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    b, p, heads = x.shape[0], c.patch_size, c.num_heads
    patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, 3*p*p), row-major
    h = patches @ sd["patch_embed.proj.weight"].reshape(c.width, -1).T + sd["patch_embed.proj.bias"]
    h = torch.cat([sd["cls_token"].expand(b, -1, -1), h], 1) + sd["pos_embed"]
    for i in range(c.depth):
        w = {k[len(f"blocks.{i}.") :]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        q, k, v = (h @ w["attn.qkv.weight"].T + w["attn.qkv.bias"]).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, -1, heads, c.width // heads).transpose(1, 2) for t in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c.width // heads), dim=-1)
        a = (att @ v).transpose(1, 2).reshape(b, -1, c.width) @ w["attn.proj.weight"].T + w["attn.proj.bias"]
        h = h + _layer_norm(a, w["norm1.weight"], w["norm1.bias"], c.norm_eps)
        f = h @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"]
        f = 0.5 * f * (1 + torch.erf(f / math.sqrt(2)))  # exact GELU
        f = f @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"]
        h = h + _layer_norm(f, w["norm2.weight"], w["norm2.bias"], c.norm_eps)
    g = c.image_size // p
    grid = h[:, 1:].reshape(b, g, g, c.width)
    out = torch.stack(
        [grid[:, 4 * r : 4 * r + 4, 4 * s : 4 * s + 4].mean((1, 2)) for r in range(8) for s in range(8)], 1
    )
    return out.float()


@pytest.mark.parametrize("depth", [1, 2])
def test_eva_matches_hand_written_post_norm_reference(depth):
    cfg = dataclasses.replace(CLIP_ENCODER_PRESETS["debug-eva"], depth=depth)
    enc = _build(cfg)
    # Non-trivial norms and biases, so a pre-norm or missing-bias bug cannot hide.
    with torch.no_grad():
        for name, t in enc.named_parameters():
            if name.endswith("bias") or "norm" in name:
                t.copy_(torch.randn_like(t) * 0.5 + (1.0 if "norm" in name and "weight" in name else 0.0))
    pixels = _pixels(2, cfg.image_size, cfg.image_size)
    x = (pixels - torch.tensor(EVA_MEAN).view(1, 3, 1, 1)) / torch.tensor(EVA_STD).view(1, 3, 1, 1)
    expected = _reference_eva_tokens(enc.state_dict(), x, cfg)
    assert torch.allclose(enc.encode(pixels), expected, atol=1e-4, rtol=1e-4)


def test_pool_of_constant_per_patch_grid_is_exact():
    b, g, c = 2, 32, 3
    r, s = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    value = (r * g + s).double()  # patch (r, s) carries its row-major index
    x = value.reshape(1, g * g, 1).expand(b, -1, c)  # (B, 1024, C), constant over channels
    pooled = pool_patch_tokens(x, 4)
    assert pooled.shape == (b, 64, c)
    # Mean of rows 4i..4i+3 and columns 4j..4j+3 of r*32+s = (4i+1.5)*32 + 4j+1.5.
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    expected = ((4 * i + 1.5) * g + 4 * j + 1.5).double().reshape(1, 64, 1).expand(b, -1, c)
    assert torch.equal(pooled, expected)
    with pytest.raises(ValueError, match="square grid"):
        pool_patch_tokens(torch.zeros(1, 30, 2), 4)


# ---------------------------------------------------------------------------------------------
# EVA-CLIP preprocessing: the original's torchvision Resize(448, BICUBIC) + CenterCrop(448), exactly
# ---------------------------------------------------------------------------------------------

# (width, height) -> (resized width, resized height, crop left, crop top) at 448, worked out by hand with
# torchvision's formulas: long side int(448 * long / short), offset int(round((side - 448) / 2)).
RESIZE_CROP_TABLE = [
    ((640, 427), (671, 448, 112, 0)),  # 671.48 truncated; (671 - 448) / 2 = 111.5 rounds to even 112
    ((427, 640), (448, 671, 0, 112)),
    ((1000, 872), (513, 448, 32, 0)),  # 513.76 truncated
    ((872, 1000), (448, 513, 0, 32)),
    ((100, 60), (746, 448, 149, 0)),  # upscaled: 746.67 truncated
    ((60, 100), (448, 746, 0, 149)),
    ((1500, 900), (746, 448, 149, 0)),
    ((900, 1500), (448, 746, 0, 149)),
    ((500, 333), (672, 448, 112, 0)),  # 672.86 truncated
    ((1024, 683), (671, 448, 112, 0)),  # 671.70 truncated
    ((258, 256), (451, 448, 2, 0)),  # 451.5 truncated; 1.5 rounds to 2
    ((449, 448), (449, 448, 0, 0)),  # 0.5 rounds to even 0
    ((448, 448), (448, 448, 0, 0)),
    ((512, 512), (448, 448, 0, 0)),
    ((300, 300), (448, 448, 0, 0)),
    ((2000, 1999), (448, 448, 0, 0)),  # 448.22 truncated: no crop
    ((1920, 1080), (796, 448, 174, 0)),
    ((1080, 1920), (448, 796, 0, 174)),
    ((800, 600), (597, 448, 74, 0)),  # 597.33 truncated; 74.5 rounds to even 74
    ((600, 800), (448, 597, 0, 74)),
    ((2048, 1536), (597, 448, 74, 0)),
    ((256, 1024), (448, 1792, 0, 672)),
    ((1280, 720), (796, 448, 174, 0)),
]


def torchvision_resize_crop(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """torchvision's `_compute_resized_output_size` (an int size) and `center_crop`, as written there."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    crop_top = int(round((new_h - size) / 2.0))
    crop_left = int(round((new_w - size) / 2.0))
    return new_w, new_h, crop_left, crop_top


@pytest.mark.parametrize(("size", "expected"), RESIZE_CROP_TABLE)
def test_eva_resize_crop_plan_is_torchvisions(size, expected):
    plan = resize_crop_plan(*size, 448)
    assert (plan.width, plan.height, plan.left, plan.top) == expected == torchvision_resize_crop(*size, 448)


def sample_image() -> Image.Image:
    """A real image that an installed package ships (networkx, a dependency of torch): an 800x600 drawing,
    antialiased, 9,515 colours."""
    import networkx

    path = Path(networkx.__file__).parent / "drawing/tests/baseline/test_display_complex.png"
    with Image.open(path) as image:
        return image.convert("RGB")


def exif_rotated_jpeg(image: Image.Image) -> Image.Image:
    """`image` as a JPEG whose EXIF says "rotate 90 degrees" (orientation 6), decoded as a reader would."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return Image.open(io.BytesIO(buffer.getvalue()))


def in_mode(image: Image.Image, mode: str) -> Image.Image:
    if mode == "RGBA":  # a real alpha channel: a gradient from transparent to opaque
        alpha = Image.linear_gradient("L").resize(image.size)
        out = image.copy()
        out.putalpha(alpha)
        return out
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE, colors=200)
    if mode == "exif-jpeg":
        return exif_rotated_jpeg(image)
    return image.convert(mode)


def original_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """The original's processor (convert_rgb, Resize, CenterCrop, ToTensor, Normalize) written with PIL and
    torchvision's tensor steps: (3, size, size)."""
    rgb = image.convert("RGB")
    w, h, left, top = torchvision_resize_crop(rgb.width, rgb.height, size)
    rgb = rgb.resize((w, h), Image.BICUBIC).crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).contiguous().float().div(255)  # ToTensor
    mean, std = torch.as_tensor(EVA_MEAN), torch.as_tensor(EVA_STD)
    return x.sub_(mean[:, None, None]).div_(std[:, None, None])  # Normalize


EVA_448 = EvaClipConfig(image_size=448, patch_size=14, width=16, depth=1, num_heads=1, mlp_dim=32)
MODES = ["RGB", "L", "P", "CMYK", "RGBA", "exif-jpeg"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(800, 600), (640, 427), (1000, 872), (100, 60)])
def test_eva_pixels_are_the_originals_bit_for_bit(mode, size):
    image = in_mode(sample_image().resize(size, Image.BICUBIC), mode)
    expected = original_pixels(image, 448)
    assert torch.equal(eva_pixels([image], 448)[0], expected)
    enc = _build(EVA_448)
    assert torch.equal(enc.preprocess([image])[0], expected)
    # the training data path: decoded with convert("RGB"), batched as [0, 1] pixels, then the encoder
    train_pixels = pil_to_tensor([image.convert("RGB")])
    assert torch.equal(enc.prepare(train_pixels)[0], expected)
    tokens = enc.tokens(expected[None])
    assert torch.equal(enc.encode_images([image]), tokens)
    assert torch.equal(enc.encode(train_pixels), tokens)


def test_eva_drops_alpha_and_keeps_the_stored_orientation():
    image = sample_image()
    rgba = in_mode(image, "RGBA")
    assert torch.equal(eva_pixels([rgba], 448), eva_pixels([image], 448))  # the colour under alpha, not white
    jpeg = in_mode(image, "exif-jpeg")
    assert jpeg.getexif()[0x0112] == 6 and jpeg.size == image.size  # read as stored, not turned upright
    assert torch.equal(eva_pixels([jpeg], 448), eva_pixels([jpeg.convert("RGB")], 448))


def test_model_encode_images_reads_the_originals_pixels():
    from blip3o import Blip3o

    torch.manual_seed(0)
    model = Blip3o.from_preset("debug")
    image = in_mode(sample_image().resize((100, 60), Image.BICUBIC), "RGBA")
    s = model.clip_encoder.image_size
    expected = model.clip_encoder.tokens(original_pixels(image, s)[None])
    assert torch.equal(model.encode_images([image]), expected)


def test_eva_resizes_differentiable_pixels_only_at_its_size():
    enc = _build(CLIP_ENCODER_PRESETS["debug-eva"]).requires_grad_(False)
    s = enc.image_size
    enc(_pixels(1, s, s).requires_grad_(True)).sum().backward()  # S x S: normalised, with a gradient
    with pytest.raises(ValueError, match="8-bit"):
        enc(_pixels(1, s, 2 * s).requires_grad_(True))


def test_siglip2_patchify_matches_siglip_conv():
    """Siglip2's Linear patch embedding on our patchify == Siglip's Conv2d on the image."""
    v1, v2 = _build(CLIP_ENCODER_PRESETS["debug-siglip"]), _build(DEBUG_SIGLIP2, seed=3)
    sd = v1.model.state_dict()
    key = next(k for k in sd if k.endswith("patch_embedding.weight"))
    conv = sd[key]  # (C, 3, p, p) -> (C, p*p*3), channels last like patchify
    sd[key] = conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1)
    missing, unexpected = v2.model.load_state_dict(sd, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    x = _pixels(2, 48, 48)
    assert torch.allclose(v1.encode(x), v2.encode(x), atol=1e-5)
    # Patch 1 is the top row's second patch; its first pixel (0, 2) has value 2 in every channel.
    ramp = torch.arange(16.0).reshape(1, 1, 4, 4).expand(1, 3, 4, 4)
    assert patchify(ramp, 2)[0, 1, :3].tolist() == [2.0] * 3


# ---------------------------------------------------------------------------------------------
# Shapes encoder extras, configs
# ---------------------------------------------------------------------------------------------


def test_shapes_embed_is_trainable():
    enc = _build(CLIP_ENCODER_PRESETS["shapes"]).train().requires_grad_(True)
    z = enc.embed(_pixels(3, 64, 64))
    assert z.shape == (3, enc.config.embed_dim)
    z.square().sum().backward()
    assert enc.patch_embed.proj.weight.grad is not None and enc.head.weight.grad is not None


def test_shapes_pool_of_the_tokens_is_the_embedding():
    enc = _build(CLIP_ENCODER_PRESETS["shapes"])
    px = _pixels(2, 64, 64)
    torch.testing.assert_close(enc.pool(enc(px)), enc.embed(px))


def test_shapes_token_dim_narrows_the_tokens_and_the_model_follows():
    """token_dim = d: the blocks stay `width` wide, the tokens (and what pools them) are d wide; a
    Blip3oConfig must give its DiT and decoder the same token width."""
    from blip3o.model import Blip3oConfig
    from blip3o.presets import get_preset

    config = dataclasses.replace(CLIP_ENCODER_PRESETS["shapes"], token_dim=16)
    enc = _build(config)
    assert enc.width == config.token_width == 16 and CLIP_ENCODER_PRESETS["shapes"].token_width == 128
    tokens = enc.encode(_pixels(2, 64, 64))
    assert tokens.shape == (2, 64, 16)
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 64), atol=1e-5, rtol=0)  # its own LayerNorm
    assert enc.head.in_features == 16 and enc.blocks[0].mlp.fc1.in_features == config.width
    nano = get_preset("nano")
    assert nano.clip_encoder.token_width == nano.dit.in_channels == nano.decoder.token_width == 32
    with pytest.raises(ValueError, match="dit.in_channels 32 != clip_encoder.width 16"):
        dataclasses.replace(nano, clip_encoder=config)
    dataclasses.replace(nano, clip_encoder=config, dit=dataclasses.replace(nano.dit, in_channels=16),
                        decoder=dataclasses.replace(nano.decoder, token_width=16))
    assert isinstance(nano, Blip3oConfig)


@pytest.mark.parametrize("window", [1, 2])
def test_shapes_window_keeps_tokens_local(window):
    """A token depends only on patches within window x depth rows and columns of it."""
    config = dataclasses.replace(CLIP_ENCODER_PRESETS["shapes"], window=window, depth=2)
    enc = _build(config)
    px = _pixels(1, 64, 64)
    changed = px.clone()
    changed[:, :, :8, :8] = 0.5  # patch (0, 0) only
    moved = (enc.encode(px) - enc.encode(changed)).abs().amax(-1).view(8, 8)
    reach = window * config.depth
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    inside = (rows <= reach) & (cols <= reach)
    assert torch.all(moved[~inside] == 0)
    assert torch.all(moved[inside] > 0)
    # global attention (window 0) lets the one patch move every token
    glob = _build(dataclasses.replace(config, window=0))
    assert torch.all((glob.encode(px) - glob.encode(changed)).abs().amax(-1) > 0)


def test_configs_round_trip_and_reject_unknowns():
    for config in [*CLIP_ENCODER_PRESETS.values(), DEBUG_SIGLIP2]:
        assert clip_encoder_config_from_dict(dataclasses.asdict(config)) == config
    with pytest.raises(ValueError, match=r"known kinds: \['eva', 'shapes', 'siglip'\]"):
        clip_encoder_config_from_dict({"kind": "dino"})
    with pytest.raises(ValueError, match="widht"):
        clip_encoder_config_from_dict({"kind": "shapes", "widht": 3})
    with pytest.raises(ValueError, match="variant"):
        SiglipEncoderConfig(variant="siglip3")
    with pytest.raises(ValueError, match="64 tokens"):
        ShapesEncoderConfig(image_size=32)
    with pytest.raises(ValueError, match="window must be an integer >= 0"):
        ShapesEncoderConfig(window=-1)
    with pytest.raises(ValueError, match="token_dim must be an integer >= 0"):
        ShapesEncoderConfig(token_dim=-1)
    narrow = dataclasses.replace(CLIP_ENCODER_PRESETS["shapes"], token_dim=32)
    assert clip_encoder_config_from_dict(dataclasses.asdict(narrow)) == narrow
    with pytest.raises(ValueError, match="8x8"):
        EvaClipConfig(image_size=224)


def test_preset_sizes():
    counts = {}
    for name in ("siglip-so400m", "shapes"):
        with torch.device("meta"):
            enc = build_clip_encoder(name)
        counts[name] = sum(p.numel() for p in enc.parameters())
        assert not enc.training and not any(p.requires_grad for p in enc.parameters())  # built frozen
    assert counts["siglip-so400m"] == 412_987_248  # so400m vision tower without the unused head
    w, m = 128, 512  # shapes: patch 8 conv, 64 positions, 4 pre-norm blocks, final LN, embed head
    block = 4 * w + (w * 3 * w + 3 * w) + (w * w + w) + (w * m + m) + (m * w + w)
    assert counts["shapes"] == (3 * 64 * w + w) + 64 * w + 4 * block + 2 * w + (w * 128 + 128)
