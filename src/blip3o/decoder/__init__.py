"""Decoders: 64 CLIP feature tokens (B, 64, C) -> pixels (B, 3, H, W) in [0, 1].

BLIP3-o generates an image as the 64 CLIP tokens of that image; a diffusion decoder turns
them into pixels. The decoder is pluggable: a config names its `kind`, `build_decoder`
builds it (also under `with torch.device("meta"):`), and every decoder has one interface,
`Decoder`: `decode` (sampling, with classifier-free guidance), `loss` (training) and
`init_buffers` (after a meta build and `load_state_dict(assign=True)`).

Kinds:
- `sdxl-unet`: the Emu2-Gen / official BLIP3-o decoder, an SDXL UNet reading the tokens
  through cross-attention, SDXL's VAE, a diffusers noise schedule (`sdxl_unet.py`).
- `shapes`: a small pixel-space flow-matching UNet for the Shapes world (`shapes.py`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from blip3o.configs import config_from_dict
from blip3o.flow import Generators, drop_condition

NUM_TOKENS = 64  # the CLIP tokens of one image: an 8 x 8 grid of pooled patches, raster order


def drop_mask(batch: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(B, 1, 1) mask that is 0 for the rows whose condition is dropped (CFG training), drawn on CPU."""
    # drop_condition draws on the condition's device; a CPU generator needs a CPU tensor.
    where = generator.device if generator is not None else torch.device("cpu")
    keep = drop_condition(torch.ones(batch, 1, 1, device=where), p, generator)
    return keep.to(device)


class Decoder(nn.Module):
    """Interface of every decoder. Subclasses implement `decode`, `loss` and `check_size`.

    Attributes: `config`, `token_width` (C), `num_tokens` (64), `default_size`,
    `default_steps`, `default_guidance` (the last four read from the config), `step_noise`
    (whether sampling draws fresh noise at its steps, beyond the starting noise).
    """

    num_tokens: int = NUM_TOKENS
    step_noise: bool = True  # the safe answer; decoders whose samplers are deterministic say False

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @property
    def token_width(self) -> int:
        return self.config.token_width

    @property
    def default_size(self) -> int:
        return self.config.default_size

    @property
    def default_steps(self) -> int:
        return self.config.default_steps

    @property
    def default_guidance(self) -> float:
        return self.config.default_guidance

    def decode(
        self,
        tokens: torch.Tensor,
        *,
        negative: torch.Tensor | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        size: int | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """tokens (B, 64, C) -> pixels (B, 3, size, size) float32 in [0, 1].

        Classifier-free guidance runs both branches in one batch; `negative` (1 or B, 64, C) is
        the unconditional condition (None -> zeros, the condition dropped in training);
        guidance 1.0 runs the conditional branch only. All randomness comes from `generator` (a list
        of k generators: one per k equal consecutive groups of rows, see `blip3o.flow.draw_noise`).
        """
        raise NotImplementedError

    def loss(
        self, tokens: torch.Tensor, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training loss (scalar) of the decoder for pixels (B, 3, H, W) in [0, 1] given tokens (B, 64, C)."""
        raise NotImplementedError

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers after a meta build; decoders without any do nothing."""

    def check_size(self, size: int) -> None:
        """Raise ValueError unless the decoder can make images of side `size`."""
        raise NotImplementedError

    def check_tokens(self, tokens: torch.Tensor, *, name: str = "tokens", batch: int | None = None) -> None:
        """Raise unless `tokens` is (B, 64, token_width) floats; with `batch`, B must be 1 or `batch`."""
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
        expected = (self.num_tokens, self.token_width)
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != expected or tokens.shape[0] == 0:
            raise ValueError(
                f"{name} must have shape (B, {expected[0]}, {expected[1]}) with B >= 1, "
                f"got {tuple(tokens.shape)}"
            )
        if not tokens.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {tokens.dtype}")
        if batch is not None and tokens.shape[0] not in (1, batch):
            raise ValueError(f"{name} has batch {tokens.shape[0]}; it must be 1 or {batch} (that of tokens)")

    def check_pixels(self, pixels: torch.Tensor, batch: int) -> None:
        """Raise unless `pixels` is (batch, 3, S, S) floats at a size this decoder makes."""
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            raise TypeError("pixels must be a floating point torch.Tensor in [0, 1]")
        if pixels.ndim != 4 or pixels.shape[0] != batch or pixels.shape[1] != 3:
            raise ValueError(f"pixels must have shape ({batch}, 3, H, W), got {tuple(pixels.shape)}")
        if pixels.shape[2] != pixels.shape[3]:
            raise ValueError(f"pixels must be square, got {pixels.shape[2]}x{pixels.shape[3]}")
        self.check_size(pixels.shape[2])

    def sampling_args(
        self,
        tokens: torch.Tensor,
        negative: torch.Tensor | None,
        steps: int | None,
        guidance: float | None,
        size: int | None,
    ) -> tuple[torch.Tensor | None, int, float, int]:
        """Validate decode's arguments and fill in defaults: (negative, steps, guidance, size).

        negative is (B, 64, C), or None when guidance is 1 (one conditional pass); a None
        negative otherwise becomes zeros, the condition that training drops to.
        """
        self.check_tokens(tokens)
        steps = self.default_steps if steps is None else steps
        guidance = self.default_guidance if guidance is None else guidance
        size = self.default_size if size is None else size
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance!r}")
        if isinstance(size, bool) or not isinstance(size, int):
            raise ValueError(f"size must be an int (the side in pixels), got {size!r}")
        self.check_size(size)
        if negative is not None:
            self.check_tokens(negative, name="negative", batch=tokens.shape[0])
        if float(guidance) == 1.0:
            return None, steps, 1.0, size
        if negative is None:
            negative = torch.zeros_like(tokens)
        negative = negative.to(device=tokens.device, dtype=tokens.dtype)
        return negative.expand(tokens.shape[0], -1, -1), steps, float(guidance), size


# The concrete decoders subclass Decoder above, so they are imported after it.
from blip3o.decoder.sdxl_unet import SdxlUnetDecoder, SdxlUnetDecoderConfig  # noqa: E402
from blip3o.decoder.shapes import ShapesDecoder, ShapesDecoderConfig  # noqa: E402

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
    "SdxlUnetDecoder",
    "SdxlUnetDecoderConfig",
    "ShapesDecoder",
    "ShapesDecoderConfig",
    "build_decoder",
    "decoder_config_from_dict",
    "draw_noise",
    "drop_mask",
]
