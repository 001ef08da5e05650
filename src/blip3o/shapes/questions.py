"""Understanding: the six question types, the caption request, and answer scoring.

| type        | question                               | answer (one word)  | asked only if         |
|-------------|----------------------------------------|--------------------|-----------------------|
| count       | how many {shape}s are there?           | zero..four         |                       |
| count_color | how many {color} objects are there?    | zero..four         |                       |
| color       | what color is the {shape}?             | a colour           | exactly one {shape}   |
| shape       | what shape is the {color} object?      | a shape            | exactly one {color}   |
| exist       | is there a {color} {shape}?            | yes / no           |                       |
| position    | is the {shape1} {rel} the {shape2}?    | yes / no           | one of each, and the  |
|             |                                        |                    | scene position-safe   |

`answer_question` computes the answer of any question text from objects (a scene's, or
those `detect` read from an image), so generated data and scoring share one definition.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .prompts import Group, Requirement, check, item_phrase, parse_description
from .world import (
    COLORS,
    IMAGE_SIZE,
    NUMBER_WORDS,
    RELATIONS,
    SHAPES,
    Located,
    Scene,
    plural,
    position_safe,
    relation_holds,
)

QUESTION_TYPES: tuple[str, ...] = ("count", "count_color", "color", "shape", "exist", "position")
CAPTION_QUESTION = "describe the image."  # the caption request: its answer is `describe(scene)`
CAPTION = "caption"  # the Question.type of the caption request

_SHAPE = "(" + "|".join(SHAPES) + ")"
_PLURAL = "(" + "|".join(plural(s) for s in SHAPES) + ")"
_COLOR = "(" + "|".join(COLORS) + ")"
_REL = "(" + "|".join(RELATIONS) + ")"
_PATTERNS = {
    "count": re.compile(rf"how many {_PLURAL} are there\?"),
    "count_color": re.compile(rf"how many {_COLOR} objects are there\?"),
    "color": re.compile(rf"what color is the {_SHAPE}\?"),
    "shape": re.compile(rf"what shape is the {_COLOR} object\?"),
    "exist": re.compile(rf"is there a {_COLOR} {_SHAPE}\?"),
    "position": re.compile(rf"is the {_SHAPE} {_REL} the {_SHAPE}\?"),
}


@dataclass(frozen=True)
class Question:
    type: str  # one of QUESTION_TYPES, or CAPTION
    text: str
    answer: str


def _number(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def _yes_no(b: bool) -> str:
    return "yes" if b else "no"


def answer_question(text: str, objects: Sequence[Located]) -> str | None:
    """The answer to a question of one of the six types, or None if it is not one of them or
    its precondition fails (e.g. `what color is the circle?` with two circles)."""
    text = " ".join(text.lower().split())
    for qtype, pattern in _PATTERNS.items():
        if m := pattern.fullmatch(text):
            return _ANSWERERS[qtype](objects, *m.groups())
    return None


def _count(objects: Sequence[Located], shapes: str) -> str:
    shape = next(s for s in SHAPES if plural(s) == shapes)
    return _number(sum(o.shape == shape for o in objects))


def _count_color(objects: Sequence[Located], color: str) -> str:
    return _number(sum(o.color == color for o in objects))


def _color(objects: Sequence[Located], shape: str) -> str | None:
    hits = [o for o in objects if o.shape == shape]
    return hits[0].color if len(hits) == 1 else None


def _shape(objects: Sequence[Located], color: str) -> str | None:
    hits = [o for o in objects if o.color == color]
    return hits[0].shape if len(hits) == 1 else None


def _exist(objects: Sequence[Located], color: str, shape: str) -> str:
    return _yes_no(any(o.color == color and o.shape == shape for o in objects))


def _position(objects: Sequence[Located], shape1: str, rel: str, shape2: str) -> str | None:
    a = [o for o in objects if o.shape == shape1]
    b = [o for o in objects if o.shape == shape2]
    if shape1 == shape2 or len(a) != 1 or len(b) != 1:
        return None
    return _yes_no(relation_holds(rel, a[0], b[0]))


_ANSWERERS = {
    "count": _count,
    "count_color": _count_color,
    "color": _color,
    "shape": _shape,
    "exist": _exist,
    "position": _position,
}


def ask(scene: Scene, qtype: str, rng: random.Random) -> Question | None:
    """A random question of type `qtype` whose precondition holds for `scene`, or None if none can be asked.

    Subjects are biased toward what is in the image (and yes/no toward balance), so answers
    are not mostly `zero` and `no`.
    """
    objs = scene.objects
    present_shapes = sorted({o.shape for o in objs}, key=SHAPES.index)
    present_colors = sorted({o.color for o in objs}, key=COLORS.index)
    if qtype == "count":
        shape = rng.choice(present_shapes if rng.random() < 0.75 else SHAPES)
        text = f"how many {plural(shape)} are there?"
    elif qtype == "count_color":
        color = rng.choice(present_colors if rng.random() < 0.75 else COLORS)
        text = f"how many {color} objects are there?"
    elif qtype == "color":
        single = [s for s in present_shapes if sum(o.shape == s for o in objs) == 1]
        text = f"what color is the {rng.choice(single)}?" if single else None
    elif qtype == "shape":
        single = [c for c in present_colors if sum(o.color == c for o in objs) == 1]
        text = f"what shape is the {rng.choice(single)} object?" if single else None
    elif qtype == "exist":
        o = rng.choice(objs)
        color, shape = (o.color, o.shape) if rng.random() < 0.5 else (rng.choice(COLORS), rng.choice(SHAPES))
        text = f"is there a {color} {shape}?"
    elif qtype == "position":
        text = _position_question(scene, rng)
    else:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")
    if text is None:
        return None
    return Question(qtype, text, answer_question(text, objs))


def _position_question(scene: Scene, rng: random.Random) -> str | None:
    objs = scene.objects
    if not position_safe(objs):
        return None
    single = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    pairs = [(a, b) for a in single for b in single if a is not b]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    true = [r for r in RELATIONS if relation_holds(r, a, b)]
    rel = rng.choice(true) if true and rng.random() < 0.5 else rng.choice(RELATIONS)
    return f"is the {a.shape} {rel} the {b.shape}?"


def questions_for_scene(scene: Scene, rng: random.Random, types: Sequence[str] = QUESTION_TYPES) -> list[Question]:
    """One random question of each type in `types` that can be asked about `scene`."""
    return [q for t in types if (q := ask(scene, t, rng)) is not None]


CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
READING_TYPES: tuple[str, ...] = ("count", "count_color", "color", "shape", "exist")


@dataclass(frozen=True)
class _Named:
    shape: str
    color: str


def reading_questions(description: str, rng: random.Random, k: int) -> list[tuple[str, str]]:
    """Up to `k` text-only turns about a scene description: (`{description}. {question}`, answer).

    The answer follows from the text alone: counts, colours and shapes from the items (a description
    lists every object, see `prompts.describe`), and for each stated relation `A rel B` between single
    objects, one of `is A rel B?` (yes), `is B rel A?` (no), `is B {converse} A?` (yes), `is A {converse}
    B?` (no); these come first, the other types fill up to `k`. An understanding stage that cannot yet
    tell where objects are in an image still learns from these what the relation words mean and which
    item each applies to, so the words do not collapse onto one another (what the generation condition
    needs: `a square above a circle` and `a square below a circle` must differ). Descriptions with an
    uncoloured item give no turns.
    """
    req = parse_description(description, warn=False)
    if not req.groups or any(g.color is None for g in req.groups):
        return []
    objects = [_Named(g.shape, g.color) for g in req.groups for _ in range(g.count)]
    scene = Scene(objects)  # without positions: `ask` reads only shapes and colours for these types
    others = [(q.text, q.answer) for t in READING_TYPES
              if (q := ask(scene, t, rng)) is not None and q.answer is not None]
    relations = _relation_turns(req, objects, rng)
    rng.shuffle(relations)  # relation turns first: the image questions rarely teach them
    picked = relations[:k] + rng.sample(others, min(len(others), k - len(relations[:k])))
    return [(f"{description}. {question}", answer) for question, answer in picked]


def _relation_turns(req: Requirement, objects: Sequence[_Named], rng: random.Random) -> list[tuple[str, str]]:
    """For each stated relation between single objects, one yes/no question about it (reading_questions)."""

    def name(g: Group) -> str:
        return f"the {g.shape}" if sum(o.shape == g.shape for o in objects) == 1 else f"the {g.color} {g.shape}"

    turns = []
    for r in req.relations:
        a, b = req.groups[r.a], req.groups[r.b]
        if a.count != 1 or b.count != 1:
            continue
        rel = rng.choice([r.rel, CONVERSE[r.rel]])
        swap = rng.random() < 0.5  # ask about B and A instead of A and B
        first, second = (b, a) if swap else (a, b)
        holds = (rel == r.rel) != swap  # `a rel b` stated: `b conv a` holds, `a conv b` and `b rel a` do not
        turns.append((f"is {name(first)} {rel} {name(second)}?", _yes_no(holds)))
    return turns


RESTATE_REQUEST = "the other way round?"


def relation_sentence(rng: random.Random, *, photo_share: float) -> tuple[str, str, str, str, str, str]:
    """A random relation sentence in the prompt grammar, as its parts (shape1, shape2, rel, item1, item2,
    prefix): `{prefix}{item1} {rel} {item2}`. With chance `photo_share` it is in the position prompts'
    uncoloured form (`a photo of a square above a circle`), otherwise its items are coloured 70% of the
    time and counted (2 to 4) 30% of the time each."""
    s1, s2 = rng.sample(SHAPES, 2)
    rel = rng.choice(RELATIONS)
    if rng.random() < photo_share:
        return s1, s2, rel, item_phrase(s1, None, 1), item_phrase(s2, None, 1), "a photo of "
    colors = rng.sample(COLORS, 2) if rng.random() < 0.7 else [None, None]
    counts = [1 if rng.random() < 0.7 else rng.randint(2, 4) for _ in range(2)]
    return s1, s2, rel, item_phrase(s1, colors[0], counts[0]), item_phrase(s2, colors[1], counts[1]), ""


def restate_questions(rng: random.Random, k: int) -> list[tuple[str, str]]:
    """`k` text-only turns: a random relation sentence in the prompt grammar followed by
    `the other way round?`, answered by its converse (`a red circle left of two squares. the other way
    round?` -> `two squares right of a red circle`); a third of them in the position prompts' form (`a
    photo of a square above a circle`, uncoloured).

    Its answer's relation word is a function of the question's, one token back along a fixed path: a
    dense, easy target that makes the backbone carry what the relation word says (yes/no questions
    about relations give one bit per turn and leave their accuracy at the majority answer, 0.649). The
    generation condition needs exactly that: `a square left of a circle` and `a square right of a circle`
    must differ. Without these turns their 64 query states differ by 4.4% (relative change); 500
    understanding steps with two of them per conversation raise that to 11.6%.
    """
    turns = []
    for _ in range(k):
        _, _, rel, a, b, prefix = relation_sentence(rng, photo_share=1 / 3)
        turns.append((f"{prefix}{a} {rel} {b}. {RESTATE_REQUEST}", f"{b} {CONVERSE[rel]} {a}"))
    return turns


# the relation each plan states: the item drawn first in reading order (left, or top) comes first
PLAN_RELATION = {"left of": "left of", "right of": "left of", "above": "above", "below": "above"}


def plan_questions(rng: random.Random, k: int) -> list[tuple[str, str]]:
    """`k` (prompt, plan) pairs: a random relation prompt (half in the position prompts' uncoloured `a photo
    of a square below a circle` form, the rest with colours or counts) and its layout in reading order,
    the two shapes alone, the one that goes left (or on top) first: `triangle above square`. The first
    word is a shape, so the token before the answer must already know which one it is. The understanding
    stage asks for the prompt as the generation request (`plan`): that token is where the generation
    condition's `[IMG]` and queries follow."""
    turns = []
    for _ in range(k):
        s1, s2, rel, a, b, prefix = relation_sentence(rng, photo_share=0.5)
        first, second = (s1, s2) if PLAN_RELATION[rel] == rel else (s2, s1)
        turns.append((f"{prefix}{a} {rel} {b}", f"{first} {PLAN_RELATION[rel]} {second}"))
    return turns


LOCATE_ROWS: tuple[str, ...] = ("top", "middle", "bottom")
LOCATE_COLUMNS: tuple[str, ...] = ("left", "centre", "right")


def where(o: Located) -> str:
    """The third of the image (rows and columns) that holds the centre of `o`: `top left`, `top`, ...,
    `centre`, ..., `bottom right`."""
    third = IMAGE_SIZE / 3
    row, col = LOCATE_ROWS[min(2, int(o.cy // third))], LOCATE_COLUMNS[min(2, int(o.cx // third))]
    if row == "middle":
        return col
    return row if col == "centre" else f"{row} {col}"


def locate_questions(scene: Scene, rng: random.Random, k: int) -> list[tuple[str, str]]:
    """Up to `k` turns `where is the {shape}?` / `where is the {color} {shape}?` -> `where(o)`, for objects
    the question names uniquely (training only; not one of the evaluation's types). A one-object lookup
    of an absolute position: the step before comparing two objects' positions, which the position
    questions ask and which the image questions alone leave at the majority answer."""
    objs = scene.objects
    named = []
    for o in objs:
        if sum(p.shape == o.shape for p in objs) == 1 and rng.random() < 0.5:
            named.append((f"where is the {o.shape}?", where(o)))
        elif sum(p.shape == o.shape and p.color == o.color for p in objs) == 1:
            named.append((f"where is the {o.color} {o.shape}?", where(o)))
    rng.shuffle(named)
    return named[:k]


def normalize_answer(text: str) -> str:
    """Lower-case, strip spaces and one final period: ` Yes. ` -> `yes`."""
    text = text.lower().strip()
    return text[:-1].strip() if text.endswith(".") else text


def score_answer(question: Question, predicted: str, scene: Scene | Sequence[Located] | None = None) -> bool:
    """Whether `predicted` answers `question`.

    Ordinary questions: exact match after `normalize_answer`. The caption request: the
    prediction is parsed back (words outside the grammar fail it) and must list exactly the
    scene's objects, with any stated relation true; `scene` is required for it.
    """
    if question.type != CAPTION:
        return normalize_answer(predicted) == normalize_answer(question.answer)
    if scene is None:
        raise ValueError("scoring a caption needs the scene (or its objects) to compare against")
    objects = scene.objects if isinstance(scene, Scene) else scene
    req = parse_description(predicted, warn=False)
    return not req.unknown_words and check(replace(req, complete=True), objects)
