"""Shapes-world edits: (source image, instruction) -> edited image, the training triplets and the exact scorer.

    draw: source scene -> Edit -> target scene -> (source image, instruction, target image)
    judge: score_edit(source objects, instruction, edited image) -> EditScore(change, preservation, passed)

The six edit types, their grammar and scoring rules are the spec's ("Edits"):

| type    | instruction                                 | the edited image must show                            |
|---------|---------------------------------------------|-------------------------------------------------------|
| recolor | `make the {shape} {color}`                  | that object in {color}, in place                      |
| remove  | `remove the {shape}`                        | no {shape} left                                       |
| add     | `add a {color} {shape} {rel} the {shape2}`  | a {color} {shape} {rel} the {shape2}, which stays     |
| move    | `move the {shape} {rel} the {shape2}`       | the {shape}, same colour and size, {rel} the {shape2} |
| swap    | `swap the {shape} and the {shape2}`         | each within 4 px of the other's old centre            |
| count   | `make it {n} {shape}s`                      | exactly n {shape}s, all of the source's colour        |

Triplet `index` of seed `s` draws from `random.Random("shapes-edit-{s}-{index}")` alone (its phrasing from a
stream of its own), so shards are the same however they are split; the held-out evaluation file draws from
`held_out_random(seed, "edit", type, i)` with the held-out rasteriser, streams no training draw uses.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
from PIL import Image

from blip3o.files import atomic_folder, save_image, write_text
from blip3o.images import admit_image

from .data import ReadStats, add_member, iter_examples
from .detect import detect
from .heldout import EVAL_SEED, HELD_OUT_RASTERISER, held_out_random
from .render import choose_rasteriser, render
from .world import (
    BORDER,
    COLORS,
    IMAGE_SIZE,
    MAX_OBJECTS,
    MAX_SIZE,
    MIN_GAP,
    MIN_SIZE,
    NUMBER_WORDS,
    POSITION_MARGIN,
    RELATIONS,
    SHAPES,
    Located,
    Obj,
    ObjSpec,
    Scene,
    plural,
    relation_holds,
    relation_margin,
    sample_scene,
    scene_errors,
)

EDIT_TYPES: tuple[str, ...] = ("recolor", "remove", "add", "move", "swap", "count")
MAX_SOURCE_OBJECTS = 3  # a source scene holds 1 to 3 objects
COUNT_RANGE = range(2, 5)  # `make it {n} {shape}s`: n is two to four
UNCHANGED_PX = 3  # "unchanged": centres at most this far apart, width and height each within this
SWAP_PX = 4  # swap: a box centre at most this far from the other's old centre
PARAPHRASE = 0.5  # share of training instructions phrased other than the spec's grammar
EDIT_SHARD_NAME = "edits-{:06d}.tar"
EDIT_FILE, EDIT_SCENES = "edits.jsonl", "scenes.jsonl"  # the evaluation folder's edit file and its scenes


class Boxed(Located, Protocol):
    """A source or edited object: a scene `Obj` or a `DetectedObj` (both have these)."""

    @property
    def box(self) -> tuple[int, int, int, int]: ...


# ---- the typed edit and its grammar -----------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """One instruction, parsed: `shape` is the object it names first, `shape2` the second (add, move, swap)."""

    type: str
    shape: str
    shape2: str | None = None
    color: str | None = None  # recolor, add
    rel: str | None = None  # add, move
    n: int | None = None  # count

    def __post_init__(self) -> None:
        if self.type not in EDIT_TYPES:
            raise ValueError(f"unknown edit type {self.type!r}; expected one of {EDIT_TYPES}")
        given = {k for k in ("shape2", "color", "rel", "n") if getattr(self, k) is not None}
        if given != _FIELDS[self.type]:
            raise ValueError(f"{self.type} takes {sorted(_FIELDS[self.type])} beside shape, got {sorted(given)}")
        for shape in filter(None, (self.shape, self.shape2)):
            if shape not in SHAPES:
                raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
        if self.shape == self.shape2:
            raise ValueError(f"{self.type} names two different shapes, got {self.shape} twice")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; expected one of {COLORS}")
        if self.rel is not None and self.rel not in RELATIONS:
            raise ValueError(f"unknown relation {self.rel!r}; expected one of {RELATIONS}")
        if self.n is not None and self.n not in COUNT_RANGE:
            raise ValueError(f"count edits ask for two to four objects, got {self.n}")

    @property
    def text(self) -> str:
        """The instruction in the spec's grammar."""
        return _TEMPLATES[self.type][0].format(**self._words())

    @property
    def shapes(self) -> tuple[str, ...]:
        """The shapes the instruction names."""
        return tuple(s for s in (self.shape, self.shape2) if s is not None)

    @property
    def asked(self) -> dict[str, int]:
        """How many objects of each named shape the edited image is asked to hold."""
        wanted = 0 if self.type == "remove" else self.n if self.type == "count" else 1
        return dict.fromkeys(self.shapes, wanted)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def _words(self) -> dict[str, str]:
        words = {"shape": self.shape, "shape2": self.shape2, "color": self.color, "rel": self.rel}
        if self.n is not None:
            words |= {"n": NUMBER_WORDS[self.n], "shapes": plural(self.shape)}
        return words


