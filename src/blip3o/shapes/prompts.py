"""Generation prompts: the six GenEval-style families, free scene descriptions, and `check`.

Every prompt or description becomes a `Requirement`: groups of objects that must be in the
image, optionally related. `check(requirement, objects)` decides whether an image's objects
(a `Scene`'s, or `detect(image)`'s) satisfy it, with the spec's semantics:

| tag           | prompt                                              | requirement                          |
|---------------|-----------------------------------------------------|--------------------------------------|
| single_object | a photo of a {shape}                                | >= 1 {shape}                         |
| two_object    | a photo of a {shape1} and a {shape2}                | >= 1 of each                         |
| counting      | a photo of {n} {shape}s                             | exactly n {shape}                    |
| colors        | a photo of a {color} {shape}                        | >= 1 {color} {shape}                 |
| position      | a photo of a {shape1} {rel} a {shape2}              | some {shape1} {rel} some {shape2}    |
| color_attr    | a photo of a {color1} {shape1} and a {color2} {shape2} | >= 1 of each coloured shape       |

Free descriptions use the same grammar: `[a photo of] item ((and | , | rel) item)*` with
`item = (a | an | one..four) [color] shape[s]`. Number words mean exactly n, `a`/`an` at least
one; a relation joins the items on either side of it and holds if some pair of their objects
is in it.
"""

from __future__ import annotations

import random
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .world import (
    COLORS,
    IMAGE_SIZE,
    MAX_OBJECTS,
    MAX_SIZE,
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
    position_safe,
    relation_holds,
    relation_margin,
    sample_scene,
    scene_errors,
)

TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
PREFIXES: tuple[str, ...] = ("a photo of", "an image of", "a picture of")  # optional, ignored when parsing


@dataclass(frozen=True)
class Group:
    """`count` objects of `shape` (of `color`, if given): exactly that many if `exact`, else at least."""

    shape: str
    color: str | None = None
    count: int = 1
    exact: bool = False


@dataclass(frozen=True)
class Relation:
    """Some object of groups[a] is `rel` some object of groups[b]."""

    a: int
    rel: str
    b: int


@dataclass(frozen=True)
class Requirement:
    """What an image must show. `complete`: the groups list every object (caption scoring)."""

    groups: tuple[Group, ...]
    relations: tuple[Relation, ...] = ()
    complete: bool = False
    unknown_words: tuple[str, ...] = ()  # words the parser skipped


@dataclass(frozen=True)
class Prompt:
    tag: str  # one of TAGS, or "description" for a free scene description
    text: str
    requirement: Requirement


# ---- checking -------------------------------------------------------------------------------


def _members(group: Group, objects: Sequence[Located]) -> list[Located]:
    return [o for o in objects if o.shape == group.shape and (group.color is None or o.color == group.color)]


def check(spec: Requirement | Prompt, objects: Sequence[Located]) -> bool:
    """Whether `objects` (scene objects or detected ones) satisfy the prompt's requirement."""
    req = spec.requirement if isinstance(spec, Prompt) else spec
    members = [_members(g, objects) for g in req.groups]
    for g, m in zip(req.groups, members, strict=True):
        if len(m) < g.count or (g.exact and len(m) != g.count):
            return False
    for r in req.relations:
        if not any(relation_holds(r.rel, a, b) for a in members[r.a] for b in members[r.b] if a is not b):
            return False
    return not req.complete or _lists_everything(req.groups, objects)


def _lists_everything(groups: Sequence[Group], objects: Sequence[Located]) -> bool:
    """The groups, as a multiset of (shape, colour) with colourless groups matching any colour, equal the objects."""
    left = Counter((o.shape, o.color) for o in objects)
    for g in groups:
        if g.color is not None:
            left[(g.shape, g.color)] -= g.count
    if any(v < 0 for v in left.values()):
        return False
    by_shape = Counter()
    for (shape, _), v in left.items():
        by_shape[shape] += v
    wanted = Counter()
    for g in groups:
        if g.color is None:
            wanted[g.shape] += g.count
    return +by_shape == +wanted


# ---- the six families -----------------------------------------------------------------------


