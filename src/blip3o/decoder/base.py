"""The interface every decoder implements, and what all decoders share.

A decoder turns 64 CLIP feature tokens (B, 64, C) into pixels (B, 3, H, W) in [0, 1]: `decode` samples
(with classifier-free guidance), `loss` trains, `init_buffers` recomputes non-persistent buffers after a
meta build.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from blip3o.flow import Generators, drop_condition

NUM_TOKENS = 64  # the CLIP tokens of one image: an 8 x 8 grid of pooled patches, raster order


def drop_mask(batch: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(B, 1, 1) mask that is 0 for the rows whose condition is dropped (CFG training), drawn on CPU."""
    # drop_condition draws on the condition's device; a CPU generator needs a CPU tensor.
    where = generator.device if generator is not None else torch.device("cpu")
    keep = drop_condition(torch.ones(batch, 1, 1, device=where), p, generator)
    return keep.to(device)


class SamplingSettings(NamedTuple):
    """The settings of one `decode` call, checked, with the decoder's defaults filled in."""

    negative: torch.Tensor | None  # (B, 64, C) unconditional tokens; None without CFG (guidance at or below 1)
    steps: int  # sampling steps
    guidance: float  # CFG scale above 1, or 1.0: the conditional branch alone
    height: int  # output height in pixels
    width: int  # output width in pixels


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
        height: int | None = None,
        width: int | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """tokens (B, 64, C) -> pixels (B, 3, height, width) float32 in [0, 1].

        `size` asks for a square; `height` and `width` for any shape the decoder makes (a side left out is
        the decoder's default side); neither: the default square. Classifier-free guidance runs both
        branches in one batch; `negative` (1 or B, 64, C) is the unconditional condition (None -> zeros,
        the condition dropped in training). Guidance runs only above 1, as in the original pipeline
        (`guidance_scale > 1`): at or below 1 the conditional branch runs alone. All randomness comes from
        `generator` (a list of k generators: one per k equal consecutive groups of rows, see
        `blip3o.flow.draw_noise`).
        """
        raise NotImplementedError

    def loss(
        self, tokens: torch.Tensor, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training loss (scalar) of the decoder for pixels (B, 3, H, W) in [0, 1] given tokens (B, 64, C)."""
        raise NotImplementedError

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers after a meta build; decoders without any do nothing."""

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError, naming the size, unless the decoder can make images of height x width pixels."""
        raise NotImplementedError

    def resolve_size(self, size: int | None, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) in pixels of a `decode` call: `size` for a square, else `height` and `width` (a
        side left out is the default side), checked by `check_size`."""
        if size is not None and (height is not None or width is not None):
            raise ValueError(f"give size (a square's side) or height and width, not both: got size={size!r}, "
                             f"height={height!r}, width={width!r}")
        for name, value in (("size", size), ("height", height), ("width", width)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an int (pixels), got {value!r}")
        if size is not None:
            height = width = size
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        self.check_size(height, width)
        return height, width

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
        """Raise unless `pixels` is (batch, 3, H, W) floats at a size this decoder makes."""
        if not isinstance(pixels, torch.Tensor) or not pixels.is_floating_point():
            raise TypeError("pixels must be a floating point torch.Tensor in [0, 1]")
        if pixels.ndim != 4 or pixels.shape[0] != batch or pixels.shape[1] != 3:
            raise ValueError(f"pixels must have shape ({batch}, 3, H, W), got {tuple(pixels.shape)}")
        try:
            self.check_size(pixels.shape[2], pixels.shape[3])
        except ValueError as e:
            raise ValueError(f"pixels of shape {tuple(pixels.shape)}: {e}") from e

    def sampling_settings(
        self,
        tokens: torch.Tensor,
        negative: torch.Tensor | None,
        steps: int | None,
        guidance: float | None,
        size: int | None,
        height: int | None,
        width: int | None,
    ) -> SamplingSettings:
        """Validate `decode`'s arguments and fill in the decoder's defaults.

        The negative comes back (B, 64, C) on the tokens' device and dtype, or None with guidance at or
        below 1 (one conditional pass, guidance 1.0); a None negative otherwise becomes zeros, the condition
        training drops to.
        """
        self.check_tokens(tokens)
        steps = self.default_steps if steps is None else steps
        guidance = self.default_guidance if guidance is None else guidance
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance!r}")
        height, width = self.resolve_size(size, height, width)
        if negative is not None:
            self.check_tokens(negative, name="negative", batch=tokens.shape[0])
        if guidance <= 1:  # the original pipeline guides only when guidance_scale > 1
            return SamplingSettings(None, steps, 1.0, height, width)
        if negative is None:
            negative = torch.zeros_like(tokens)
        negative = negative.to(device=tokens.device, dtype=tokens.dtype)
        return SamplingSettings(negative.expand(tokens.shape[0], -1, -1), steps, float(guidance), height, width)