_FIELDS: dict[str, set[str]] = {"recolor": {"color"}, "remove": set(), "add": {"color", "rel", "shape2"},
                                "move": {"rel", "shape2"}, "swap": {"shape2"}, "count": {"n"}}

# the spec's grammar first, then the paraphrases training data may use instead
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolor": ("make the {shape} {color}", "turn the {shape} {color}", "change the {shape} to {color}",
                "paint the {shape} {color}", "recolor the {shape} {color}", "color the {shape} {color}"),
    "remove": ("remove the {shape}", "delete the {shape}", "erase the {shape}", "take away the {shape}",
               "get rid of the {shape}"),
    "add": ("add a {color} {shape} {rel} the {shape2}", "put a {color} {shape} {rel} the {shape2}",
            "place a {color} {shape} {rel} the {shape2}", "draw a {color} {shape} {rel} the {shape2}",
            "insert a {color} {shape} {rel} the {shape2}"),
    "move": ("move the {shape} {rel} the {shape2}", "put the {shape} {rel} the {shape2}",
             "place the {shape} {rel} the {shape2}", "shift the {shape} to be {rel} the {shape2}"),
    "swap": ("swap the {shape} and the {shape2}", "exchange the {shape} and the {shape2}",
             "switch the {shape} and the {shape2}", "swap the places of the {shape} and the {shape2}",
             "let the {shape} and the {shape2} trade places"),
    "count": ("make it {n} {shapes}", "change it to {n} {shapes}", "show {n} {shapes}",
              "make there be {n} {shapes}", "turn it into {n} {shapes}"),
}

_WORD = {
    "shape": "|".join(SHAPES),
    "shape2": "|".join(SHAPES),
    "color": "|".join(COLORS),
    "rel": "|".join(RELATIONS),
    "n": "|".join(NUMBER_WORDS[n] for n in COUNT_RANGE),
    "shapes": "|".join(plural(s) for s in SHAPES),
}
_GRAMMAR: dict[str, re.Pattern] = {
    t: re.compile(re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m[1]}>{_WORD[m[1]]})", templates[0]))
    for t, templates in _TEMPLATES.items()
}


def parse_instruction(text: str) -> Edit:
    """The spec's instruction grammar -> a typed `Edit`; case, runs of spaces and a final period are ignored.

    Raises ValueError for anything outside the grammar (a paraphrase included) or an edit it forbids
    (two equal shapes, n outside two..four).
    """
    if not isinstance(text, str):
        raise ValueError(f"an instruction is a string, got {type(text).__name__}")
    norm = " ".join(text.lower().split()).removesuffix(".").rstrip()
    for edit_type, pattern in _GRAMMAR.items():
        if match := pattern.fullmatch(norm):
            words = match.groupdict()
            if "shapes" in words:  # `make it three squares` -> n = 3, shape = square
                plurals = {plural(s): s for s in SHAPES}
                words = {"shape": plurals[words.pop("shapes")], "n": NUMBER_WORDS.index(words["n"])}
            return Edit(edit_type, **words)
    expected = "; ".join(templates[0] for templates in _TEMPLATES.values())
    raise ValueError(f"instruction {text!r} is outside the edit grammar; expected one of: {expected}")


def phrase(edit: Edit, rng: random.Random, paraphrase: float = PARAPHRASE) -> str:
    """The edit's instruction: the spec's grammar, or with chance `paraphrase` one of its phrasings at random."""
    if not 0.0 <= paraphrase <= 1.0:
        raise ValueError(f"paraphrase must be a share in [0, 1], got {paraphrase!r}")
    if rng.random() < paraphrase:
        return rng.choice(_TEMPLATES[edit.type]).format(**edit._words())
    return edit.text