def make_prompt(
    tag: str,
    shapes: Sequence[str],
    colors: Sequence[str] = (),
    *,
    n: int | None = None,
    rel: str | None = None,
) -> Prompt:
    """The prompt of family `tag` (see the module table); `shapes`/`colors` in prompt order."""
    _validate(tag, shapes, colors, n, rel)
    if tag == "single_object":
        (s,) = shapes
        return Prompt(tag, f"a photo of a {s}", Requirement((Group(s),)))
    if tag == "two_object":
        s1, s2 = shapes
        return Prompt(tag, f"a photo of a {s1} and a {s2}", Requirement((Group(s1), Group(s2))))
    if tag == "counting":
        (s,) = shapes
        return Prompt(tag, f"a photo of {NUMBER_WORDS[n]} {plural(s)}", Requirement((Group(s, count=n, exact=True),)))
    if tag == "colors":
        ((s,), (c,)) = shapes, colors
        return Prompt(tag, f"a photo of a {c} {s}", Requirement((Group(s, c),)))
    if tag == "position":
        s1, s2 = shapes
        req = Requirement((Group(s1), Group(s2)), (Relation(0, rel, 1),))
        return Prompt(tag, f"a photo of a {s1} {rel} a {s2}", req)
    (s1, s2), (c1, c2) = shapes, colors
    return Prompt(tag, f"a photo of a {c1} {s1} and a {c2} {s2}", Requirement((Group(s1, c1), Group(s2, c2))))


_ARITY = {  # tag -> (number of shapes, number of colours)
    "single_object": (1, 0),
    "two_object": (2, 0),
    "counting": (1, 0),
    "colors": (1, 1),
    "position": (2, 0),
    "color_attr": (2, 2),
}


def _validate(tag: str, shapes: Sequence[str], colors: Sequence[str], n: int | None, rel: str | None) -> None:
    if tag not in _ARITY:
        raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")
    n_shapes, n_colors = _ARITY[tag]
    if len(shapes) != n_shapes or len(colors) != n_colors:
        raise ValueError(f"{tag} takes {n_shapes} shape(s) and {n_colors} colour(s), got {shapes} and {colors}")
    if bad := [s for s in shapes if s not in SHAPES] + [c for c in colors if c not in COLORS]:
        raise ValueError(f"unknown shape/colour {bad}; shapes are {SHAPES}, colours {COLORS}")
    if len(set(shapes)) != len(shapes) or len(set(colors)) != len(colors):
        raise ValueError(f"{tag} needs different shapes and different colours, got {shapes} and {colors}")
    if (tag == "counting") != (n is not None) or (n is not None and not 2 <= n <= 4):
        raise ValueError(f"n (2..4) goes with counting and only counting; got tag {tag!r}, n={n}")
    if (tag == "position") != (rel is not None) or (rel is not None and rel not in RELATIONS):
        raise ValueError(f"rel (one of {RELATIONS}) goes with position and only position; got tag {tag!r}, rel={rel}")


def sample_prompt(rng: random.Random, tag: str | None = None) -> Prompt:
    """A uniformly random prompt of family `tag` (random family if None), for evaluation."""
    tag = tag or rng.choice(TAGS)
    if tag not in _ARITY:
        raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")
    n_shapes, n_colors = _ARITY[tag]
    shapes, colors = rng.sample(SHAPES, n_shapes), rng.sample(COLORS, n_colors)
    n = rng.randint(2, 4) if tag == "counting" else None
    rel = rng.choice(RELATIONS) if tag == "position" else None
    return make_prompt(tag, shapes, colors, n=n, rel=rel)


def evaluation_prompts(per_tag: int, seed: int = 0) -> list[Prompt]:
    """A fixed evaluation set: `per_tag` random prompts of each family, deterministic for `seed`."""
    return prompts_of_each_tag(random.Random(seed), per_tag)


def prompts_of_each_tag(rng: random.Random, per_tag: int) -> list[Prompt]:
    """`per_tag` random prompts of each family drawn from `rng`, in TAGS order."""
    return [sample_prompt(rng, tag) for tag in TAGS for _ in range(per_tag)]


def geneval_scores(tags: Sequence[str], passed: Sequence[bool]) -> dict[str, float]:
    """Per-tag accuracy and `overall` = mean of the per-tag accuracies (tags present only)."""
    per_tag: dict[str, list[bool]] = {}
    for tag, ok in zip(tags, passed, strict=True):
        per_tag.setdefault(tag, []).append(bool(ok))
    scores = {tag: sum(v) / len(v) for tag, v in per_tag.items()}
    scores["overall"] = sum(scores.values()) / len(scores) if scores else 0.0
    return scores


