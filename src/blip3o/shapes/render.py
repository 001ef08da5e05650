"""Scene -> 64x64 RGB image, with several rasterisers of the same spec.

The spec fixes the geometry (inscribed disc, full box, upward triangle, plus with arms of
width round(s / 3)) but leaves open how edges meet the pixel grid and whether they are
anti-aliased. Models are judged on other renderers' images too, so training data mixes:

| name          | anti-aliased | how a pixel is decided                                             |
|---------------|--------------|--------------------------------------------------------------------|
| `exact`       | no           | pixel-centre test; triangle rows sampled at their lower edge, so   |
|               |              | every shape touches all four sides of its box (detected box exact) |
| `center`      | no           | plain pixel-centre test; odd cross offsets round the other way     |
| `pil`         | no           | PIL.ImageDraw polygons and ellipses on the pixel grid              |
| `supersample` | yes          | coverage from 8x8 samples per pixel, blended with the background   |
| `pil_aa`      | yes          | PIL.ImageDraw at 4x, box-filtered down                             |

Objects sit at integer positions, so a rasteriser is fully described by one coverage mask
(values in [0, 1]) per (shape, size); masks are computed once and cached.
"""

from __future__ import annotations

import random
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUND, IMAGE_SIZE, PALETTE, Scene

RASTERISERS: tuple[str, ...] = ("exact", "center", "pil", "supersample", "pil_aa")
ANTIALIASED: frozenset[str] = frozenset({"supersample", "pil_aa"})
_SUPERSAMPLE = 8  # samples per pixel side for `supersample`
_PIL_SCALE = 4  # drawing scale for `pil_aa`


def arm_width(size: int) -> int:
    """Width of a cross's arms: round(s / 3) (s / 3 is never a tie for integer s)."""
    return round(size / 3)


def choose_rasteriser(rng: random.Random | None = None, antialias: bool | None = None) -> str:
    """A rasteriser name: random (within the anti-aliasing choice) when rng is given, else the default."""
    if rng is not None and not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    pool = [r for r in RASTERISERS if antialias is None or (r in ANTIALIASED) == antialias]
    if rng is None:
        return "supersample" if antialias else "exact"
    return rng.choice(pool)


def render(
    scene: Scene,
    rng: random.Random | None = None,
    antialias: bool | None = None,
    *,
    rasteriser: str | None = None,
) -> Image.Image:
    """Draw `scene` as a 64x64 RGB PIL image.

    With `rng`, the rasteriser is drawn at random (among the anti-aliased or aliased ones if
    `antialias` says which); without, `exact` (or `supersample` if antialias=True).
    `rasteriser` names one explicitly.
    """
    if rasteriser is None:
        rasteriser = choose_rasteriser(rng, antialias)
    elif rasteriser not in RASTERISERS:
        raise ValueError(f"unknown rasteriser {rasteriser!r}; expected one of {RASTERISERS}")
    elif antialias is not None and (rasteriser in ANTIALIASED) != antialias:
        raise ValueError(f"rasteriser {rasteriser!r} contradicts antialias={antialias}")
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    for o in scene.objects:
        alpha = coverage(o.shape, o.size, rasteriser)[:, :, None]  # (s, s, 1)
        region = canvas[o.y : o.y + o.size, o.x : o.x + o.size]  # (s, s, 3), a view
        region += alpha * (np.asarray(PALETTE[o.color], dtype=np.float32) - region)
    return Image.fromarray(np.rint(canvas).astype(np.uint8), mode="RGB")


@cache
def coverage(shape: str, size: int, rasteriser: str) -> np.ndarray:
    """Fraction of each pixel of an object's box that the shape covers: float32 (size, size), read-only."""
    if rasteriser == "exact":
        mask = _exact(shape, size)
    elif rasteriser == "center":
        mask = _center(shape, size)
    elif rasteriser == "pil":
        mask = _pil(shape, size, scale=1)
    elif rasteriser == "supersample":
        mask = _supersample(shape, size)
    elif rasteriser == "pil_aa":
        mask = _pil(shape, size, scale=_PIL_SCALE)
    else:
        raise ValueError(f"unknown rasteriser {rasteriser!r}; expected one of {RASTERISERS}")
    mask = np.ascontiguousarray(mask, dtype=np.float32)
    mask.setflags(write=False)
    return mask


def _inside(shape: str, size: int, px: np.ndarray, py: np.ndarray, *, band_lo: float) -> np.ndarray:
    """Continuous geometry: are the points (px, py) (box coordinates, 0..size) inside the shape?"""
    s, half = size, size / 2
    if shape == "circle":
        return (px - half) ** 2 + (py - half) ** 2 <= half**2
    if shape == "square":
        return (px >= 0) & (px <= s) & (py >= 0) & (py <= s)
    if shape == "triangle":  # apex (s/2, 0), base y = s: half-width at depth py is py / 2
        return (py <= s) & (np.abs(px - half) <= py / 2)
    if shape == "cross":
        hi = band_lo + arm_width(s)
        return ((px >= band_lo) & (px < hi)) | ((py >= band_lo) & (py < hi))
    raise ValueError(f"unknown shape {shape!r}")


def _grid(size: int, offset_x: float = 0.5, offset_y: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One sample point per pixel at (col + offset_x, row + offset_y); arrays (size, size)."""
    idx = np.arange(size, dtype=np.float64)
    py, px = np.meshgrid(idx + offset_y, idx + offset_x, indexing="ij")
    return px, py


def _exact(shape: str, size: int) -> np.ndarray:
    px, py = _grid(size)
    if shape == "triangle":
        # sample each row at its lower edge: the apex row gets 1-2 pixels, the box stays full
        px, py = _grid(size, offset_y=1.0)
    # integer arm offset: the cross's arms land exactly on pixel columns/rows
    return _inside(shape, size, px, py, band_lo=(size - arm_width(size)) // 2)


def _center(shape: str, size: int) -> np.ndarray:
    px, py = _grid(size)
    lo = (size - arm_width(size)) / 2
    if lo != int(lo):
        lo += 0.5  # the centred band sits between pixels: this one takes the lower-right pixels
    return _inside(shape, size, px, py, band_lo=lo)


def _supersample(shape: str, size: int) -> np.ndarray:
    k = _SUPERSAMPLE
    fine = np.arange(size * k, dtype=np.float64) / k + 0.5 / k  # sample positions in box units
    py, px = np.meshgrid(fine, fine, indexing="ij")
    hit = _inside(shape, size, px, py, band_lo=(size - arm_width(size)) / 2)  # (size*k, size*k)
    return hit.reshape(size, k, size, k).mean(axis=(1, 3))


def _pil(shape: str, size: int, *, scale: int) -> np.ndarray:
    n = size * scale  # draw on an n x n grid, then box-filter back to size x size
    image = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((0, 0, n - 1, n - 1), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, n - 1, n - 1), fill=255)
    elif shape == "triangle":
        draw.polygon([((n - 1) / 2, 0), (0, n - 1), (n - 1, n - 1)], fill=255)
    elif shape == "cross":
        a = arm_width(size) * scale
        lo = round((n - a) / 2)  # ties go to the even offset (Python rounding): another edge rule
        draw.rectangle((lo, 0, lo + a - 1, n - 1), fill=255)
        draw.rectangle((0, lo, n - 1, lo + a - 1), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    mask = np.asarray(image, dtype=np.float32) / 255.0
    return mask.reshape(size, scale, size, scale).mean(axis=(1, 3))