# ---- the source's preconditions ---------------------------------------------------------------------


def _of(objects: Sequence[Boxed], shape: str) -> list[Boxed]:
    return [o for o in objects if o.shape == shape]


def _the(objects: Sequence[Boxed], shape: str) -> Boxed | None:
    """"The {shape}": the only object of that shape, None if there is none or several."""
    found = _of(objects, shape)
    return found[0] if len(found) == 1 else None


def source_errors(edit: Edit, source: Sequence[Boxed]) -> list[str]:
    """Why `edit` may not be asked of a source holding `source` (empty list: it may)."""
    errors = []
    if not 1 <= len(source) <= MAX_SOURCE_OBJECTS:
        errors.append(f"the source holds {len(source)} objects; an edit's source holds 1 to {MAX_SOURCE_OBJECTS}")
    if edit.type == "count":
        colors = {o.color for o in _of(source, edit.shape)}
        count = len(_of(source, edit.shape))
        if count == 0 or len(colors) > 1 or count == edit.n:
            errors.append(f"count needs at least one {edit.shape}, all one colour, and not {edit.n} of them")
        if edit.n + len(source) - count > MAX_OBJECTS:
            errors.append(f"{edit.n} {plural(edit.shape)} and the other objects make more than {MAX_OBJECTS} objects")
        return errors
    named = [edit.shape2] if edit.type == "add" else list(edit.shapes)
    errors += [f"the source holds {len(_of(source, s))} {plural(s)}; the edit names one" for s in named
               if len(_of(source, s)) != 1]
    if errors:
        return errors
    target = _the(source, edit.shape)
    if edit.type == "recolor" and target.color == edit.color:
        errors.append(f"the {edit.shape} is {edit.color} already")
    elif edit.type == "remove" and len(source) == 1:
        errors.append("removing the only object leaves no scene")
    elif edit.type == "add" and _of(source, edit.shape):
        errors.append(f"the source holds a {edit.shape} already")
    elif edit.type == "move" and relation_holds(edit.rel, target, _the(source, edit.shape2)):
        errors.append(f"the {edit.shape} is {edit.rel} the {edit.shape2} already")
    return errors


# ---- the exact scorer -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditScore:
    """An edited image's judgement: the row's condition (change), the rest kept (preservation), both (passed)."""

    type: str
    change: bool
    preservation: bool
    passed: bool


def _dims(o: Boxed) -> tuple[int, int]:
    x0, y0, x1, y1 = o.box
    return x1 - x0, y1 - y0


def _distance(a: Boxed, b: Boxed) -> float:
    return math.hypot(a.cx - b.cx, a.cy - b.cy)


def same_size(a: Boxed, b: Boxed) -> bool:
    """Box width and height each within UNCHANGED_PX."""
    return all(abs(da - db) <= UNCHANGED_PX for da, db in zip(_dims(a), _dims(b), strict=True))


def unchanged(before: Boxed, after: Boxed, color: str | None = None) -> bool:
    """Same shape, same colour (or `color` if the edit asks for it: "in place"), centres at most UNCHANGED_PX
    apart, width and height each within UNCHANGED_PX."""
    return (before.shape == after.shape and after.color == (color or before.color)
            and _distance(before, after) <= UNCHANGED_PX and same_size(before, after))


def _stays(edit: Edit, source: Sequence[Boxed], edited: Sequence[Boxed]) -> Boxed | None:
    """The {shape2} in the edited image if it stays in place, else None."""
    anchor = _the(edited, edit.shape2)
    return anchor if anchor is not None and unchanged(_the(source, edit.shape2), anchor) else None


def _recolored(edit: Edit, source: Sequence[Boxed], edited: Sequence[Boxed]) -> bool:
    after = _the(edited, edit.shape)
    return after is not None and unchanged(_the(source, edit.shape), after, color=edit.color)


def _removed(edit: Edit, source: Sequence[Boxed], edited: Sequence[Boxed]) -> bool:
    return not _of(edited, edit.shape)


def _added(edit: Edit, source: Sequence[Boxed], edited: Sequence[Boxed]) -> bool:
    anchor = _stays(edit, source, edited)
    return anchor is not None and any(o.color == edit.color and relation_holds(edit.rel, o, anchor)
                                      for o in _of(edited, edit.shape))


