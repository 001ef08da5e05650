"""Decoders: 64 CLIP feature tokens (B, 64, C) -> pixels (B, 3, H, W) in [0, 1].

BLIP3-o generates an image as the 64 CLIP tokens of that image; a diffusion decoder turns
them into pixels. The decoder is pluggable: a config names its `kind`, `build_decoder`
builds it (also under `with torch.device("meta"):`), and every decoder has one interface,
`Decoder` (`base.py`): `decode` (sampling, with classifier-free guidance), `loss` (training) and
`init_buffers` (after a meta build and `load_state_dict(assign=True)`). This module holds the registry
of kinds and their presets.

Kinds:
- `sdxl-unet`: the Emu2-Gen / official BLIP3-o decoder, an SDXL UNet reading the tokens
  through cross-attention, SDXL's VAE, a diffusers noise schedule (`sdxl_unet.py`).
- `shapes`: a small pixel-space flow-matching UNet for the Shapes world (`shapes.py`).
"""

from __future__ import annotations

from typing import Any

from blip3o.configs import config_from_dict
from blip3o.decoder.base import NUM_TOKENS, Decoder, SamplingSettings, drop_mask
from blip3o.decoder.sdxl_unet import SdxlUnetDecoder, SdxlUnetDecoderConfig
from blip3o.decoder.shapes import ShapesDecoder, ShapesDecoderConfig

DecoderConfig = SdxlUnetDecoderConfig | ShapesDecoderConfig

_KINDS: dict[str, tuple[type, type]] = {
    "sdxl-unet": (SdxlUnetDecoderConfig, SdxlUnetDecoder),
    "shapes": (ShapesDecoderConfig, ShapesDecoder),
}

DECODER_PRESETS: dict[str, DecoderConfig] = {
    # Emu2-Gen / official BLIP3-o: SDXL UNet + VAE reading EVA-CLIP-E tokens (C = 1792), 1024 px.
    "sdxl-unet": SdxlUnetDecoderConfig(),
    # The same code path at toy width: runs on a CPU in about a second. Change token_width with
    # dataclasses.replace(DECODER_PRESETS["debug-sdxl-unet"], token_width=...).
    "debug-sdxl-unet": SdxlUnetDecoderConfig(
        token_width=32,
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1),
        attention_head_dim=(2, 2),
        norm_num_groups=8,
        addition_time_embed_dim=8,
        sample_size=16,
        vae_block_out_channels=(16, 32),
        vae_layers_per_block=1,
        vae_norm_num_groups=8,
        default_steps=4,
        default_size=32,
    ),
    # The nano model's decoder: pixel-space flow matching on 64 x 64 Shapes images.
    "shapes": ShapesDecoderConfig(),
}


def decoder_config_from_dict(d: dict[str, Any]) -> DecoderConfig:
    """Config of the kind named by d["kind"]; fields left out keep that kind's defaults."""
    return config_from_dict({kind: classes[0] for kind, classes in _KINDS.items()}, d, "decoder")


def build_decoder(config: DecoderConfig) -> Decoder:
    """The decoder a config describes, randomly initialised (or on meta under `torch.device("meta")`)."""
    for config_class, decoder_class in _KINDS.values():
        if type(config) is config_class:
            return decoder_class(config)
    raise TypeError(f"build_decoder takes a DecoderConfig ({sorted(_KINDS)}), got {type(config).__name__}")


__all__ = [
    "DECODER_PRESETS",
    "NUM_TOKENS",
    "Decoder",
    "DecoderConfig",
    "SamplingSettings",
    "SdxlUnetDecoder",
    "SdxlUnetDecoderConfig",
    "ShapesDecoder",
    "ShapesDecoderConfig",
    "build_decoder",
    "decoder_config_from_dict",
    "drop_mask",
]
