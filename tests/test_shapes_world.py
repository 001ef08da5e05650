"""The Shapes world against its contract: renderer <-> detector, relations,
prompts and `check`, questions and scoring, descriptions, and the shard format."""

from __future__ import annotations

import io
import json
import random
import re
import struct
import tarfile
import warnings
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from blip3o.shapes import (
    ANTIALIASED,
    BACKGROUND,
    CAPTION,
    CAPTION_QUESTION,
    COLORS,
    PALETTE,
    RASTERISERS,
    RELATIONS,
    SHAPES,
    TAGS,
    Group,
    Obj,
    Question,
    ReadStats,
    Relation,
    Requirement,
    Scene,
    above,
    answer_question,
    ask,
    below,
    check,
    describe,
    detect,
    geneval_scores,
    iter_examples,
    left_of,
    make_example,
    make_prompt,
    normalize_answer,
    parse_description,
    plan_questions,
    position_safe,
    prompts_from_scene,
    questions_for_scene,
    reading_questions,
    relation_holds,
    relation_margin,
    render,
    restate_questions,
    right_of,
    sample_prompt,
    sample_scene,
    scene_errors,
    scene_for,
    score_answer,
    write_shards,
)
from blip3o.shapes.render import ALL_RASTERISERS, HELD_OUT_RASTERISERS, arm_width, choose_rasteriser, coverage
from blip3o.shapes.world import MAX_SIZE, MIN_SIZE

ALIASED_BOX_EXACT = ("exact", "pil")  # non-anti-aliased rasterisers whose shapes fill their whole box


def _scene(*objs: tuple[str, str, int, int, int]) -> Scene:
    return Scene(tuple(Obj(*o) for o in objs))


def _match(detected, scene: Scene) -> list:
    """Scene object whose box contains each detected box (exactly one, else the test fails)."""
    out = []
    for d in detected:
        hits = [o for o in scene.objects if o.x <= d.box[0] and o.y <= d.box[1] and d.box[2] <= o.x + o.size
                and d.box[3] <= o.y + o.size]  # fmt: skip
        assert len(hits) == 1, (d, scene)
        out.append(hits[0])
    return out


# ---- renderer <-> detector ------------------------------------------------------------------


@pytest.mark.parametrize("rasteriser", ALL_RASTERISERS)
def test_every_shape_size_colour_reads_back(rasteriser):
    """Objects never touch, so every image reads back if every single object does."""
    for shape in SHAPES:
        for size in range(MIN_SIZE, MAX_SIZE + 1):
            for color in COLORS:
                (d,) = detect(render(_scene((shape, color, 20, 20, size)), rasteriser=rasteriser))
                assert (d.shape, d.color) == (shape, color), (rasteriser, shape, size, color, d)


@pytest.mark.parametrize("rasteriser", ALL_RASTERISERS)
def test_detector_reads_back_3000_random_scenes(rasteriser):
    rng = random.Random(f"readback-{rasteriser}")
    for _ in range(3000):
        scene = sample_scene(rng)
        detected = detect(render(scene, rasteriser=rasteriser))
        assert Counter((d.shape, d.color) for d in detected) == Counter((o.shape, o.color) for o in scene.objects)
        for d, o in zip(detected, _match(detected, scene), strict=True):
            assert (d.shape, d.color) == (o.shape, o.color)
            if rasteriser in ALIASED_BOX_EXACT:
                assert d.box == o.box
            # anti-aliasing may eat a triangle's apex: the centre moves at most 1 px
            assert abs(d.cx - o.cx) <= 1 and abs(d.cy - o.cy) <= 1, (d, o)


@pytest.mark.parametrize("rasteriser", ALL_RASTERISERS)
def test_relations_on_detected_boxes_match_the_scene_when_position_safe(rasteriser):
    rng = random.Random(f"relations-{rasteriser}")
    for _ in range(300):
        scene = sample_scene(rng, rng.randint(2, 4), where=lambda s: position_safe(s.objects))
        detected = detect(render(scene, rasteriser=rasteriser))
        truth = _match(detected, scene)
        for i, a in enumerate(detected):
            for j, b in enumerate(detected):
                for rel in RELATIONS:
                    if i != j:
                        assert relation_holds(rel, a, b) == relation_holds(rel, truth[i], truth[j])


def test_render_basics():
    scene = _scene(("square", "red", 2, 2, 12))
    image = render(scene)
    assert image.size == (64, 64) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert tuple(pixels[0, 0]) == BACKGROUND and tuple(pixels[2, 2]) == PALETTE["red"]
    assert (pixels[2:14, 2:14] == PALETTE["red"]).all() and (pixels[14:, :] == BACKGROUND).all()
    rng_a, rng_b = random.Random(3), random.Random(3)
    assert np.array_equal(np.asarray(render(scene, rng_a)), np.asarray(render(scene, rng_b)))
    disc = _scene(("circle", "blue", 9, 9, 17))
    for rasteriser in ALL_RASTERISERS:  # anti-aliased rasterisers blend edge pixels with the background
        colours = np.unique(np.asarray(render(disc, rasteriser=rasteriser)).reshape(-1, 3), axis=0)
        assert (len(colours) > 2) == (rasteriser in ANTIALIASED), rasteriser
    rng = random.Random(0)
    for _ in range(20):  # a random aliased rasteriser: background and blue only
        assert len(np.unique(np.asarray(render(disc, rng, antialias=False)).reshape(-1, 3), axis=0)) == 2
    with pytest.raises(ValueError, match="contradicts"):
        render(scene, antialias=True, rasteriser="exact")
    with pytest.raises(ValueError, match="unknown rasteriser"):
        render(scene, rasteriser="nope")
    assert set(ANTIALIASED) < set(ALL_RASTERISERS)


