"""The Shapes world's objects, scenes, relations and scene sampler.

Coordinates are pixels with y growing downward. An object is a square bounding box: its
top-left corner (x, y) and its side `size`; the box covers columns x .. x + size - 1, so as
a continuous box it is [x, x + size) and its centre is (x + size / 2, y + size / 2).
Relations only ever compare centres, so any other consistent convention gives the same answers.

Randomness always comes from an explicit `random.Random`, never the global generator.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

IMAGE_SIZE = 64  # images are IMAGE_SIZE x IMAGE_SIZE RGB
BACKGROUND = (240, 240, 240)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (230, 200, 30),
    "green": (40, 170, 60),
    "cyan": (40, 190, 200),
    "blue": (40, 70, 210),
    "purple": (150, 60, 190),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
MIN_SIZE, MAX_SIZE = 12, 18  # bounding box side, inclusive
MIN_OBJECTS, MAX_OBJECTS = 1, 4
MIN_GAP = 2  # box to box distance between objects, px
BORDER = 2  # box to image edge distance, px
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
RELATION_OFFSET = 8  # a relation needs the centres this far apart along its axis
POSITION_MARGIN = 1.0  # scenes for position prompts/questions keep pairs further than this from a threshold
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")


def plural(shape: str) -> str:
    """`circles`, `squares`, `triangles`, `crosses`."""
    return shape + ("es" if shape.endswith("s") else "s")


class Located(Protocol):
    """Anything with a box centre: a scene `Obj` or a detected object."""

    shape: str
    color: str

    @property
    def cx(self) -> float: ...

    @property
    def cy(self) -> float: ...


@dataclass(frozen=True)
class Obj:
    """One flat-coloured shape in its square bounding box (x, y = top-left, size = side)."""

    shape: str
    color: str
    x: int
    y: int
    size: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in PALETTE:
            raise ValueError(f"unknown color {self.color!r}; expected one of {COLORS}")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be in {MIN_SIZE}..{MAX_SIZE}, got {self.size}")

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) with x1, y1 exclusive."""
        return (self.x, self.y, self.x + self.size, self.y + self.size)

    @property
    def cx(self) -> float:
        return self.x + self.size / 2

    @property
    def cy(self) -> float:
        return self.y + self.size / 2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Scene:
    """The objects of one image, in drawing order (they never overlap, so order is irrelevant)."""

    objects: tuple[Obj, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))

    def to_dict(self) -> dict:
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(tuple(Obj(**o) for o in d["objects"]))


# ---- relations, on box centres -------------------------------------------------------------


def left_of(a: Located, b: Located) -> bool:
    """A left of B: B.cx - A.cx >= 8 and |B.cx - A.cx| >= |B.cy - A.cy|."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    return dx >= RELATION_OFFSET and abs(dx) >= abs(dy)


def right_of(a: Located, b: Located) -> bool:
    return left_of(b, a)


def above(a: Located, b: Located) -> bool:
    """A above B: B.cy - A.cy >= 8 and |B.cy - A.cy| >= |B.cx - A.cx|."""
    dx, dy = b.cx - a.cx, b.cy - a.cy
    return dy >= RELATION_OFFSET and abs(dy) >= abs(dx)


def below(a: Located, b: Located) -> bool:
    return above(b, a)


RELATION_PREDICATES: dict[str, Callable[[Located, Located], bool]] = {
    "left of": left_of,
    "right of": right_of,
    "above": above,
    "below": below,
}


def relation_holds(rel: str, a: Located, b: Located) -> bool:
    """Whether `a {rel} b`, rel one of RELATIONS."""
    try:
        return RELATION_PREDICATES[rel](a, b)
    except KeyError:
        raise ValueError(f"unknown relation {rel!r}; expected one of {RELATIONS}") from None


def relation_margin(a: Located, b: Located) -> float:
    """Distance of the pair from the nearest relation threshold: | |dx| - 8 |, | |dy| - 8 |, | |dx| - |dy| |."""
    dx, dy = abs(b.cx - a.cx), abs(b.cy - a.cy)
    return min(abs(dx - RELATION_OFFSET), abs(dy - RELATION_OFFSET), abs(dx - dy))


def position_safe(objects: Sequence[Located], margin: float = POSITION_MARGIN) -> bool:
    """True if no pair of objects lies within `margin` px of a relation threshold.

    Renderers may move a detected box centre by up to 1 px (anti-aliasing eats a triangle's
    apex), so only such scenes give position prompts and questions one unambiguous answer.
    """
    return all(relation_margin(a, b) > margin for i, a in enumerate(objects) for b in objects[i + 1 :])


# ---- layout ---------------------------------------------------------------------------------


def box_distance(a: Obj, b: Obj) -> float:
    """Euclidean distance between two boxes (0 if they touch or overlap)."""
    gx = max(b.x - (a.x + a.size), a.x - (b.x + b.size), 0)
    gy = max(b.y - (a.y + a.size), a.y - (b.y + b.size), 0)
    return math.hypot(gx, gy)


def scene_errors(scene: Scene) -> list[str]:
    """What makes `scene` break the spec's layout rules (empty list: it is valid)."""
    errors = []
    if not MIN_OBJECTS <= len(scene.objects) <= MAX_OBJECTS:
        errors.append(f"{len(scene.objects)} objects; a scene has {MIN_OBJECTS} to {MAX_OBJECTS}")
    for i, o in enumerate(scene.objects):
        if min(o.x, o.y) < BORDER or max(o.x, o.y) + o.size > IMAGE_SIZE - BORDER:
            errors.append(f"object {i} {o.box} is closer than {BORDER} px to the border")
        for j in range(i):
            if box_distance(o, scene.objects[j]) < MIN_GAP:
                errors.append(f"objects {j} and {i} are closer than {MIN_GAP} px")
    return errors