def scene_for(spec: Requirement | Prompt, rng: random.Random, max_tries: int = 10_000, *,
              extras: bool = True, ordered: bool = False) -> Scene:
    """A random scene that satisfies `spec` (position-safe if it has relations).

    With `extras` it may hold random further objects (up to the scene limit) unless the spec is
    complete; without, it holds exactly the objects the spec names, so the spec describes it whole.
    With `ordered` the named objects also follow `follows_layout` (one region each, in the order named).
    """
    req = spec.requirement if isinstance(spec, Prompt) else spec
    needed = [ObjSpec(g.shape, g.color) for g in req.groups for _ in range(g.count)]
    if len(needed) > MAX_OBJECTS:
        raise ValueError(f"the requirement needs {len(needed)} objects; a scene holds at most {MAX_OBJECTS}")
    n = len(needed) if req.complete or not extras else None

    def ok(scene: Scene) -> bool:
        return (check(req, scene.objects) and (not req.relations or position_safe(scene.objects))
                and (not ordered or follows_layout(req, scene.objects)))

    return sample_scene(rng, n, objects=needed, where=ok, max_tries=max_tries)


# Canonical layouts (training data, `canonical`): the cells (column, row) of the 8 x 8 token grid, 8 px each,
# that hold the named objects' box centres, by how many objects the prompt names (in the order named), or by
# the relation (first object, second object). Centres move by up to SLOT_JITTER px and stay in their cell.
SLOTS: dict[int, tuple[tuple[int, int], ...]] = {
    1: ((4, 4),),
    2: ((2, 4), (5, 4)),
    3: ((2, 2), (5, 2), (4, 5)),
    4: ((2, 2), (5, 2), (2, 5), (5, 5)),
}
RELATION_SLOTS: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
    "left of": ((2, 4), (5, 4)),
    "right of": ((5, 4), (2, 4)),
    "above": ((4, 2), (4, 5)),
    "below": ((4, 5), (4, 2)),
}
SLOT_JITTER = 3
CELL = IMAGE_SIZE // 8


def canonical_cells(spec: Requirement | Prompt) -> list[tuple[int, int]]:
    """The cell of each named object's centre in the canonical layout, objects in the order named (a group
    of k objects: k consecutive entries)."""
    req = spec.requirement if isinstance(spec, Prompt) else spec
    total = sum(g.count for g in req.groups)
    if not req.relations:
        if not 1 <= total <= MAX_OBJECTS:
            raise ValueError(f"a canonical layout holds 1 to {MAX_OBJECTS} named objects, got {total}")
        return list(SLOTS[total])
    if len(req.relations) != 1 or len(req.groups) != 2 or total != 2:
        raise ValueError("a canonical layout knows one relation between two single objects (the position "
                         f"prompts), got {len(req.relations)} relation(s) over {total} objects")
    r = req.relations[0]
    first, second = RELATION_SLOTS[r.rel]
    return [first, second] if (r.a, r.b) == (0, 1) else [second, first]


def check_canonical_jitter(jitter: int) -> int:
    """`jitter` if it is an integer in 0..SLOT_JITTER px (bools refused), else a ValueError."""
    if isinstance(jitter, bool) or not isinstance(jitter, int) or not 0 <= jitter <= SLOT_JITTER:
        raise ValueError(f"canonical jitter must be an integer in 0..{SLOT_JITTER} px, got {jitter!r}")
    return jitter


def canonical_sizes(jitter: int) -> tuple[int, int]:
    """The size range of a canonical layout with `jitter` px: 16 at 0, widening to the spec's 12..18."""
    return max(MIN_SIZE, 16 - 2 * jitter), min(MAX_SIZE, 16 + jitter)