@pytest.mark.parametrize("size", range(MIN_SIZE, MAX_SIZE + 1))
def test_area_rasteriser_covers_each_shape_by_its_exact_area(size):
    """`area` integrates the spec's geometry: its coverage sums to each shape's area, mirror-symmetric."""
    arm = arm_width(size)
    areas = {"circle": np.pi * size**2 / 4, "square": size**2, "triangle": size**2 / 2,
             "cross": 2 * size * arm - arm**2}
    for shape, area in areas.items():
        mask = coverage(shape, size, "area")
        assert mask.shape == (size, size) and mask.min() >= 0.0 and mask.max() <= 1.0 + 1e-6
        assert mask.sum() == pytest.approx(area, abs=1e-3), shape
        assert np.allclose(mask, mask[:, ::-1], atol=1e-6), shape
    assert np.allclose(coverage("circle", size, "area"), coverage("circle", size, "area").T, atol=1e-6)
    assert coverage("triangle", size, "area")[0].sum() == pytest.approx(0.5)  # the apex row: width t at depth t


def test_training_data_never_draws_a_held_out_rasteriser():
    rng = random.Random("held-out")
    drawn = {choose_rasteriser(rng, antialias) for _ in range(500) for antialias in (None, True, False)}
    assert drawn == set(RASTERISERS) and not drawn & set(HELD_OUT_RASTERISERS)
    assert {make_example(0, i)[1]["rasteriser"] for i in range(200)} <= set(RASTERISERS)


def test_detector_ignores_small_blobs_and_far_colours():
    pixels = np.full((64, 64, 3), 240, dtype=np.uint8)
    pixels[5:11, 5:11] = PALETTE["green"]  # 36 px < 40: noise
    pixels[30:40, 30:40] = (120, 120, 120)  # far from every palette colour
    pixels[45:52, 45:52] = (60, 180, 70)  # 7x7 = 49 px within 60 of green: a square
    (d,) = detect(pixels)
    assert detect(np.full((64, 64, 3), 240, dtype=np.uint8)) == []
    assert (d.shape, d.color, d.box, d.cx, d.cy) == ("square", "green", (45, 45, 52, 52), 48.5, 48.5)


# ---- scenes and relations -------------------------------------------------------------------


def test_sampled_scenes_follow_the_layout_rules():
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(2000)]
    assert all(scene_errors(s) == [] for s in scenes)
    assert Counter(len(s.objects) for s in scenes).keys() == {1, 2, 3, 4}
    sizes = {o.size for s in scenes for o in s.objects}
    assert sizes == set(range(MIN_SIZE, MAX_SIZE + 1))
    assert [sample_scene(random.Random(5)) for _ in range(3)] == [sample_scene(random.Random(5)) for _ in range(3)]
    assert scene_errors(_scene(("square", "red", 1, 10, 12)))  # 1 px from the border
    assert scene_errors(_scene(("square", "red", 10, 10, 12), ("square", "red", 23, 10, 12)))  # 1 px apart
    assert not scene_errors(_scene(("square", "red", 10, 10, 12), ("square", "red", 24, 10, 12)))
    with pytest.raises(TypeError, match="random.Random"):
        sample_scene(np.random.default_rng(0))


def test_constrained_sampling():
    rng = random.Random(1)

    def circle_left_of_square(s: Scene) -> bool:
        return any(left_of(a, b) for a in s.objects for b in s.objects if (a.shape, b.shape) == ("circle", "square"))

    for _ in range(50):
        scene = sample_scene(rng, where=circle_left_of_square)
        assert circle_left_of_square(scene)
    with pytest.raises(RuntimeError, match="no scene"):
        sample_scene(rng, 1, where=lambda s: len(s.objects) == 2, max_tries=20)


def test_relation_thresholds_exact():
    a = Obj("circle", "red", 10, 30, 12)  # centre (16, 36)
    assert left_of(a, Obj("square", "red", 18, 30, 12))  # dx = 8: on the threshold
    b = Obj("square", "red", 17, 30, 13)  # centre (23.5, 36.5): dx = 7.5
    assert not left_of(a, b) and not right_of(b, a)
    c = Obj("square", "red", 30, 44, 12)  # centre (36, 50): dx = 20, dy = 14
    assert left_of(a, c) and right_of(c, a) and not above(a, c)
    d = Obj("square", "red", 18, 38, 12)  # dx = dy = 8: both hold (ties go to >=)
    assert left_of(a, d) and above(a, d) and below(d, a) and right_of(d, a)
    e = Obj("square", "red", 19, 40, 13)  # centre (25.5, 46.5): dx = 9.5 < dy = 10.5
    assert above(a, e) and not left_of(a, e)
    f = Obj("square", "red", 10, 10, 12)  # straight above, dy = 20
    assert above(f, a) and below(a, f) and not left_of(f, a) and not right_of(f, a)
    with pytest.raises(ValueError, match="unknown relation"):
        relation_holds("near", a, b)


