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

One more, `area`, is held out: `choose_rasteriser` never draws it, so training data never
holds its images, and the held-out evaluation draws its scenes with it alone.

| name   | anti-aliased | how a pixel is decided                                                    |
|--------|--------------|---------------------------------------------------------------------------|
| `area` | yes          | the exact share of the pixel's area inside the shape, integrated          |
|        |              | analytically (no samples), blended with the background                    |

Objects sit at integer positions, so a rasteriser is fully described by one coverage mask
(values in [0, 1]) per (shape, size); masks are computed once and cached.
"""

from __future__ import annotations

import random
from functools import cache

import numpy as np
from PIL import Image, ImageDraw

from .world import BACKGROUND, IMAGE_SIZE, PALETTE, Scene

RASTERISERS: tuple[str, ...] = ("exact", "center", "pil", "supersample", "pil_aa")  # the training data's
HELD_OUT_RASTERISERS: tuple[str, ...] = ("area",)  # never drawn for training data
ALL_RASTERISERS: tuple[str, ...] = RASTERISERS + HELD_OUT_RASTERISERS
ANTIALIASED: frozenset[str] = frozenset({"supersample", "pil_aa", "area"})
_SUPERSAMPLE = 8  # samples per pixel side for `supersample`
_PIL_SCALE = 4  # drawing scale for `pil_aa`


def arm_width(size: int) -> int:
    """Width of a cross's arms: round(s / 3) (s / 3 is never a tie for integer s)."""
    return round(size / 3)


def choose_rasteriser(rng: random.Random | None = None, antialias: bool | None = None) -> str:
    """A training rasteriser's name (one of RASTERISERS, never a held-out one): random (within the
    anti-aliasing choice) when rng is given, else the default."""
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
    `rasteriser` names one explicitly, a held-out one (HELD_OUT_RASTERISERS) included.
    """
    if rasteriser is None:
        rasteriser = choose_rasteriser(rng, antialias)
    elif rasteriser not in ALL_RASTERISERS:
        raise ValueError(f"unknown rasteriser {rasteriser!r}; expected one of {ALL_RASTERISERS}")
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
    elif rasteriser == "area":
        mask = _area(shape, size)
    else:
        raise ValueError(f"unknown rasteriser {rasteriser!r}; expected one of {ALL_RASTERISERS}")
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


def _area(shape: str, size: int) -> np.ndarray:
    """The exact share of each pixel inside the shape, integrated analytically (the cross's arms centred)."""
    edges = np.arange(size + 1, dtype=np.float64)  # pixel i spans [edges[i], edges[i + 1]]
    lo, hi = edges[:-1], edges[1:]
    if shape == "square":
        return np.ones((size, size))
    if shape == "circle":
        return np.clip(_disc_in_boxes(size / 2, lo - size / 2, hi - size / 2), 0.0, 1.0)  # float rounding
    if shape == "cross":
        band = (size - arm_width(size)) / 2
        inside = np.clip(np.minimum(hi, band + arm_width(size)) - np.maximum(lo, band), 0.0, 1.0)  # (size,)
        rows, cols = np.meshgrid(inside, inside, indexing="ij")
        return rows + cols - rows * cols  # the two arms' union: each pixel's share of either, less the overlap
    if shape == "triangle":
        return np.array([[_triangle_in_pixel(size, x, y) for x in lo] for y in lo])
    raise ValueError(f"unknown shape {shape!r}")


def _triangle_in_pixel(size: int, x: float, y: float) -> float:
    """Area of the upward triangle (apex (s/2, 0), base y = s) inside the pixel [x, x+1] x [y, y+1].

    At depth t the triangle spans [s/2 - t/2, s/2 + t/2]; its overlap with [x, x+1] is linear in t between
    the depths where an end crosses a pixel edge, so the trapezoid rule between those depths is exact.
    """
    half = size / 2
    crossings = [2 * abs(edge - half) for edge in (x, x + 1)]  # depths at which the span reaches an edge
    depths = sorted({y, y + 1.0, *(t for t in crossings if y < t < y + 1)})

    def overlap(t: float) -> float:
        return max(0.0, min(x + 1, half + t / 2) - max(x, half - t / 2))

    return sum((b - a) * (overlap(a) + overlap(b)) / 2 for a, b in zip(depths, depths[1:], strict=False))


def _disc_in_boxes(r: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Area of the disc of radius r at the origin inside each pixel [lo[j], hi[j]] x [lo[i], hi[i]]: (n, n).

    By inclusion-exclusion over corners from `_disc_beyond`, the disc's area where X >= a and Y >= b.
    """
    y0, x0 = np.meshgrid(lo, lo, indexing="ij")
    y1, x1 = np.meshgrid(hi, hi, indexing="ij")
    return (_disc_beyond(r, x0, y0) - _disc_beyond(r, x1, y0) - _disc_beyond(r, x0, y1)
            + _disc_beyond(r, x1, y1))


def _disc_beyond(r: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Area of the disc of radius r at the origin where X >= a and Y >= b (elementwise over a, b)."""

    def strip(x: np.ndarray) -> np.ndarray:  # integral of the half-chord sqrt(r^2 - t^2) from 0 to x
        x = np.clip(x, -r, r)
        return (x * np.sqrt(r * r - x * x) + r * r * np.arcsin(x / r)) / 2

    def above(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # b >= 0: integral of (half-chord - b) where positive
        w = np.sqrt(np.maximum(0.0, r * r - b * b))
        start = np.clip(a, -w, w)
        return strip(w) - strip(start) - b * (w - start)

    # b < 0: the part where X >= a, less the mirror image of the part where Y < b
    return np.where(b >= 0, above(a, np.abs(b)), 2 * (strip(r) - strip(a)) - above(a, np.abs(b)))