def canonical_scene(spec: Requirement | Prompt, rng: random.Random, max_tries: int = 1000, *,
                    jitter: int = SLOT_JITTER) -> Scene:
    """A scene holding exactly the objects `spec` names, each centred in its canonical cell (`canonical_cells`)
    up to `jitter` px (0..SLOT_JITTER), with random sizes in `canonical_sizes(jitter)` (and random shape or
    colour where the spec leaves them open).

    Random layouts leave a generator to spread every object over all the places it might take, so the
    token loss pays little for which named object goes where: in ordered two-object scenes, knowing which
    shapes the prompt names cuts the encoder tokens' variance by 14%, knowing also their order by 0.5% more.
    Here the text decides the layout up to a few pixels, so the place of each object follows from its name
    and order.
    """
    check_canonical_jitter(jitter)
    req = spec.requirement if isinstance(spec, Prompt) else spec
    named = [g for g in req.groups for _ in range(g.count)]
    cells, (small, large) = canonical_cells(req), canonical_sizes(jitter)
    for _ in range(max_tries):
        objects = []
        for group, (col, row) in zip(named, cells, strict=True):
            size = rng.randint(small, large)
            cx = CELL * col + CELL // 2 + rng.randint(-jitter, jitter)
            cy = CELL * row + CELL // 2 + rng.randint(-jitter, jitter)
            objects.append(Obj(group.shape or rng.choice(SHAPES), group.color or rng.choice(COLORS),
                               cx - size // 2, cy - size // 2, size))
        scene = Scene(tuple(objects))
        if not scene_errors(scene) and check(req, objects) and (not req.relations or position_safe(objects)):
            return scene
    raise RuntimeError(f"no canonical scene for {spec!r} in {max_tries} tries")


def layout_region(obj: Located, n: int) -> int:
    """Which of `n` regions holds the object's centre: 1 the whole image; 2 the left and right halves;
    3 vertical thirds; 4 the quadrants in reading order."""
    half = IMAGE_SIZE / 2
    if n == 4:
        return 2 * (obj.cy >= half) + (obj.cx >= half)
    return min(n - 1, int(obj.cx * n // IMAGE_SIZE))


def follows_layout(req: Requirement, objects: Sequence[Located]) -> bool:
    """Whether the objects a requirement names sit in its ordered layout (training data, `ordered`).

    A random layout asks the DiT for relational computation: which cell gets the red circle depends on
    where the blue square is forming. In the ordered layout each named object's region follows from the
    text alone: a relation puts its first object in the half the relation names (`left of`: the left
    half, the other object in the right one; `above`: the top half); otherwise the named objects take
    the regions of `layout_region` in the order they are named (a group of k objects takes the next k
    regions, one object each). A single object may be anywhere. Positions within a region stay random.
    """
    if req.relations:
        half = IMAGE_SIZE / 2
        for r in req.relations:
            firsts, seconds = _members(req.groups[r.a], objects), _members(req.groups[r.b], objects)
            axis = "cx" if r.rel in ("left of", "right of") else "cy"
            low_first = r.rel in ("left of", "above")
            lows, highs = (firsts, seconds) if low_first else (seconds, firsts)
            if not (lows and highs and all(getattr(o, axis) < half for o in lows)
                    and all(getattr(o, axis) >= half for o in highs)):
                return False
        return True
    total = sum(g.count for g in req.groups)
    if total <= 1:
        return True
    start = 0
    for g in req.groups:
        regions = sorted(layout_region(o, total) for o in _members(g, objects))
        if regions != list(range(start, start + g.count)):
            return False
        start += g.count
    return True


# ---- prompts that a scene satisfies (training pairs) ----------------------------------------


def _options(tag: str, scene: Scene) -> list[Prompt]:
    objs = scene.objects
    shapes = sorted({o.shape for o in objs}, key=SHAPES.index)
    if tag == "single_object":
        return [make_prompt(tag, [s]) for s in shapes]
    if tag == "two_object":
        return [make_prompt(tag, [a, b]) for a in shapes for b in shapes if a != b]
    if tag == "counting":
        counts = Counter(o.shape for o in objs)
        return [make_prompt(tag, [s], n=counts[s]) for s in shapes if counts[s] >= 2]
    if tag == "colors":
        return [make_prompt(tag, [o.shape], [o.color]) for o in objs]
    if tag == "position":
        if not position_safe(objs):
            return []
        pairs = [(a, b) for a in objs for b in objs if a.shape != b.shape]
        held = [(a.shape, r, b.shape) for a, b in pairs for r in RELATIONS if relation_holds(r, a, b)]
        return [make_prompt(tag, [s1, s2], rel=r) for s1, r, s2 in held]
    if tag == "color_attr":
        pairs = [(a, b) for a in objs for b in objs if a.shape != b.shape and a.color != b.color]
        return [make_prompt(tag, [a.shape, b.shape], [a.color, b.color]) for a, b in pairs]
    raise ValueError(f"unknown tag {tag!r}; expected one of {TAGS}")


def prompts_from_scene(scene: Scene, rng: random.Random) -> list[Prompt]:
    """One random prompt of each family that `scene` satisfies, in TAGS order."""
    return [rng.choice(opts) for t in TAGS if (opts := _options(t, scene))]


# ---- free descriptions ----------------------------------------------------------------------


def item_phrase(shape: str, color: str | None, count: int) -> str:
    """One item of the prompt grammar: `a red circle`, `two squares`, `three blue crosses`."""
    noun = shape if count == 1 else plural(shape)
    return " ".join(w for w in ("a" if count == 1 else NUMBER_WORDS[count], color, noun) if w)


def describe(scene: Scene, rng: random.Random | None = None) -> str:
    """A scene description in the prompt grammar, listing every object, e.g.
    `a red circle left of two blue squares and a green cross`.

    Objects of one (colour, shape) form one item. Consecutive items are joined by a relation
    when it holds, clear of thresholds, for every pair of their objects, else by `and`. With
    `rng` the order and wording vary; without, items go left to right and relations are used
    whenever they hold.
    """
    groups: dict[tuple[str, str], list] = {}
    for o in scene.objects:
        groups.setdefault((o.color, o.shape), []).append(o)
    items = list(groups.items())
    if rng is None:
        items.sort(key=lambda kv: (min(o.cx for o in kv[1]), min(o.cy for o in kv[1])))
    else:
        rng.shuffle(items)
    words = []
    for i, ((color, shape), members) in enumerate(items):
        if i:
            rels = _clear_relations(items[i - 1][1], members)
            use = rels and (rng is None or rng.random() < 0.7)
            words.append((rels[0] if rng is None else rng.choice(rels)) if use else "and")
        words.append(item_phrase(shape, color, len(members)))
    return " ".join(words)


def _clear_relations(a_members: Sequence[Located], b_members: Sequence[Located]) -> list[str]:
    pairs = [(a, b) for a in a_members for b in b_members]
    if any(relation_margin(a, b) <= POSITION_MARGIN for a, b in pairs):
        return []
    return [r for r in RELATIONS if all(relation_holds(r, a, b) for a, b in pairs)]


_QUANTITIES = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{plural(s): s for s in SHAPES}}
_TOKEN = re.compile(r"[a-z]+")


def parse_description(text: str, *, warn: bool = True) -> Requirement:
    """Parse a prompt or free description into a Requirement (see the module docstring).

    Unknown words are skipped, recorded in `unknown_words`, and (if `warn`) reported with a
    UserWarning; the parse never fails.
    """
    tokens = _TOKEN.findall(text.lower())
    for prefix in PREFIXES:
        if tokens[: len(prefix.split())] == prefix.split():
            tokens = tokens[len(prefix.split()) :]
            break
    groups, relations, unknown = _parse_items(tokens)
    if warn and unknown:
        warnings.warn(f"parse_description ignored unknown words {unknown} in {text!r}", UserWarning, stacklevel=2)
    return Requirement(tuple(groups), tuple(relations), unknown_words=tuple(unknown))


def _parse_items(tokens: list[str]) -> tuple[list[Group], list[Relation], list[str]]:
    """The items of `item ((and | , | rel) item)*` as groups, the relations between neighbouring items,
    and the words that fit nowhere."""
    groups: list[Group] = []
    relations: list[Relation] = []
    unknown: list[str] = []
    pending: list[str] = []  # words of an item whose shape has not come yet
    count, exact, color, rel = 1, False, None, None
    i = 0
    while i < len(tokens):
        t, pair = tokens[i], " ".join(tokens[i : i + 2])
        step = 2 if pair in ("left of", "right of") else 1
        if step == 2 or t in ("above", "below"):
            word = pair if step == 2 else t
            if groups:  # a relation joins the item before it to the item after it
                rel = word
                pending.append(word)
            else:
                unknown.append(word)
        elif t in _QUANTITIES:
            count, exact = _QUANTITIES[t], t not in ("a", "an")
            pending.append(t)
        elif t in COLORS:
            color = t
            pending.append(t)
        elif t in _SHAPE_WORDS:
            if rel is not None:
                relations.append(Relation(len(groups) - 1, rel, len(groups)))
            groups.append(Group(_SHAPE_WORDS[t], color, count, exact))
            count, exact, color, rel, pending = 1, False, None, None, []
        elif t != "and":
            unknown.append(t)
        i += step
    return groups, relations, unknown + pending  # a trailing "and two red" names nothing