def test_position_margin():
    a = Obj("circle", "red", 10, 30, 12)  # centre (16, 36)
    at_9 = Obj("square", "red", 19, 30, 12)  # dx = 9: within 1 px of 8
    assert relation_margin(a, at_9) == 1 and not position_safe([a, at_9])
    at_9_5 = Obj("square", "red", 19, 30, 13)  # dx = 9.5, dy = 0.5
    assert relation_margin(a, at_9_5) == 1.5 and position_safe([a, at_9_5])
    diagonal = Obj("square", "red", 30, 43, 13)  # dx = 20.5, dy = 13.5: safe
    near_tie = Obj("square", "red", 30, 49, 12)  # dx = 20, dy = 19: | |dx| - |dy| | = 1
    assert position_safe([a, diagonal]) and not position_safe([a, near_tie])


# ---- prompts --------------------------------------------------------------------------------


def test_prompt_strings_match_the_spec():
    assert make_prompt("single_object", ["cross"]).text == "a photo of a cross"
    assert make_prompt("two_object", ["circle", "cross"]).text == "a photo of a circle and a cross"
    assert make_prompt("counting", ["cross"], n=3).text == "a photo of three crosses"
    assert make_prompt("counting", ["square"], n=2).text == "a photo of two squares"
    assert make_prompt("counting", ["triangle"], n=4).text == "a photo of four triangles"
    assert make_prompt("colors", ["circle"], ["purple"]).text == "a photo of a purple circle"
    assert make_prompt("position", ["circle", "square"], rel="left of").text == "a photo of a circle left of a square"
    assert make_prompt("position", ["cross", "triangle"], rel="below").text == "a photo of a cross below a triangle"
    got = make_prompt("color_attr", ["circle", "square"], ["red", "cyan"]).text
    assert got == "a photo of a red circle and a cyan square"
    for bad in [("two_object", ["circle", "circle"], ()), ("color_attr", ["circle", "square"], ["red", "red"])]:
        with pytest.raises(ValueError, match="different"):
            make_prompt(*bad)
    with pytest.raises(ValueError, match="n"):
        make_prompt("counting", ["cross"], n=5)
    rng = random.Random(0)
    for _ in range(300):
        p = sample_prompt(rng)
        assert p.tag in TAGS and parse_description(p.text) == p.requirement


COUNTEREXAMPLES = {  # tag -> (prompt, a scene that must fail it)
    "single_object": (make_prompt("single_object", ["circle"]), _scene(("square", "red", 10, 10, 12))),
    "two_object": (
        make_prompt("two_object", ["circle", "square"]),
        _scene(("circle", "red", 10, 10, 12), ("circle", "blue", 40, 10, 12)),
    ),
    "counting": (  # four crosses is not three
        make_prompt("counting", ["cross"], n=3),
        _scene(*[("cross", "red", x, y, 12) for x in (5, 40) for y in (5, 40)]),
    ),
    "colors": (
        make_prompt("colors", ["circle"], ["red"]),
        _scene(("circle", "blue", 10, 10, 12), ("square", "red", 40, 10, 12)),
    ),
    "position": (  # the circle is right of the square
        make_prompt("position", ["circle", "square"], rel="left of"),
        _scene(("circle", "red", 40, 10, 12), ("square", "red", 10, 10, 12)),
    ),
    "color_attr": (  # colours swapped between the shapes
        make_prompt("color_attr", ["circle", "square"], ["red", "blue"]),
        _scene(("circle", "blue", 10, 10, 12), ("square", "red", 40, 10, 12)),
    ),
}


@pytest.mark.parametrize("tag", TAGS)
def test_check_passes_generated_scenes_and_fails_counterexamples(tag):
    rng = random.Random(f"check-{tag}")
    for _ in range(100):
        prompt = sample_prompt(rng, tag)
        scene = scene_for(prompt, rng)
        assert scene_errors(scene) == [] and check(prompt, scene.objects), (prompt, scene)
        for rasteriser in RASTERISERS:
            assert check(prompt, detect(render(scene, rasteriser=rasteriser))), (prompt, scene, rasteriser)
    prompt, counter = COUNTEREXAMPLES[tag]
    assert not check(prompt, counter.objects)
    assert not check(prompt, detect(render(counter)))


def test_counting_is_exact_and_prompts_from_scenes_hold():
    three = _scene(*[("cross", "red", x, 10, 12) for x in (5, 25, 45)])
    assert check(make_prompt("counting", ["cross"], n=3), three.objects)
    assert not check(make_prompt("counting", ["cross"], n=2), three.objects)
    rng = random.Random(2)
    seen = Counter()
    for _ in range(500):
        scene = sample_scene(rng)
        for p in prompts_from_scene(scene, rng):
            seen[p.tag] += 1
            assert check(p, scene.objects), (p, scene)
            assert p.tag != "position" or position_safe(scene.objects)
    assert set(seen) == set(TAGS)
    assert prompts_from_scene(_scene(("circle", "red", 5, 5, 12)), rng) == [
        make_prompt("single_object", ["circle"]), make_prompt("colors", ["circle"], ["red"])]


def test_geneval_scores_average_the_tags():
    scores = geneval_scores(["colors", "colors", "counting"], [True, False, True])
    assert scores == {"colors": 0.5, "counting": 1.0, "overall": 0.75}
    with pytest.raises(ValueError, match="at most"):
        scene_for(Requirement((Group("circle", count=5, exact=True),)), random.Random(0))


# ---- descriptions ---------------------------------------------------------------------------