def _moved(edit: Edit, source: Sequence[Boxed], edited: Sequence[Boxed]) -> bool:
    anchor, before, after = _stays(edit, source, edited), _the(source, edit.shape), _the(edited, edit.shape)
    return (anchor is not None and after is not None and after.color == before.color and same_size(before, after)
            and relation_holds(edit.rel, after, anchor))


def _swapped(edit: Edit, source: Sequence[Boxed], edited: Sequence[Boxed]) -> bool:
    pairs = [(_the(source, a), _the(edited, a), _the(source, b)) for a, b in (edit.shapes, edit.shapes[::-1])]
    return all(after is not None and after.color == before.color and same_size(before, after)
               and _distance(after, other) <= SWAP_PX for before, after, other in pairs)


def _counted(edit: Edit, source: Sequence[Boxed], edited: Sequence[Boxed]) -> bool:
    color = _of(source, edit.shape)[0].color
    found = _of(edited, edit.shape)
    return len(found) == edit.n and all(o.color == color for o in found)


_CHANGE: dict[str, Callable[[Edit, Sequence[Boxed], Sequence[Boxed]], bool]] = {
    "recolor": _recolored, "remove": _removed, "add": _added, "move": _moved, "swap": _swapped, "count": _counted,
}


def preserved(edit: Edit, source: Sequence[Boxed], edited: Sequence[Boxed]) -> bool:
    """Every source object the instruction does not name is unchanged and nothing else appears: the edited
    objects of unnamed shapes are those, one to one, and a named shape has no more objects than the source
    had or the edit asks for, whichever is more."""
    kept = [o for o in source if o.shape not in edit.shapes]
    now = [o for o in edited if o.shape not in edit.shapes]
    if len(kept) != len(now):
        return False
    if not any(all(map(unchanged, kept, order)) for order in itertools.permutations(now)):
        return False
    return all(len(_of(edited, s)) <= max(len(_of(source, s)), edit.asked[s]) for s in edit.shapes)


def score_edit(source: Scene | Sequence[Boxed], instruction: str | Edit,
               edited: Image.Image | np.ndarray | Sequence[Boxed]) -> EditScore:
    """Judge an edited image (PIL, (64, 64, 3) uint8, or its detected objects) against its source (a `Scene`
    or the source image's detected objects) and the instruction (text in the spec's grammar, or an `Edit`).

    Raises ValueError if the instruction is outside the grammar or may not be asked of this source.
    """
    edit = instruction if isinstance(instruction, Edit) else parse_instruction(instruction)
    before = list(source.objects) if isinstance(source, Scene) else list(source)
    if errors := source_errors(edit, before):
        raise ValueError(f"{edit.text!r} may not be asked of this source: {'; '.join(errors)}")
    after = detect(edited) if isinstance(edited, (Image.Image, np.ndarray)) else list(edited)
    change, kept = _CHANGE[edit.type](edit, before, after), preserved(edit, before, after)
    return EditScore(edit.type, change, kept, change and kept)


def edit_scores(scores: Iterable[EditScore]) -> dict:
    """Per type {change, preservation, pass} (the share of its images), and `overall` = the mean of the
    types' pass rates (types present only)."""
    by_type: dict[str, list[EditScore]] = {}
    for s in scores:
        by_type.setdefault(s.type, []).append(s)
    out: dict = {t: {k: sum(getattr(s, field) for s in v) / len(v) for k, field in
                     (("change", "change"), ("preservation", "preservation"), ("pass", "passed"))}
                 for t, v in by_type.items()}
    out["overall"] = sum(v["pass"] for v in out.values()) / len(out) if out else 0.0
    return out


# ---- drawing triplets -------------------------------------------------------------------------------


class _Centre(NamedTuple):
    cx: float
    cy: float


def free_corners(objects: Sequence[Obj], size: int) -> list[tuple[int, int]]:
    """Every top-left corner at which a box of side `size` keeps BORDER from the edges and MIN_GAP from
    `objects`, in raster order."""
    ys, xs = np.mgrid[BORDER:IMAGE_SIZE - BORDER - size + 1, BORDER:IMAGE_SIZE - BORDER - size + 1]  # (k, k)
    ok = np.ones(xs.shape, dtype=bool)
    for o in objects:
        gx = np.maximum(np.maximum(o.x - (xs + size), xs - (o.x + o.size)), 0)
        gy = np.maximum(np.maximum(o.y - (ys + size), ys - (o.y + o.size)), 0)
        ok &= np.hypot(gx, gy) >= MIN_GAP
    return list(zip(xs[ok].tolist(), ys[ok].tolist(), strict=True))


