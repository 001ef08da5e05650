"""The frozen image encoder: pixels -> the 64 CLIP feature tokens BLIP3-o learns to generate.

    encoder = build_clip_encoder(CLIP_ENCODER_PRESETS["debug-eva"])   # built frozen
    tokens = encoder.encode(pixels)          # (B, 3, H, W) in [0, 1] -> (B, 64, encoder.width)
    tokens = encoder.encode_images(images)   # list of PIL images -> (B, 64, encoder.width)

Each encoder owns its resize, its normalisation constants and its pooling to 8x8 tokens.
Large towers are built on the meta device and filled from a checkpoint:

    with torch.device("meta"):
        encoder = build_clip_encoder(CLIP_ENCODER_PRESETS["eva-clip-e"])
    encoder.load_state_dict(state_dict, assign=True)
    encoder.init_buffers()
"""

from __future__ import annotations

from blip3o.configs import config_from_dict

from .eva import OFFICIAL_PREFIX, ClipEncoderBase, EvaClipConfig, EvaClipEncoder, pool_patch_tokens
from .shapes import ShapesEncoder, ShapesEncoderConfig
from .siglip import SiglipEncoder, SiglipEncoderConfig

ClipEncoderConfig = EvaClipConfig | SiglipEncoderConfig | ShapesEncoderConfig

_KINDS: dict[str, tuple[type, type[ClipEncoderBase]]] = {
    "eva": (EvaClipConfig, EvaClipEncoder),
    "siglip": (SiglipEncoderConfig, SiglipEncoder),
    "shapes": (ShapesEncoderConfig, ShapesEncoder),
}

CLIP_ENCODER_PRESETS: dict[str, ClipEncoderConfig] = {
    # BLIP3-o's gen_vision_tower eva-clip-E-14-plus: 448 px, 64 blocks of 1792, ~4.35B params.
    "eva-clip-e": EvaClipConfig(),
    # Same code path (post-norm, cls, 32x32 grid pooled 4x4) at a CPU-test size.
    "debug-eva": EvaClipConfig(image_size=64, patch_size=2, width=32, depth=2, num_heads=2, mlp_dim=64),
    # google/siglip-so400m-patch14-384 vision tower: 27x27 patches, adaptive-pooled to 8x8.
    "siglip-so400m": SiglipEncoderConfig(),
    # 12x12 grid: like 27x27, it does not divide by 8, so adaptive pooling is exercised.
    "debug-siglip": SiglipEncoderConfig(
        image_size=48, patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64
    ),
    # The nano model's encoder for the Shapes world.
    "shapes": ShapesEncoderConfig(),
}


def clip_encoder_config_from_dict(d: dict) -> ClipEncoderConfig:
    """Config from a plain dict (e.g. a saved JSON); `d["kind"]` picks the encoder."""
    return config_from_dict({kind: classes[0] for kind, classes in _KINDS.items()}, d, "clip encoder")


def build_clip_encoder(config: ClipEncoderConfig | str) -> ClipEncoderBase:
    """Build the encoder for `config` (or a preset name), frozen. Works under torch.device("meta")."""
    if isinstance(config, str):
        if config not in CLIP_ENCODER_PRESETS:
            raise ValueError(f"unknown clip encoder preset {config!r}; known: {sorted(CLIP_ENCODER_PRESETS)}")
        config = CLIP_ENCODER_PRESETS[config]
    if config.kind not in _KINDS or not isinstance(config, _KINDS[config.kind][0]):
        raise TypeError(f"expected one of {[c.__name__ for c, _ in _KINDS.values()]}, got {config!r}")
    return _KINDS[config.kind][1](config).freeze()


__all__ = [
    "CLIP_ENCODER_PRESETS",
    "OFFICIAL_PREFIX",
    "ClipEncoderBase",
    "ClipEncoderConfig",
    "EvaClipConfig",
    "EvaClipEncoder",
    "ShapesEncoder",
    "ShapesEncoderConfig",
    "SiglipEncoder",
    "SiglipEncoderConfig",
    "build_clip_encoder",
    "clip_encoder_config_from_dict",
    "pool_patch_tokens",
]