def test_parse_free_descriptions():
    got = parse_description("a red circle left of two blue squares")
    assert got.groups == (Group("circle", "red"), Group("square", "blue", 2, exact=True))
    assert got.relations == (Relation(0, "left of", 1),)
    got = parse_description("Three green crosses and a yellow triangle.")
    assert got.groups == (Group("cross", "green", 3, exact=True), Group("triangle", "yellow"))
    assert got.relations == () and got.unknown_words == ()
    scene = _scene(("circle", "red", 5, 20, 14), ("square", "blue", 30, 10, 12), ("square", "blue", 30, 40, 12))
    assert check(parse_description("a red circle left of two blue squares"), scene.objects)
    assert not check(parse_description("a red circle right of two blue squares"), scene.objects)
    assert not check(parse_description("a red circle left of three blue squares"), scene.objects)


def test_unknown_words_warn_not_crash():
    with pytest.warns(UserWarning, match="banana"):
        got = parse_description("a red banana circle and two")
    assert got.groups == (Group("circle", "red"),) and got.unknown_words == ("banana", "two")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_description("a banana", warn=False).unknown_words == ("banana", "a")
        assert parse_description("").groups == ()


def test_describe_round_trips_the_scene():
    rng = random.Random(4)
    for i in range(500):
        scene = sample_scene(rng)
        for text in (describe(scene), describe(scene, rng)):
            req = parse_description(text)
            assert req.unknown_words == ()
            got = Counter()
            for g in req.groups:
                got[(g.shape, g.color)] += g.count
            assert got == Counter((o.shape, o.color) for o in scene.objects), (text, scene)
            assert check(Requirement(req.groups, req.relations, complete=True), scene.objects), text
            if i < 100:  # a caption is also a prompt its own image satisfies
                assert check(req, detect(render(scene, rasteriser=RASTERISERS[i % len(RASTERISERS)]))), text
    assert describe(_scene(("cross", "green", 5, 5, 12), ("cross", "green", 5, 40, 12))) == "two green crosses"
    left_right = _scene(("circle", "red", 5, 20, 14), ("square", "blue", 40, 20, 12))
    assert describe(left_right) == "a red circle left of a blue square"


# ---- questions ------------------------------------------------------------------------------

# red circle top-left, blue square top-right, blue triangle bottom-left
HAND_SCENE = _scene(("circle", "red", 5, 5, 14), ("square", "blue", 40, 5, 14), ("triangle", "blue", 5, 40, 16))


@pytest.mark.parametrize(
    ("question", "answer"),
    [
        ("how many circles are there?", "one"),
        ("how many crosses are there?", "zero"),
        ("how many blue objects are there?", "two"),
        ("how many green objects are there?", "zero"),
        ("what color is the triangle?", "blue"),
        ("what color is the cross?", None),  # no cross: not asked
        ("what shape is the red object?", "circle"),
        ("what shape is the blue object?", None),  # two blue objects: not asked
        ("is there a red circle?", "yes"),
        ("is there a red square?", "no"),
        ("is the circle left of the square?", "yes"),
        ("is the square left of the circle?", "no"),
        ("is the circle above the triangle?", "yes"),
        ("is the triangle below the circle?", "yes"),
        ("is the square right of the triangle?", "no"),  # dx = 34 < dy = 36
        ("is the square above the triangle?", "yes"),
        ("is the circle left of the circle?", None),
        ("what is this?", None),
    ],
)
def test_answers_on_a_hand_built_scene(question, answer):
    assert answer_question(question, HAND_SCENE.objects) == answer
    assert answer_question(question, detect(render(HAND_SCENE, rasteriser="supersample"))) == answer


def test_questions_respect_preconditions():
    assert ask(HAND_SCENE, "shape", random.Random(0)).text == "what shape is the red object?"
    two_circles = _scene(("circle", "red", 5, 5, 14), ("circle", "blue", 40, 5, 14))
    rng = random.Random(0)
    assert ask(two_circles, "color", rng) is None and ask(two_circles, "position", rng) is None
    seen = Counter()
    for _ in range(1000):
        scene = sample_scene(rng)
        for q in questions_for_scene(scene, rng):
            seen[(q.type, q.answer)] += 1
            assert q.answer == answer_question(q.text, scene.objects) is not None
            assert q.answer == q.answer.lower() and " " not in q.answer
            assert q.type != "position" or position_safe(scene.objects)
    assert {t for t, _ in seen} == {"count", "count_color", "color", "shape", "exist", "position"}
    for t in ("exist", "position"):
        assert seen[(t, "yes")] > 0.25 * (seen[(t, "yes")] + seen[(t, "no")])  # not all "no"


def test_reading_questions_are_answered_by_their_description_alone():
    """Text-only turns: each answer equals the scene's own answer (the description lists every object and
    the relations it states hold in the scene); turns about stated relations come first."""
    rng = random.Random(1)
    relation_answers = Counter()
    pattern = re.compile(r"is the (?:(\w+) )?(\w+) (left of|right of|above|below) the (?:(\w+) )?(\w+)\?")
    for _ in range(600):
        scene = sample_scene(rng)
        description = describe(scene, rng)
        turns = reading_questions(description, rng, 3)
        assert 1 <= len(turns) <= 3, description
        req = parse_description(description, warn=False)
        singles = [r for r in req.relations if req.groups[r.a].count == req.groups[r.b].count == 1]
        for k, (text, answer) in enumerate(turns):
            prefix, question = text.split(". ", 1)
            assert prefix == description
            m = pattern.fullmatch(question)
            assert (m is not None) == (k < min(3, len(singles))), (description, turns)
            if m is None:
                assert answer == answer_question(question, scene.objects) is not None, (description, question)
                continue
            c1, s1, rel, c2, s2 = m.groups()
            a = [o for o in scene.objects if o.shape == s1 and c1 in (None, o.color)]
            b = [o for o in scene.objects if o.shape == s2 and c2 in (None, o.color)]
            assert len(a) == len(b) == 1, (description, question)
            assert answer == ("yes" if relation_holds(rel, a[0], b[0]) else "no"), (description, question)
            relation_answers[answer] += 1
    assert relation_answers["yes"] > 100 and relation_answers["no"] > 100
    assert reading_questions("a photo of a square above a circle", rng, 2) == []  # uncoloured items: no turns


