"""Shapes-world edits against the spec's "Edits" section: the drawn triplets, the grammar, the exact scorer
and its tolerances, the shards and the held-out edit file."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace

import pytest
from PIL import Image

from blip3o.shapes import (
    EDIT_TYPES,
    RASTERISERS,
    Edit,
    EditScore,
    Obj,
    ReadStats,
    Scene,
    detect,
    edit_scores,
    held_out_edit,
    iter_edits,
    make_edit,
    parse_instruction,
    render,
    scene_errors,
    score_edit,
    write_edit_file,
    write_edit_shards,
)
from blip3o.shapes.render import HELD_OUT_RASTERISERS

READ_BACK = 200  # rendered triplets of each type that the detector and scorer must read back exactly


def _scenes(triplet) -> tuple[Scene, Scene]:
    return Scene.from_dict(triplet.meta["source"]), Scene.from_dict(triplet.meta["target"])


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_rendered_targets_pass_and_sources_meet_the_rows_preconditions(edit_type):
    rasterisers = set()
    for i in range(READ_BACK):
        triplet = make_edit(11, i, edit_type=edit_type, paraphrase=0.0)
        source, target = _scenes(triplet)
        assert 1 <= len(source.objects) <= 3 and not scene_errors(source) and not scene_errors(target)
        assert score_edit(source, triplet.instruction, triplet.target).passed, triplet.meta
        assert score_edit(detect(triplet.source), triplet.instruction, triplet.target).passed, triplet.meta
        rasterisers.add(triplet.meta["rasteriser"])
    assert rasterisers == set(RASTERISERS)  # varied as the training data varies them


@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_the_source_left_unchanged_fails_the_change(edit_type):
    for i in range(50):
        triplet = make_edit(12, i, edit_type=edit_type, paraphrase=0.0)
        score = score_edit(_scenes(triplet)[0], triplet.instruction, triplet.source)
        assert not score.change and not score.passed, triplet.meta


@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_an_extra_object_fails_preservation(edit_type):
    triplet = make_edit(13, 0, edit_type=edit_type, paraphrase=0.0)
    source, target = _scenes(triplet)
    edit = parse_instruction(triplet.instruction)
    unnamed = next(s for s in ("circle", "square", "triangle", "cross") if s not in edit.shapes)
    score = score_edit(source, edit, [*target.objects, Obj(unnamed, "red", 2, 2, 12)])
    assert not score.preservation and not score.passed
    # one more of a named shape than asked: beyond what the source had too, except for remove, where the
    # source's own count bounds it and the change fails instead
    color = next(o.color for o in target.objects if o.shape == edit.shape) if edit.type == "count" else "red"
    score = score_edit(source, edit, [*target.objects, Obj(edit.shape, color, 48, 48, 12)])
    assert score.preservation is (edit.type == "remove") and not score.passed


@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_a_moved_unnamed_object_fails_preservation_and_a_3px_shift_does_not(edit_type):
    for i in range(100):
        triplet = make_edit(14, i, edit_type=edit_type, paraphrase=0.0)
        source, target = _scenes(triplet)
        edit = parse_instruction(triplet.instruction)
        if any(o.shape not in edit.shapes for o in target.objects):
            break
    else:
        pytest.fail(f"no {edit_type} edit with an unnamed object in 100 draws")
    k = next(j for j, o in enumerate(target.objects) if o.shape not in edit.shapes)

    def shifted(dx: int) -> list[Obj]:
        return [replace(o, x=o.x + dx) if j == k else o for j, o in enumerate(target.objects)]

    assert score_edit(source, edit, shifted(3)).preservation
    assert not score_edit(source, edit, shifted(4)).preservation


def test_unchanged_tolerances_at_their_boundaries():
    source = Scene((Obj("circle", "red", 10, 10, 14), Obj("square", "blue", 40, 40, 14)))
    square = source.objects[1]
    edit = "make the circle green"
    target = [Obj("circle", "green", 10, 10, 14)]
    for kept, ok in ((replace(square, x=43), True), (replace(square, x=44), False),
                     (replace(square, x=42, y=42), True),  # centres 2.83 px apart
                     (replace(square, x=43, y=42), False),  # 3.61 px
                     (replace(square, size=17, x=39, y=39), True),  # 3 px wider and taller, centre 0.5 px off
                     (replace(square, size=18, x=38, y=38), False),  # 4 px
                     (replace(square, color="purple"), False), (Obj("circle", "blue", 40, 40, 14), False)):
        assert score_edit(source, edit, [*target, kept]).preservation is ok, kept
    # in place: the asked colour, and the same tolerances
    assert score_edit(source, edit, [Obj("circle", "green", 13, 10, 14), square]).change
    assert not score_edit(source, edit, [Obj("circle", "green", 14, 10, 14), square]).change
    assert not score_edit(source, edit, [Obj("circle", "cyan", 10, 10, 14), square]).change


def test_swap_tolerance_is_4px_from_the_others_old_centre():
    circle, square = Obj("circle", "red", 10, 10, 14), Obj("square", "blue", 40, 10, 14)
    source = Scene((circle, square))
    edit = "swap the circle and the square"
    for dx, ok in ((0, True), (4, True), (5, False), (-4, True)):
        swapped = [replace(circle, x=40 + dx), replace(square, x=10)]
        assert score_edit(source, edit, swapped).change is ok, dx
    assert not score_edit(source, edit, [replace(circle, x=43, y=13), replace(square, x=10)]).change  # 4.24 px
    assert not score_edit(source, edit, [replace(circle, x=40, color="cyan"), replace(square, x=10)]).change
    assert not score_edit(source, edit, [replace(circle, x=40, size=18), replace(square, x=10)]).change


def test_named_shapes_count_rule():
    source = Scene((Obj("circle", "red", 10, 10, 14), Obj("square", "blue", 40, 40, 14)))
    square = source.objects[1]
    # remove: a circle elsewhere is no removal; count: no more than asked; add: one new shape only
    assert not score_edit(source, "remove the circle", [Obj("circle", "red", 20, 40, 14), square]).change
    assert score_edit(source, "remove the circle", [square]).passed
    three = [Obj("circle", "red", x, 10, 12) for x in (2, 20, 40)]
    assert score_edit(source, "make it three circles", [*three, square]).passed
    assert not score_edit(source, "make it three circles", [*three, Obj("circle", "red", 2, 40, 12), square]).passed
    assert not score_edit(source, "make it three circles", [*three[:2], replace(three[2], color="cyan"),
                                                            square]).change
    added = Obj("triangle", "green", 10, 40, 14)
    assert score_edit(source, "add a green triangle left of the square", [*source.objects, added]).passed
    assert not score_edit(source, "add a green triangle left of the square",
                          [*source.objects, added, Obj("triangle", "green", 10, 22, 12)]).preservation
    assert not score_edit(source, "add a green triangle left of the square",
                          [source.objects[0], replace(square, x=44), added]).change  # the anchor moved


def test_the_scorer_refuses_a_source_the_row_excludes():
    two_circles = Scene((Obj("circle", "red", 10, 10, 14), Obj("circle", "red", 40, 40, 14)))
    with pytest.raises(ValueError, match="holds 2 circles"):
        score_edit(two_circles, "remove the circle", [])
    pair = Scene((Obj("circle", "red", 10, 10, 14), Obj("square", "blue", 40, 10, 14)))
    with pytest.raises(ValueError, match="left of the square already"):
        score_edit(pair, "move the circle left of the square", list(pair.objects))
    with pytest.raises(ValueError, match="red already"):
        score_edit(pair, "make the circle red", list(pair.objects))
    with pytest.raises(ValueError, match="not 2 of them"):
        score_edit(two_circles, Edit("count", "circle", n=2), list(two_circles.objects))
    with pytest.raises(ValueError, match="outside the edit grammar"):
        score_edit(pair, "delete the circle", [])


def test_the_parser_round_trips_every_generated_instruction():
    seen = set()
    for i in range(300):
        triplet = make_edit(15, i, paraphrase=0.0)
        edit = parse_instruction(triplet.instruction)
        assert edit.text == triplet.instruction == triplet.meta["canonical"]
        assert edit.to_dict() == triplet.meta["edit"] and edit.type == triplet.meta["type"]
        seen.add(edit.type)
    assert seen == set(EDIT_TYPES)
    assert parse_instruction("  Make it THREE squares. ") == Edit("count", "square", n=3)


@pytest.mark.parametrize("text", [
    "turn the circle blue", "delete the square", "put a red cross left of the triangle", "exchange the circle and "
    "the square", "change it to three squares", "make the circle circle", "make the circle pink",
    "add a red circle left of the circle", "swap the cross and the cross", "make it one circle",
    "make it five circles", "make it 3 circles", "make it three circle", "move the circle near the square",
    "remove the circle please", "",
])
def test_the_parser_refuses_text_outside_the_grammar(text):
    with pytest.raises(ValueError):
        parse_instruction(text)


def test_training_instructions_are_paraphrased_behind_the_option():
    phrased = [make_edit(16, i, paraphrase=1.0) for i in range(60)]
    outside = 0
    for triplet in phrased:
        assert parse_instruction(triplet.meta["canonical"]).to_dict() == triplet.meta["edit"]
        try:
            parse_instruction(triplet.instruction)
        except ValueError:
            outside += 1
    assert outside > 30
    plain = make_edit(16, 5, paraphrase=0.0)
    assert _png(plain.source) == _png(phrased[5].source) and _png(plain.target) == _png(phrased[5].target)


def test_triplets_are_deterministic_in_seed_and_index():
    a, b, c = make_edit(17, 3), make_edit(17, 3), make_edit(17, 4)
    assert (_png(a.source), _png(a.target), a.instruction, a.meta) == (_png(b.source), _png(b.target),
                                                                       b.instruction, b.meta)
    assert a.meta != c.meta
    assert make_edit(18, 3).meta != a.meta


def test_edit_scores_is_the_mean_of_the_types_pass_rates():
    scores = [EditScore("recolor", True, True, True), EditScore("recolor", True, False, False),
              EditScore("remove", False, True, False)]
    result = edit_scores(scores)
    assert result["recolor"] == {"change": 1.0, "preservation": 0.5, "pass": 0.5}
    assert result["remove"] == {"change": 0.0, "preservation": 1.0, "pass": 0.0}
    assert result["overall"] == 0.25


def test_edit_shards_read_back_with_the_shard_reader(tmp_path):
    paths = write_edit_shards(tmp_path, 5, seed=19, shard_size=2)
    assert [p.name for p in paths] == ["edits-000000.tar", "edits-000001.tar", "edits-000002.tar"]
    with tarfile.open(paths[0]) as tar:
        assert tar.getnames()[:4] == ["000000000.src.png", "000000000.tgt.png", "000000000.txt", "000000000.json"]
    stats = ReadStats()
    read = list(iter_edits(tmp_path, stats=stats))
    assert stats.examples == 5 and stats.bad_examples == 0
    for i, triplet in enumerate(read):
        made = make_edit(19, i)
        assert triplet.instruction == made.instruction
        assert _png(triplet.source) == _png(made.source) and _png(triplet.target) == _png(made.target)
        assert {k: v for k, v in triplet.meta.items() if not k.startswith("__")} == made.meta
    with tarfile.open(tmp_path / "broken.tar", "w") as tar:  # a sample without its target is skipped, counted
        info = tarfile.TarInfo("000000000.src.png")
        data = _png(make_edit(19, 0).source)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    stats = ReadStats()
    assert list(iter_edits([tmp_path / "broken.tar"], stats=stats)) == []
    assert stats.bad_examples == 1 and "lacks" in stats.errors[0]


def test_the_held_out_edit_file(tmp_path):
    path = write_edit_file(tmp_path / "edits", per_type=2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    scenes = [json.loads(line) for line in (path.parent / "scenes.jsonl").read_text().splitlines()]
    assert len(lines) == len(scenes) == 2 * len(EDIT_TYPES)
    assert [s["type"] for s in scenes] == [t for t in EDIT_TYPES for _ in range(2)]
    for line, scene in zip(lines, scenes, strict=True):
        assert set(line) == {"image", "instruction"} and line["instruction"] == scene["instruction"]
        source = Scene.from_dict(scene["source"])
        image = Image.open(path.parent / line["image"])
        assert image.tobytes() == render(source, rasteriser=HELD_OUT_RASTERISERS[0]).tobytes()
        parse_instruction(line["instruction"])
    held_out = held_out_edit("move", 1)
    assert held_out.meta["rasteriser"] not in RASTERISERS and held_out.meta["source"] == scenes[7]["source"]
    assert score_edit(Scene.from_dict(scenes[7]["source"]), scenes[7]["instruction"], held_out.target).passed


@pytest.mark.parametrize(("fields", "message"), [
    (dict(type="add", shape="circle", shape2="circle", color="red", rel="above"), "two different shapes"),
    (dict(type="move", shape="circle"), r"move takes \['rel', 'shape2'\]"),
    (dict(type="count", shape="circle", n=5), "two to four"),
    (dict(type="recolor", shape="circle", color="pink"), "unknown color 'pink'"),
    (dict(type="resize", shape="circle"), "unknown edit type 'resize'"),
])
def test_an_edit_the_spec_forbids_is_refused_naming_what_is_wrong(fields, message):
    with pytest.raises(ValueError, match=message):
        Edit(**fields)


@pytest.mark.parametrize("edit_type", EDIT_TYPES)
def test_held_out_targets_pass_read_from_both_images(edit_type):
    for i in range(50):
        triplet = held_out_edit(edit_type, i)
        assert triplet.meta["rasteriser"] == HELD_OUT_RASTERISERS[0]
        assert triplet.instruction == triplet.meta["canonical"]
        assert score_edit(detect(triplet.source), triplet.instruction, triplet.target).passed, triplet.meta
        assert not score_edit(detect(triplet.source), triplet.instruction, triplet.source).change, triplet.meta
