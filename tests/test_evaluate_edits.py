"""The editing part of `blip3o eval shapes`: scored with stand-in editors whose answers are known (the exact
target, the source unchanged), the seeds each edit gets, and a model that cannot edit."""

import json

import pytest

from blip3o.cli import main
from blip3o.shapes import EDIT_TYPES, Scene, render
from blip3o.shapes.evaluate import (
    evaluate_editing,
    evaluate_shapes,
    format_results,
    held_out_edits,
    training_world_edits,
)
from blip3o.shapes.render import HELD_OUT_RASTERISERS, RASTERISERS

CANNOT_EDIT = "editing: not scored, the model cannot edit"


class Editor:
    """Answers each edit with `answer(triplet)`, looked up by its source image and instruction; records the
    seeds it is given."""

    can_edit = True

    def __init__(self, triplets, answer):
        self.answers = {(t.source.tobytes(), t.instruction): answer(t) for t in triplets}
        self.seeds = []

    def edit(self, images, instructions, *, seed):
        self.seeds += seed
        return [self.answers[image.tobytes(), text] for image, text in zip(images, instructions, strict=True)]


class NoEditor:
    """Draws empty scenes and answers "no"; it cannot edit."""

    can_edit = False

    def generate(self, prompts, *, num_images, seed):
        return [render(Scene(())) for _ in range(len(prompts) * num_images)]

    def answer(self, images, questions, *, max_new_tokens):
        return ["no"] * len(questions)


def exact_target(triplet):
    return render(Scene.from_dict(triplet.meta["target"]), rasteriser=triplet.meta["rasteriser"])


@pytest.mark.parametrize("draw", [held_out_edits, training_world_edits])
def test_the_exact_target_scores_one_everywhere(draw):
    triplets = draw(3)
    result = evaluate_editing(Editor(triplets, exact_target), triplets, seed=7)
    assert result["per_type"] == {t: {"change": 1.0, "preservation": 1.0, "pass": 1.0} for t in EDIT_TYPES}
    assert result["edit_overall"] == 1.0 and result["num_per_type"] == dict.fromkeys(EDIT_TYPES, 3)


def test_the_source_left_unchanged_changes_nothing_and_keeps_everything():
    triplets = held_out_edits(3)
    result = evaluate_editing(Editor(triplets, lambda t: t.source), triplets, seed=7)
    assert result["per_type"] == {t: {"change": 0.0, "preservation": 1.0, "pass": 0.0} for t in EDIT_TYPES}
    assert result["edit_overall"] == 0.0


def test_each_edit_has_its_own_seed_whatever_the_batch():
    triplets = held_out_edits(2)
    for batch in (5, 16):
        editor = Editor(triplets, lambda t: t.source)
        result = evaluate_editing(editor, triplets, seed=40, batch=batch)
        assert editor.seeds == list(range(40, 40 + len(triplets)))
    # the grid: the edits of each type in order, a (source, edited) pair each
    assert [source.tobytes() for source, _ in result["samples"]] == [t.source.tobytes() for t in triplets]


def test_the_two_sets_draw_balanced_edits_with_their_own_rasterisers():
    held, world = held_out_edits(2), training_world_edits(2)
    assert [t.meta["type"] for t in held] == [t.meta["type"] for t in world] == [t for t in EDIT_TYPES
                                                                                 for _ in range(2)]
    assert {t.meta["rasteriser"] for t in held} == set(HELD_OUT_RASTERISERS[:1])
    assert {t.meta["rasteriser"] for t in world} <= set(RASTERISERS)
    assert all(t.instruction == t.meta["canonical"] for t in (*held, *world))  # the spec's wording
    assert [t.meta for t in training_world_edits(1)] == [t.meta for t in world[::2]]  # the same draws, any size


def test_a_model_that_cannot_edit_gets_one_line_and_no_edit_figures(tmp_path):
    results = evaluate_shapes(NoEditor(), tmp_path, per_tag=1, num_images=1, num_scenes=1)
    assert results["editing"] is None and results["settings"]["num_edits"] is None
    printed = format_results(results)
    assert printed.endswith(f"\n{CANNOT_EDIT}") and "edit overall" not in printed
    assert json.loads((tmp_path / "results.json").read_text())["editing"] is None
    assert not (tmp_path / "edits.png").exists()


def test_eval_shapes_says_when_the_model_cannot_edit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("blip3o.shapes.commands.load_for_command", lambda args: NoEditor())
    out = tmp_path / "ev"
    assert main(["eval", "shapes", "--model", "debug", "--out", str(out), "--per-tag", "1", "--num-images", "1",
                 "--num-scenes", "1", "--num-edits", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"\n{CANNOT_EDIT}\n" in printed and "edit overall" not in printed and "edits:" not in printed
    assert json.loads((out / "results.json").read_text())["editing"] is None
    assert not (out / "edits.png").exists()