def test_restate_questions_answer_with_the_converse():
    """Text-only turns `{A rel B}. the other way round?` -> `{B converse A}`: both sentences parse to the same
    two items and the relation reversed; every relation, plain and coloured items, and counts appear."""
    rng = random.Random(2)
    rels, forms = Counter(), Counter()
    for _ in range(400):
        (text, answer), = restate_questions(rng, 1)
        sentence, request = text.split(". ", 1)
        assert request == "the other way round?"
        q, a = parse_description(sentence), parse_description(answer)
        assert not q.unknown_words and not a.unknown_words, (text, answer)
        assert len(q.groups) == len(a.groups) == 2 and len(q.relations) == len(a.relations) == 1
        assert q.groups == a.groups[::-1] and q.groups[0].shape != q.groups[1].shape
        rel, back = q.relations[0].rel, a.relations[0].rel
        assert back == {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]
        rels[rel] += 1
        forms["photo" if sentence.startswith("a photo of ") else "plain"] += 1
        forms["coloured"] += q.groups[0].color is not None
        forms["counted"] += max(g.count for g in q.groups) > 1
    assert set(rels) == {"left of", "right of", "above", "below"} and min(rels.values()) > 60
    assert min(forms.values()) > 40, forms
    assert restate_questions(random.Random(5), 3) == restate_questions(random.Random(5), 3)
    assert restate_questions(rng, 0) == []


def test_plan_questions_put_the_left_or_top_item_first():
    """(prompt, plan) pairs: the plan names the prompt's two shapes, the one drawn left or on top first, with
    `left of` or `above`; a canonical scene drawn for the prompt satisfies the plan as well; every relation,
    the `a photo of` form and coloured and counted items appear."""
    from blip3o.shapes.prompts import canonical_scene

    rng, scene_rng = random.Random(4), random.Random(9)
    rels, forms = Counter(), Counter()
    for _ in range(400):
        (prompt, plan), = plan_questions(rng, 1)
        q, a = parse_description(prompt), parse_description(plan)
        assert not q.unknown_words and not a.unknown_words, (prompt, plan)
        rel = q.relations[0].rel
        first, stated, second = re.fullmatch(r"(\w+) (left of|above) (\w+)", plan).groups()
        assert a.relations[0].rel == stated == ("left of" if rel in ("left of", "right of") else "above")
        shapes = [g.shape for g in q.groups]
        assert [first, second] == (shapes if rel == stated else shapes[::-1]), (prompt, plan)
        if sum(g.count for g in q.groups) == 2:  # a canonical scene for it satisfies the plan as well
            scene = canonical_scene(q, scene_rng)
            assert check(q, scene.objects) and check(a, scene.objects), (prompt, plan)
            forms["canonical"] += 1
        forms["photo"] += prompt.startswith("a photo of ")
        forms["coloured"] += q.groups[0].color is not None
        forms["counted"] += max(g.count for g in q.groups) > 1
        rels[rel] += 1
    assert set(rels) == {"left of", "right of", "above", "below"} and min(rels.values()) > 60
    assert min(forms.values()) > 40, forms
    assert plan_questions(random.Random(5), 3) == plan_questions(random.Random(5), 3)


def test_score_answer_normalisation():
    q = Question("exist", "is there a red circle?", "yes")
    assert score_answer(q, "yes") and score_answer(q, " Yes. ") and score_answer(q, "YES")
    assert not score_answer(q, "no") and not score_answer(q, "yes!") and not score_answer(q, "yes..")
    assert normalize_answer(" Two. ") == "two"
    cap = Question(CAPTION, CAPTION_QUESTION, describe(HAND_SCENE, random.Random(0)))
    assert cap.text == "describe the image."
    assert score_answer(cap, cap.answer, HAND_SCENE) and score_answer(cap, describe(HAND_SCENE) + ".", HAND_SCENE)
    assert score_answer(cap, "A blue square, a red circle and a blue triangle.", HAND_SCENE)
    assert not score_answer(cap, "a red circle and a blue square", HAND_SCENE)  # misses the triangle
    assert not score_answer(cap, "a red circle and two blue squares", HAND_SCENE)
    assert not score_answer(cap, "a red circle right of a blue square and a blue triangle", HAND_SCENE)
    assert not score_answer(cap, "a red circle and a blue square and a blue triangle, probably", HAND_SCENE)
    with pytest.raises(ValueError, match="needs the scene"):
        score_answer(cap, cap.answer)


# ---- shards ---------------------------------------------------------------------------------