def _place_related(rng: random.Random, others: Sequence[Obj], size: int, rel: str,
                   anchor: Obj) -> tuple[int, int] | None:
    """A random free corner for a box of `size` whose centre is `rel` the anchor, clear of the relation's
    thresholds (so every renderer's image shows it); None if there is none."""
    corners = [(x, y) for x, y in free_corners(others, size)
               if relation_holds(rel, c := _Centre(x + size / 2, y + size / 2), anchor)
               and relation_margin(c, anchor) > POSITION_MARGIN]
    return rng.choice(corners) if corners else None


def _source(rng: random.Random, named: Sequence[str], absent: Sequence[str] = (), least: int = 1) -> Scene:
    """A random scene of `least`..3 objects holding exactly one object of each `named` shape and none of
    `absent`."""
    def fits(scene: Scene) -> bool:
        return (all(len(_of(scene.objects, s)) == 1 for s in named)
                and not any(_of(scene.objects, s) for s in absent))

    n = rng.randint(max(least, len(named)), MAX_SOURCE_OBJECTS)
    return sample_scene(rng, n, objects=[ObjSpec(shape=s) for s in named], where=fits)


def _two_shapes(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(SHAPES, 2)
    return first, second


def _draw_recolor(rng: random.Random) -> tuple[Scene, Edit, Scene] | None:
    shape = rng.choice(SHAPES)
    source = _source(rng, [shape])
    obj = _the(source.objects, shape)
    edit = Edit("recolor", shape, color=rng.choice([c for c in COLORS if c != obj.color]))
    return source, edit, Scene(tuple(replace(o, color=edit.color) if o is obj else o for o in source.objects))


def _draw_remove(rng: random.Random) -> tuple[Scene, Edit, Scene] | None:
    shape = rng.choice(SHAPES)
    source = _source(rng, [shape], least=2)
    return source, Edit("remove", shape), Scene(tuple(o for o in source.objects if o.shape != shape))


def _draw_add(rng: random.Random) -> tuple[Scene, Edit, Scene] | None:
    shape, shape2 = _two_shapes(rng)
    source = _source(rng, [shape2], absent=[shape])
    edit = Edit("add", shape, shape2=shape2, color=rng.choice(COLORS), rel=rng.choice(RELATIONS))
    size = rng.randint(MIN_SIZE, MAX_SIZE)
    corner = _place_related(rng, source.objects, size, edit.rel, _the(source.objects, shape2))
    if corner is None:
        return None  # no room: draw again
    return source, edit, Scene((*source.objects, Obj(shape, edit.color, *corner, size)))


def _draw_move(rng: random.Random) -> tuple[Scene, Edit, Scene] | None:
    shape, shape2 = _two_shapes(rng)
    source = _source(rng, [shape, shape2])
    edit = Edit("move", shape, shape2=shape2, rel=rng.choice(RELATIONS))
    mover, anchor = _the(source.objects, shape), _the(source.objects, shape2)
    if relation_holds(edit.rel, mover, anchor) or relation_margin(mover, anchor) <= POSITION_MARGIN:
        return None  # already so, or too near a threshold for every renderer to agree that it is not
    others = [o for o in source.objects if o is not mover]
    corner = _place_related(rng, others, mover.size, edit.rel, anchor)
    if corner is None:
        return None
    moved = replace(mover, x=corner[0], y=corner[1])
    return source, edit, Scene(tuple(moved if o is mover else o for o in source.objects))


def _draw_swap(rng: random.Random) -> tuple[Scene, Edit, Scene] | None:
    shape, shape2 = _two_shapes(rng)
    source = _source(rng, [shape, shape2])
    a, b = _the(source.objects, shape), _the(source.objects, shape2)
    # each box centred on the other's centre (half a pixel off when the sizes differ by an odd number)
    moved = {id(a): replace(a, x=b.x + (b.size - a.size) // 2, y=b.y + (b.size - a.size) // 2),
             id(b): replace(b, x=a.x + (a.size - b.size) // 2, y=a.y + (a.size - b.size) // 2)}
    target = Scene(tuple(moved.get(id(o), o) for o in source.objects))
    if scene_errors(target):
        return None  # a larger box does not fit where the smaller one stood
    return source, Edit("swap", shape, shape2=shape2), target


def _draw_count(rng: random.Random) -> tuple[Scene, Edit, Scene] | None:
    shape, color = rng.choice(SHAPES), rng.choice(COLORS)
    have = rng.randint(1, MAX_SOURCE_OBJECTS)
    extra = rng.randint(0, MAX_SOURCE_OBJECTS - have)
    n = rng.choice([v for v in COUNT_RANGE if v != have and v + extra <= MAX_OBJECTS])
    specs = [ObjSpec(shape, color)] * have + [ObjSpec(rng.choice([s for s in SHAPES if s != shape]))
                                              for _ in range(extra)]
    source = sample_scene(rng, have + extra, objects=specs)
    objects = list(source.objects)
    if n < have:
        for gone in rng.sample(_of(objects, shape), have - n):
            objects.remove(gone)
    for _ in range(n - have):
        size = rng.randint(MIN_SIZE, MAX_SIZE)
        corners = free_corners(objects, size)
        if not corners:
            return None
        objects.append(Obj(shape, color, *rng.choice(corners), size))
    return source, Edit("count", shape, n=n), Scene(tuple(objects))


_DRAW: dict[str, Callable[[random.Random], tuple[Scene, Edit, Scene] | None]] = {
    "recolor": _draw_recolor, "remove": _draw_remove, "add": _draw_add, "move": _draw_move,
    "swap": _draw_swap, "count": _draw_count,
}


def draw_edit(rng: random.Random, edit_type: str, max_tries: int = 1000) -> tuple[Scene, Edit, Scene]:
    """A random (source scene, edit, target scene) of `edit_type` whose source meets the row's preconditions
    and whose target is the correct result, itself a valid scene."""
    if edit_type not in EDIT_TYPES:
        raise ValueError(f"unknown edit type {edit_type!r}; expected one of {EDIT_TYPES}")
    for _ in range(max_tries):
        if (drawn := _DRAW[edit_type](rng)) is not None:
            return drawn
    raise RuntimeError(f"no {edit_type} edit drawn in {max_tries} tries")


class EditTriplet(NamedTuple):
    """One training or evaluation edit: the source image, the instruction, the correct result, and the json
    metadata {type, edit, instruction, canonical, source, target, rasteriser} (scenes as `Scene.to_dict`)."""

    source: Image.Image
    instruction: str
    target: Image.Image
    meta: dict


def _triplet(rng: random.Random, edit_type: str, rasteriser: str, instruction: Callable[[Edit], str]) -> EditTriplet:
    source, edit, target = draw_edit(rng, edit_type)
    text = instruction(edit)
    meta = {"type": edit_type, "edit": edit.to_dict(), "instruction": text, "canonical": edit.text,
            "source": source.to_dict(), "target": target.to_dict(), "rasteriser": rasteriser}
    return EditTriplet(render(source, rasteriser=rasteriser), text, render(target, rasteriser=rasteriser), meta)


def make_edit(seed: int, index: int, *, edit_type: str | None = None, paraphrase: float = PARAPHRASE) -> EditTriplet:
    """Training edit `index` of `seed`: its type uniform over EDIT_TYPES (or `edit_type`), both images drawn by
    one training rasteriser chosen at random, the instruction paraphrased with chance `paraphrase`.

    Every draw comes from the stream keyed by (seed, index), the phrasing from a stream of its own, so the
    images do not depend on `paraphrase`.
    """
    rng = random.Random(f"shapes-edit-{seed}-{index}")  # str seeds hash with sha512: stable across runs
    edit_type = edit_type or rng.choice(EDIT_TYPES)
    rasteriser = choose_rasteriser(rng)
    wording = random.Random(f"shapes-edit-{seed}-{index}-phrasing")
    return _triplet(rng, edit_type, rasteriser, lambda edit: phrase(edit, wording, paraphrase))


def held_out_edit(edit_type: str, i: int, seed: int = EVAL_SEED) -> EditTriplet:
    """Evaluation edit `i` of `edit_type`: drawn from the held-out stream ("edit", type, i), both images by
    the held-out rasteriser, the instruction in the spec's grammar."""
    return _triplet(held_out_random(seed, "edit", edit_type, i), edit_type, HELD_OUT_RASTERISER,
                    lambda edit: edit.text)


# ---- files: training shards and the evaluation edit file --------------------------------------------


def write_edit_shards(out_dir: str | os.PathLike, num: int, seed: int, shard_size: int = 1000,
                      paraphrase: float = PARAPHRASE) -> list[Path]:
    """Write training edits 0 .. `num` - 1 of `seed` as `edits-000000.tar`, ... in `out_dir`; returns the paths.

    Each sample is `{key}.src.png`, `{key}.tgt.png`, `{key}.txt` (the instruction) and `{key}.json` (the
    metadata); `iter_edits` reads them back. Each shard is written to a temporary name and renamed.
    """
    if num < 1 or shard_size < 1:
        raise ValueError(f"num and shard_size must be positive, got num={num}, shard_size={shard_size}")
    if not 0.0 <= paraphrase <= 1.0:
        raise ValueError(f"paraphrase must be a share in [0, 1], got {paraphrase!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, num, shard_size)):
        paths.append(out / EDIT_SHARD_NAME.format(shard))
        tmp = paths[-1].with_name(paths[-1].name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, min(start + shard_size, num)):
                _add_edit(tar, f"{index:09d}", make_edit(seed, index, paraphrase=paraphrase))
        os.replace(tmp, paths[-1])
    return paths


def _add_edit(tar: tarfile.TarFile, key: str, triplet: EditTriplet) -> None:
    for name, image in (("src", triplet.source), ("tgt", triplet.target)):
        png = io.BytesIO()
        image.save(png, format="PNG")
        add_member(tar, f"{key}.{name}.png", png.getvalue())
    add_member(tar, f"{key}.txt", triplet.instruction.encode())
    add_member(tar, f"{key}.json", json.dumps(triplet.meta, separators=(",", ":")).encode())


def decode_edit(raw: dict) -> EditTriplet:
    """The members of one edit sample (suffix -> bytes, as webdataset groups them) -> an `EditTriplet`;
    raises if a member is missing or broken."""
    missing = sorted({"src.png", "tgt.png", "txt", "json"} - set(raw))
    if missing:
        raise ValueError(f"edit sample lacks {missing} among {sorted(raw)}")
    source, target = (admit_image(raw[k], name=f"member {k}").convert("RGB") for k in ("src.png", "tgt.png"))
    meta = json.loads(raw["json"])
    if not isinstance(meta, dict):
        raise ValueError(f"member json holds a {type(meta).__name__}, not an object")
    meta["__key__"], meta["__url__"] = raw.get("__key__"), raw.get("__url__")
    return EditTriplet(source, raw["txt"].decode("utf-8"), target, meta)


def iter_edits(urls: str | os.PathLike | Iterable[str | os.PathLike], *,
               stats: ReadStats | None = None) -> Iterator[EditTriplet]:
    """Yield the edit samples of webdataset shards in order, skipping broken ones (`iter_examples`'s reader)."""
    return iter_examples(urls, stats=stats, decode=decode_edit)


def write_edit_file(out_dir: str | os.PathLike, per_type: int, seed: int = EVAL_SEED) -> Path:
    """The held-out evaluation edits: `per_type` of each type (`held_out_edit`) as the folder `out_dir`.

    It holds `edits.jsonl` (the spec's edit file: `{"image", "instruction"}` a line, image paths relative to
    it), the source images `images/{type}-{i:04d}.png`, and `scenes.jsonl` ({type, instruction, source,
    target} a line, in the same order) to score against. The folder replaces `out_dir` whole once complete.
    Returns the path of `edits.jsonl`.
    """
    if per_type < 1:
        raise ValueError(f"per_type must be positive, got {per_type}")
    edits, scenes = [], []
    with atomic_folder(out_dir) as tmp:
        for edit_type in EDIT_TYPES:
            for i in range(per_type):
                triplet = held_out_edit(edit_type, i, seed)
                image = f"images/{edit_type}-{i:04d}.png"
                save_image(triplet.source, tmp / image)
                edits.append(json.dumps({"image": image, "instruction": triplet.instruction}))
                scenes.append(json.dumps({k: triplet.meta[k] for k in ("type", "instruction", "source", "target")}))
        write_text(tmp / EDIT_FILE, "\n".join(edits) + "\n")
        write_text(tmp / EDIT_SCENES, "\n".join(scenes) + "\n")
    return Path(out_dir) / EDIT_FILE