@dataclass(frozen=True)
class ObjSpec:
    """A partly fixed object for the sampler: None leaves that attribute random."""

    shape: str | None = None
    color: str | None = None


def _place(rng: random.Random, sizes: Sequence[int], tries: int = 200) -> list[tuple[int, int]] | None:
    """Random top-left corners for boxes of `sizes`, obeying border and gap; None if stuck."""
    placed: list[Obj] = []
    for size in sizes:
        hi = IMAGE_SIZE - BORDER - size
        for _ in range(tries):
            cand = Obj("square", "red", rng.randint(BORDER, hi), rng.randint(BORDER, hi), size)
            if all(box_distance(cand, p) >= MIN_GAP for p in placed):
                placed.append(cand)
                break
        else:
            return None
    return [(p.x, p.y) for p in placed]


def sample_scene(
    rng: random.Random,
    n: int | None = None,
    *,
    objects: Sequence[ObjSpec] = (),
    where: Callable[[Scene], bool] | None = None,
    max_tries: int = 10_000,
) -> Scene:
    """A random valid scene of `n` objects (default: uniform in 1..4).

    `objects` are required (shape and/or colour fixed); the rest are fully random. `where`
    is a constraint checked by rejection (e.g. "a circle left of a square", `position_safe`).
    Raises RuntimeError if no scene satisfies it within `max_tries`.
    """
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    if n is not None and not max(MIN_OBJECTS, len(objects)) <= n <= MAX_OBJECTS:
        raise ValueError(f"n must be in {max(MIN_OBJECTS, len(objects))}..{MAX_OBJECTS}, got {n}")
    if len(objects) > MAX_OBJECTS:
        raise ValueError(f"{len(objects)} required objects; a scene holds at most {MAX_OBJECTS}")
    for _ in range(max_tries):
        count = n if n is not None else rng.randint(max(MIN_OBJECTS, len(objects)), MAX_OBJECTS)
        specs = list(objects) + [ObjSpec()] * (count - len(objects))
        rng.shuffle(specs)  # required objects should not always come first in `objects`
        sizes = [rng.randint(MIN_SIZE, MAX_SIZE) for _ in specs]
        corners = _place(rng, sizes)
        if corners is None:
            continue
        scene = Scene(
            tuple(
                Obj(s.shape or rng.choice(SHAPES), s.color or rng.choice(COLORS), x, y, size)
                for s, size, (x, y) in zip(specs, sizes, corners, strict=True)
            )
        )
        if where is None or where(scene):
            return scene
    raise RuntimeError(f"no scene satisfied the constraint in {max_tries} tries; is it satisfiable with <= 4 objects?")