def _decoded(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_shards_round_trip_and_are_deterministic(tmp_path):
    paths = write_shards(tmp_path / "a", 300, seed=7, shard_size=128)
    assert [p.name for p in paths] == ["shapes-000000.tar", "shapes-000001.tar", "shapes-000002.tar"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [p.name for p in paths]  # no .tmp left
    stats = ReadStats()
    examples = list(iter_examples(tmp_path / "a", stats=stats))
    assert (stats.examples, stats.bad_examples, stats.bad_shards) == (300, 0, 0)
    for i, (image, meta) in enumerate(examples):
        want_image, want_meta = make_example(7, i)
        assert np.array_equal(_decoded(image), _decoded(want_image))
        assert {k: v for k, v in meta.items() if not k.startswith("__")} == want_meta
        assert meta["__key__"] == f"{i:09d}"
        scene = Scene.from_dict(meta["scene"])
        assert all(check(parse_description(p["prompt"]), scene.objects) for p in meta["prompts"])
        assert all(answer_question(q["question"], scene.objects) == q["answer"] for q in meta["questions"])
    again = write_shards(tmp_path / "b", 300, seed=7, shard_size=128)
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(paths, again, strict=True))
    other = write_shards(tmp_path / "c", 128, seed=8, shard_size=128)
    assert other[0].read_bytes() != paths[0].read_bytes()


def _rewrite(path, change) -> None:
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            data = change(m.name, data)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def test_broken_shards_and_examples_are_skipped_and_counted(tmp_path):
    paths = write_shards(tmp_path, 300, seed=1, shard_size=100)
    with tarfile.open(paths[1]) as tar:
        middle = tar.getmembers()[len(tar.getmembers()) // 2]
        cut = middle.offset_data + middle.size // 2  # inside that member's data, wherever it lies
    paths[1].write_bytes(paths[1].read_bytes()[:cut])

    def corrupt(name: str, data: bytes) -> bytes:
        if name == "000000205.png":
            return data[:50]
        return b"{not json" if name == "000000207.json" else data

    _rewrite(paths[2], corrupt)
    stats = ReadStats()
    keys = [meta["__key__"] for _, meta in iter_examples([str(p) for p in paths], stats=stats)]
    assert stats.bad_shards == 1 and stats.bad_examples >= 2 and stats.examples == len(keys)
    assert keys[:100] == [f"{i:09d}" for i in range(100)]  # the intact shard in full
    assert "000000205" not in keys and "000000207" not in keys and "000000299" in keys
    assert 200 + 40 < len(keys) < 300 - 2 and stats.errors
    stats = ReadStats()
    assert list(iter_examples([str(tmp_path / "missing.tar")], stats=stats)) == [] and stats.bad_shards == 1


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (a decompression bomb's signature)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_in_a_shard_is_skipped_and_counted(tmp_path):
    (path,) = write_shards(tmp_path, 5, seed=1, shard_size=5)
    _rewrite(path, lambda name, data: _png_declaring(12_000, 12_000) if name == "000000002.png" else data)
    stats = ReadStats()
    keys = [meta["__key__"] for _, meta in iter_examples([str(path)], stats=stats)]
    assert keys == ["000000000", "000000001", "000000003", "000000004"]
    assert stats.bad_examples == 1 and "144,000,000 pixels; the limit is" in " ".join(stats.errors)  # refused unread


def test_reads_generic_image_text_shards(tmp_path):
    path = tmp_path / "web-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i, color in enumerate(["red", "blue"]):
            jpg = io.BytesIO()
            Image.new("RGB", (32, 24), PALETTE[color]).save(jpg, format="JPEG")
            for name, data in [(f"{i:04d}.jpg", jpg.getvalue()), (f"{i:04d}.txt", f"a {color} thing".encode())]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("0002.json")  # text without an image: skipped
        payload = json.dumps({"caption": "lonely"}).encode()
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    stats = ReadStats()
    got = list(iter_examples(str(path), stats=stats))
    assert [(im.size, meta["text"]) for im, meta in got] == [((32, 24), "a red thing"), ((32, 24), "a blue thing")]
    assert (stats.examples, stats.bad_examples, stats.bad_shards) == (2, 1, 0)


def test_prompt_first_examples_are_described_whole():
    """Half the examples are drawn for a prompt: exactly its objects, so the prompt names every one."""
    drawn = 0
    for i in range(200):
        _, meta = make_example(11, i)
        scene = Scene.from_dict(meta["scene"])
        if meta["prompt"] is None:
            continue
        drawn += 1
        requirement = parse_description(meta["prompt"]["prompt"])
        assert check(requirement, scene.objects)
        assert len(scene.objects) == sum(g.count for g in requirement.groups), meta
    assert 70 <= drawn <= 130


def test_scene_for_without_extras_holds_only_what_is_named():
    rng = random.Random(0)
    for tag in TAGS:
        for _ in range(20):
            prompt = sample_prompt(rng, tag)
            scene = scene_for(prompt, rng, extras=False)
            assert check(prompt, scene.objects)
            assert len(scene.objects) == sum(g.count for g in prompt.requirement.groups)


def test_write_shards_prompt_first_share(tmp_path):
    """`--prompt-first 1`: every example pairs a GenEval prompt with a scene it describes whole."""
    write_shards(tmp_path / "all", 40, seed=5, shard_size=20, prompt_first=1.0)
    metas = [meta for _, meta in iter_examples(tmp_path / "all")]
    assert len(metas) == 40 and all(m["prompt"] is not None for m in metas)
    write_shards(tmp_path / "none", 20, seed=5, shard_size=20, prompt_first=0.0)
    assert all(m["prompt"] is None for _, m in iter_examples(tmp_path / "none"))
    with pytest.raises(ValueError, match="prompt_first must be a share"):
        write_shards(tmp_path / "bad", 4, seed=5, prompt_first=1.5)
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_ordered_scenes_put_each_named_object_in_its_region():
    """`ordered`: the region of every named object follows from the prompt's text, checked here from the
    scene's own coordinates (not through follows_layout), for every family on 600 prompts."""
    from blip3o.shapes.prompts import follows_layout

    rng = random.Random(3)
    for _ in range(100):
        for tag in TAGS:
            prompt = sample_prompt(rng, tag)
            req = prompt.requirement
            scene = scene_for(prompt, rng, extras=False, ordered=True)
            objs = scene.objects
            assert check(prompt, objs) and follows_layout(req, objs)
            assert len(objs) == sum(g.count for g in req.groups)
            if tag == "position":
                (rel,) = req.relations
                first = next(o for o in objs if o.shape == req.groups[rel.a].shape)
                second = next(o for o in objs if o.shape == req.groups[rel.b].shape)
                if rel.rel in ("left of", "right of"):
                    left, right = (first, second) if rel.rel == "left of" else (second, first)
                    assert left.cx < 32 <= right.cx, (prompt.text, scene)
                else:
                    top, bottom = (first, second) if rel.rel == "above" else (second, first)
                    assert top.cy < 32 <= bottom.cy, (prompt.text, scene)
            elif tag in ("two_object", "color_attr"):
                first = next(o for o in objs if o.shape == req.groups[0].shape)
                second = next(o for o in objs if o.shape == req.groups[1].shape)
                assert first.cx < 32 <= second.cx, (prompt.text, scene)
            elif tag == "counting":
                n = len(objs)
                quadrants, thirds = {(o.cx >= 32, o.cy >= 32) for o in objs}, {int(o.cx // (64 / n)) for o in objs}
                cells = quadrants if n == 4 else thirds
                assert len(cells) == n, (prompt.text, scene)  # one object in each region


def test_follows_layout_refuses_objects_out_of_their_region():
    from blip3o.shapes.prompts import follows_layout

    req = parse_description("a red circle and a blue square")
    right = _scene(("circle", "red", 5, 20, 14), ("square", "blue", 40, 20, 14))
    swapped = _scene(("circle", "red", 40, 20, 14), ("square", "blue", 5, 20, 14))
    assert follows_layout(req, right.objects) and not follows_layout(req, swapped.objects)
    below = parse_description("a circle below a square")
    assert follows_layout(below, _scene(("circle", "red", 20, 40, 14), ("square", "blue", 22, 5, 14)).objects)
    assert not follows_layout(below, _scene(("circle", "red", 20, 5, 14), ("square", "blue", 22, 40, 14)).objects)
    three = parse_description("three crosses")
    spread = _scene(*[("cross", "red", x, 20, 14) for x in (3, 25, 46)])
    crowded = _scene(("cross", "red", 3, 20, 14), ("cross", "red", 3, 40, 14), ("cross", "red", 46, 20, 14))
    assert follows_layout(three, spread.objects) and not follows_layout(three, crowded.objects)
    assert follows_layout(parse_description("a circle"), right.objects[:1])


def test_write_shards_ordered_share(tmp_path):
    """`--ordered 1` lays every prompt scene out in order and marks it; an example the option leaves alone is
    exactly the one written without it (`ordered` draws from a stream of its own)."""
    from blip3o.shapes.prompts import follows_layout

    write_shards(tmp_path / "ord", 30, seed=5, shard_size=30, prompt_first=1.0, ordered=1.0)
    for _, meta in iter_examples(tmp_path / "ord"):
        scene = Scene.from_dict(meta["scene"])
        assert meta["ordered"] is True
        assert follows_layout(parse_description(meta["prompt"]["prompt"]), scene.objects)
    half = [make_example(5, i, prompt_first=1.0, ordered=0.5)[1] for i in range(100)]
    assert 30 <= sum(m.get("ordered", False) for m in half) <= 70
    for i, meta in enumerate(half):  # an example not laid out in order is the one written without the option
        if not meta.get("ordered"):
            assert meta == make_example(5, i, prompt_first=1.0)[1]
    with pytest.raises(ValueError, match="ordered must be a share"):
        write_shards(tmp_path / "bad", 4, seed=5, ordered=-0.1)
    assert not (tmp_path / "bad").exists()


def test_canonical_scenes_centre_each_named_object_in_its_cell():
    """`canonical`: each named object's centre lies in the cell its name and order give, within the jitter;
    the scene holds exactly those objects, satisfies the prompt, and the detector reads it back."""
    from blip3o.shapes.prompts import SLOT_JITTER, canonical_cells, canonical_scene

    rng = random.Random(4)
    for _ in range(100):
        for tag in TAGS:
            prompt = sample_prompt(rng, tag)
            req = prompt.requirement
            scene = canonical_scene(prompt, rng)
            objs = scene.objects
            assert not scene_errors(scene) and check(prompt, objs)
            assert check(prompt, detect(render(scene, rng)))
            cells = canonical_cells(req)
            assert len(objs) == len(cells) == sum(g.count for g in req.groups)
            named = [g for g in req.groups for _ in range(g.count)]
            for o, g, (col, row) in zip(objs, named, cells, strict=True):
                assert o.shape == g.shape and (g.color is None or o.color == g.color)
                assert (int(o.cx // 8), int(o.cy // 8)) == (col, row), (prompt.text, scene)
                assert abs(o.cx - (8 * col + 4)) <= SLOT_JITTER + 0.5 and abs(o.cy - (8 * row + 4)) <= SLOT_JITTER + 0.5
            if tag == "position":  # the relation's first object sits where the relation names, in the middle row/column
                (rel,) = req.relations
                first, second = objs
                axis = "cx" if rel.rel in ("left of", "right of") else "cy"
                low_first = rel.rel in ("left of", "above")
                assert (getattr(first, axis) < getattr(second, axis)) == low_first
    # the cells, by hand: two objects left and right, a relation by its word, the first named first
    assert canonical_cells(parse_description("a red circle and a blue square")) == [(2, 4), (5, 4)]
    assert canonical_cells(parse_description("a circle below a square")) == [(4, 5), (4, 2)]
    assert canonical_cells(parse_description("four crosses")) == [(2, 2), (5, 2), (2, 5), (5, 5)]
    with pytest.raises(ValueError, match="one relation between two single objects"):
        canonical_cells(parse_description("a red circle left of two blue squares"))


def test_write_shards_canonical_share(tmp_path):
    """`--canonical 1` lays every prompt scene out in its cells and marks it; an example the option leaves alone
    is exactly the one written without it; canonical and ordered share the prompt scenes."""
    from blip3o.shapes.prompts import canonical_cells

    write_shards(tmp_path / "can", 30, seed=5, shard_size=30, prompt_first=1.0, canonical=1.0)
    for _, meta in iter_examples(tmp_path / "can"):
        objs = Scene.from_dict(meta["scene"]).objects
        assert meta["canonical"] is True and "ordered" not in meta
        cells = canonical_cells(parse_description(meta["prompt"]["prompt"]))
        assert [(int(o.cx // 8), int(o.cy // 8)) for o in objs] == cells
    mixed = [make_example(5, i, prompt_first=1.0, ordered=0.4, canonical=0.4)[1] for i in range(150)]
    n_can, n_ord = sum(m.get("canonical", False) for m in mixed), sum(m.get("ordered", False) for m in mixed)
    assert 35 <= n_can <= 85 and 35 <= n_ord <= 85
    assert not any(m.get("canonical") and m.get("ordered") for m in mixed)
    for i, meta in enumerate(mixed):  # neither: the example written without either option
        if not meta.get("canonical") and not meta.get("ordered"):
            assert meta == make_example(5, i, prompt_first=1.0)[1]
    with pytest.raises(ValueError, match="canonical must be a share"):
        write_shards(tmp_path / "bad", 4, seed=5, ordered=0.6, canonical=0.5)
    with pytest.raises(ValueError, match="canonical jitter must be an integer in 0..3"):
        write_shards(tmp_path / "bad", 4, seed=5, canonical=1.0, canonical_jitter=4)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="canonical must be a share"):  # one example is checked alike
        make_example(5, 0, prompt_first=1.0, canonical=1.5)
    # jitter 0: every centre on its cell's middle (up to half a pixel for odd sizes), every object 16 px
    write_shards(tmp_path / "still", 20, seed=5, shard_size=20, prompt_first=1.0, canonical=1.0, canonical_jitter=0)
    for _, meta in iter_examples(tmp_path / "still"):
        for o in Scene.from_dict(meta["scene"]).objects:
            assert o.size == 16 and o.cx % 8 == 4 and o.cy % 8 == 4


def test_tag_weights_draw_the_families_unevenly(tmp_path):
    """`tag_weights`: a family of weight 0 never appears, the others in proportion; data written without the
    option is unchanged; bad weights are refused before anything is written."""
    metas = [make_example(3, i, prompt_first=1.0, tag_weights={"position": 3, "single_object": 0})[1]
             for i in range(400)]
    tags = Counter(m["prompt"]["tag"] for m in metas)
    assert "single_object" not in tags and set(tags) == set(TAGS) - {"single_object"}
    assert tags["position"] > 2 * max(tags[t] for t in tags if t != "position")  # 3 : 1 expected
    assert make_example(3, 5)[1] == make_example(3, 5, tag_weights=None)[1]
    for bad, message in (({"bogus": 1}, "unknown prompt family 'bogus'"), ({"position": -1}, "must be a number >= 0"),
                         (dict.fromkeys(TAGS, 0), "all zero")):
        with pytest.raises(ValueError, match=message):
            write_shards(tmp_path / "bad", 4, seed=5, tag_weights=bad)
    assert not (tmp_path / "bad").exists()


def test_locate_questions_name_one_object_and_its_third_of_the_image():
    from blip3o.shapes.questions import locate_questions, where

    rng = random.Random(2)
    seen = set()
    for _ in range(300):
        scene = sample_scene(rng)
        for question, answer in locate_questions(scene, rng, 4):
            name = question.removeprefix("where is the ").removesuffix("?").split()
            match = [o for o in scene.objects if o.shape == name[-1] and (len(name) == 1 or o.color == name[0])]
            assert len(match) == 1, (question, scene)  # the question names exactly one object
            o = match[0]
            row = "top" if o.cy < 64 / 3 else "bottom" if o.cy >= 128 / 3 else "middle"
            col = "left" if o.cx < 64 / 3 else "right" if o.cx >= 128 / 3 else "centre"
            expected = col if row == "middle" else row if col == "centre" else f"{row} {col}"
            assert answer == where(o) == expected, (question, o)
            seen.add(answer)
        assert len(locate_questions(scene, rng, 1)) <= 1
    assert len(seen) == 9  # every third of the image comes up
