"""The reference detector: read the objects back from a Shapes image.

    pixels -> palette index (nearest palette colour within distance 60, else background)
      -> 4-connected components of one colour with >= 40 px
      -> box, fill ratio r, upper-half share h -> shape

Components are found on horizontal runs: each row's runs of one colour are nodes, and runs
that touch vertically with the same colour are joined by a tiny union-find. A 64x64 image
has a few dozen runs, so this stays fast without scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .world import COLORS, PALETTE

MAX_COLOR_DISTANCE = 60  # a pixel within this Euclidean RGB distance of a palette colour belongs to it
MIN_PIXELS = 40  # smaller components are noise, not objects
SQUARE_FILL = 0.88  # r >= this: square
CIRCLE_FILL = 0.68  # CIRCLE_FILL <= r < SQUARE_FILL: circle
TRIANGLE_UPPER = 0.38  # otherwise: triangle if h < this, else cross

_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.int32)  # (6, 3)


@dataclass(frozen=True)
class DetectedObj:
    """One object read from an image; box = (x0, y0, x1, y1) of its pixels, x1 and y1 exclusive."""

    shape: str
    color: str
    box: tuple[int, int, int, int]
    cx: float  # box centre, same convention as world.Obj
    cy: float
    pixels: int  # component size
    fill: float  # r = pixels / box area
    upper: float  # h = share of pixels in the upper half of the box


def classify(fill: float, upper: float) -> str:
    """Shape from fill ratio r and upper-half share h, as the spec's thresholds."""
    if fill >= SQUARE_FILL:
        return "square"
    if fill >= CIRCLE_FILL:
        return "circle"
    return "triangle" if upper < TRIANGLE_UPPER else "cross"


def palette_index(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int: index into COLORS of each pixel's palette colour, -1 for none."""
    rgb = rgb.astype(np.int32)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # (H, W)
    # an image has few distinct colours: measure each once
    colors, inverse = np.unique(packed, return_inverse=True)  # (U,), (H*W,)
    unique_rgb = np.stack([colors >> 16, (colors >> 8) & 255, colors & 255], axis=-1)  # (U, 3)
    diff = unique_rgb[:, None, :] - _PALETTE_RGB  # (U, 6, 3)
    d2 = (diff * diff).sum(axis=-1)  # (U, 6) squared distances
    nearest = d2.argmin(axis=-1)  # ties: the earlier palette colour
    near_enough = d2[np.arange(len(colors)), nearest] <= MAX_COLOR_DISTANCE**2
    return np.where(near_enough, nearest, -1)[inverse.reshape(packed.shape)]


def detect(image: Image.Image | np.ndarray) -> list[DetectedObj]:
    """Objects in `image` (PIL or (H, W, 3) uint8 array), in raster order of their first pixel."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {rgb.shape}")
    labels = palette_index(rgb)  # (H, W)
    comp, rows, cols = _components(labels)  # one entry per foreground pixel
    if comp.size == 0:
        return []
    n = int(comp.max()) + 1
    count = np.bincount(comp, minlength=n)  # (n,) pixels per component
    top, left, bottom, right = _boxes(comp, rows, cols, n, labels.shape)
    upper = _upper_share(comp, rows, top, bottom - top, count)
    fill = count / ((bottom - top) * (right - left))
    color_of = np.zeros(n, dtype=np.int64)
    color_of[comp] = labels[rows, cols]
    out = []
    for c in np.flatnonzero(count >= MIN_PIXELS):
        box = (int(left[c]), int(top[c]), int(right[c]), int(bottom[c]))
        out.append(
            DetectedObj(
                shape=classify(float(fill[c]), float(upper[c])),
                color=COLORS[color_of[c]],
                box=box,
                cx=(box[0] + box[2]) / 2,
                cy=(box[1] + box[3]) / 2,
                pixels=int(count[c]),
                fill=float(fill[c]),
                upper=float(upper[c]),
            )
        )
    return out


def _boxes(comp: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int,
           shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """(top, left, bottom, right) of each of the `n` components, each (n,); bottom and right exclusive."""
    h, w = shape
    top, last_row = np.full(n, h), np.zeros(n, dtype=np.int64)
    left, last_col = np.full(n, w), np.zeros(n, dtype=np.int64)
    np.minimum.at(top, comp, rows)
    np.maximum.at(last_row, comp, rows)
    np.minimum.at(left, comp, cols)
    np.maximum.at(last_col, comp, cols)
    return top, left, last_row + 1, last_col + 1


def _upper_share(comp: np.ndarray, rows: np.ndarray, top: np.ndarray, height: np.ndarray,
                 count: np.ndarray) -> np.ndarray:
    """h of each component (n,): the share of its pixels in the upper half of its box. Rows above the
    box's middle count 1; an odd height's middle row counts half."""
    rel = rows - top[comp]
    half = height[comp] // 2
    weight = np.where(rel < half, 1.0, np.where((height[comp] % 2 == 1) & (rel == half), 0.5, 0.0))
    return np.bincount(comp, weights=weight, minlength=len(count)) / count


def _components(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-connected components of equal non-negative labels.

    Returns (comp, rows, cols) for every labelled pixel in raster order; comp numbers the
    components 0.. in raster order of their first pixel.
    """
    fg = labels >= 0  # (H, W)
    new_run = fg.copy()
    new_run[:, 1:] &= labels[:, 1:] != labels[:, :-1]  # a run starts where the colour changes
    run_id = np.cumsum(new_run).reshape(labels.shape) - 1  # (H, W), valid on fg
    n_runs = int(new_run.sum())
    # runs in consecutive rows touch where a pixel and the one below share a colour
    touch = fg[:-1] & (labels[:-1] == labels[1:])
    pairs = np.unique(run_id[:-1][touch] * n_runs + run_id[1:][touch])  # one entry per touching pair
    parent = list(range(n_runs))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    for pair in pairs.tolist():
        ra, rb = find(pair // n_runs), find(pair % n_runs)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)  # the root is the component's first run
    roots = np.array([find(i) for i in range(n_runs)], dtype=np.int64)
    _, comp_of_run = np.unique(roots, return_inverse=True)  # roots sorted = raster order of first pixel
    rows, cols = np.nonzero(fg)
    return comp_of_run[run_id[rows, cols]], rows, cols
