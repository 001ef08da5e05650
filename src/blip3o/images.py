"""Image checks and conversions shared by every part that reads or writes pixels.

Pixels inside the library are float tensors in [0, 1], shape (B, 3, H, W); PIL images are
only the public edge. Each part that needs another range (CLIP normalisation, VAE [-1, 1])
owns that conversion itself, and so does each part that turns a PIL image into RGB: the
understanding processor composites transparency on white as transformers does, the EVA-CLIP
encoder drops alpha as the original's `convert("RGB")` does (`blip3o.clip_encoder.eva`).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Modes PIL can turn into RGB without guessing. Anything else (16-bit, float, ...) is refused.
_CONVERTIBLE_MODES = {"RGB", "RGBA", "LA", "L", "1", "P", "PA", "CMYK", "YCbCr", "RGBX", "La"}
MIN_SIDE = 8
MAX_PIXELS = 8192 * 8192
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # PIL format names `admit_image` reads by default


class ImageRejected(ValueError):
    """An image refused by `admit_image`. `reason` sorts it for whoever answers: "too_large" (bytes or
    pixels past a limit), "unsupported" (not an image, or a format not accepted) or "invalid" (undecodable,
    truncated, a mode or size the library cannot use)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def admit_image(source: bytes | str | Path, *, name: str = "image", max_bytes: int | None = None,
                max_pixels: int = MAX_PIXELS, formats: Sequence[str] = IMAGE_FORMATS) -> Image.Image:
    """Untrusted image bytes, or a path to them, -> a decoded, checked PIL image in its own mode.

    The one door every image from outside comes through (server, command line, training data). In
    order, each before the next costs anything: a path must name a regular file (a FIFO or device
    would block or never end); the encoded size against `max_bytes`; the format read from the header
    against `formats`; the pixel count declared by the header against `max_pixels`, before a pixel
    is decoded, so a decompression bomb never expands; then the decode itself under PIL's own limits
    (text and ICC chunks past 1 MiB decompressed are refused by PIL); then `check_images`. Any
    failure raises ImageRejected naming `name`.
    """
    if isinstance(source, (str, Path)):
        source = _read_image_file(Path(source), name, max_bytes)
    elif max_bytes is not None and len(source) > max_bytes:
        raise ImageRejected(f"{name} is {len(source):,} bytes; the limit is {max_bytes:,}", "too_large")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap below is the check
        try:
            image = Image.open(io.BytesIO(source))
        except Image.DecompressionBombError as e:
            raise ImageRejected(f"{name} declares too many pixels to decode ({e})", "too_large") from e
        except Image.UnidentifiedImageError as e:
            raise ImageRejected(f"{name} is not an image in a format this build reads", "unsupported") from e
        except Exception as e:  # noqa: BLE001  (untrusted bytes: whatever the parser raises, the file is bad)
            raise ImageRejected(f"{name} could not be read: {type(e).__name__}: {e}", "invalid") from e
        if image.format not in formats:
            raise ImageRejected(f"{name} is a {image.format} image; accepted: {', '.join(formats)}", "unsupported")
        w, h = image.size
        if w * h > max_pixels:
            raise ImageRejected(f"{name} is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}", "too_large")
        try:
            image.load()
        except Exception as e:  # noqa: BLE001
            raise ImageRejected(f"{name} could not be decoded (truncated or corrupt): {type(e).__name__}: {e}",
                                "invalid") from e
    try:
        return check_images([image], name=name)[0]
    except (ValueError, TypeError) as e:
        raise ImageRejected(str(e), "invalid") from e


def _read_image_file(path: Path, name: str, max_bytes: int | None) -> bytes:
    try:
        info = os.stat(path)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        raise ImageRejected(f"{name}: no readable file ({type(e).__name__})", "invalid") from e
    if not stat.S_ISREG(info.st_mode):
        raise ImageRejected(f"{name} is not a regular file", "invalid")
    if max_bytes is not None and info.st_size > max_bytes:
        raise ImageRejected(f"{name} is {info.st_size:,} bytes; the limit is {max_bytes:,}", "too_large")
    try:
        with open(path, "rb") as f:
            return f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as e:
        raise ImageRejected(f"{name} could not be read: {e.strerror or e}", "invalid") from e


def check_images(images: Sequence[Image.Image], *, name: str = "images") -> list[Image.Image]:
    """Validate a list of PIL images (sizes, a mode with an RGB reading) and return them as a list,
    unconverted: each reader of pixels converts them its own way (see the module docstring)."""
    if isinstance(images, Image.Image):
        raise TypeError(f"{name} must be a list of PIL images, got a single image: wrap it in a list")
    if not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"{name} must be a non-empty list of PIL images, got {type(images).__name__}")
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"{name}[{i}] must be a PIL.Image.Image, got {type(image).__name__}")
        w, h = image.size
        if min(w, h) < MIN_SIDE:
            raise ValueError(f"{name}[{i}] is {w}x{h}: both sides must be at least {MIN_SIDE} px")
        if w * h > MAX_PIXELS:
            raise ValueError(f"{name}[{i}] is {w}x{h}: more than {MAX_PIXELS} pixels")
        if image.mode not in _CONVERTIBLE_MODES:
            raise ValueError(
                f"{name}[{i}] has mode {image.mode!r}, which has no unambiguous RGB form; "
                f"convert it to 'RGB' first (supported: {sorted(_CONVERTIBLE_MODES)})"
            )
        out.append(image)
    return out


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a checked image; transparent pixels become white, as a viewer would show them."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def pil_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> float tensor (B, 3, H, W) in [0, 1]; transparency on white (`to_rgb`)."""
    images = [to_rgb(im) for im in check_images(images)]
    if len({im.size for im in images}) > 1:
        raise ValueError(f"images have different sizes {sorted({im.size for im in images})}; pass one size")
    arrays = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float().div_(255.0)


def tensor_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """Float tensor (B, 3, H, W) in [0, 1] -> list of RGB PIL images (values are clamped)."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels of shape (B, 3, H, W), got {tuple(pixels.shape)}")
    arrays = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arrays]


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Images of one size, row by row on a white sheet (`columns` a row); a blank 64x64 for none."""
    if not images:
        return Image.new("RGB", (64, 64), (255, 255, 255))
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid
