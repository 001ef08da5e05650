"""`blip3o eval shapes`: its two sets (held-out, the default, and training-world), their draws and their
bookkeeping, with stand-in models (no network, no weights) and the debug preset end to end."""

import json
import random
from collections import Counter

import pytest
from PIL import Image

from blip3o.cli import main
from blip3o.images import image_grid
from blip3o.shapes import EDIT_TYPES, TAGS, detect, evaluation_prompts, make_example
from blip3o.shapes.evaluate import (
    EVAL_SEED,
    GRID_PER_TAG,
    HELD_OUT_RASTERISER,
    evaluate_generation,
    evaluate_shapes,
    held_out_items,
    held_out_prompts,
    held_out_random,
    training_world_items,
)
from blip3o.shapes.questions import CAPTION, QUESTION_TYPES
from blip3o.shapes.render import HELD_OUT_RASTERISERS, RASTERISERS, render
from blip3o.train.streams import STREAMS, stream_seed

TRAINING_SEEDS = (0, 1)  # the recipe's: its data (`train nano --seed 0`) and its generation data (seed + 1)


class BlankModel:
    """Draws nothing: every check fails, every image is the same; it cannot edit."""

    can_edit = False

    def generate(self, prompts, *, num_images, seed):
        return [Image.new("RGB", (64, 64), (250, 250, 250)) for _ in range(len(prompts) * num_images)]


class AnswersModel(BlankModel):
    """Answers every question of the types in `right` correctly (from the item's own answer), others wrongly."""

    def __init__(self, items, right):
        self.answers = {(it.image.tobytes(), it.question.text): it.question.answer for it in items}
        self.types = {(it.image.tobytes(), it.question.text): it.question.type for it in items}
        self.right = right

    def answer(self, images, questions, *, max_new_tokens):
        keys = [(image.tobytes(), q) for image, q in zip(images, questions, strict=True)]
        return [self.answers[k] if self.types[k] in self.right else "banana" for k in keys]


def test_the_sample_grid_has_a_row_per_tag_in_prompt_order():
    per_tag = GRID_PER_TAG + 2
    prompts = evaluation_prompts(per_tag, 5)
    result = evaluate_generation(BlankModel(), prompts, num_images=2, seed=5)
    expected = [p.text for tag in TAGS for p in [q for q in prompts if q.tag == tag][:GRID_PER_TAG]]
    assert [text for text, _ in result["samples"]] == expected
    assert result["num_images"] == 2 * per_tag * len(TAGS)
    assert result["scores"]["overall"] == 0.0 and result["diverse_prompts"] == 0.0
    grid = image_grid([image for _, image in result["samples"]], columns=GRID_PER_TAG)
    assert grid.size == (GRID_PER_TAG * 64, len(TAGS) * 64)


def test_held_out_prompts_are_balanced_and_deterministic():
    prompts = held_out_prompts(7)
    assert Counter(p.tag for p in prompts) == {tag: 7 for tag in TAGS}
    assert prompts == held_out_prompts(7) and prompts != held_out_prompts(7, EVAL_SEED + 1)


def test_held_out_questions_are_balanced_over_the_six_types_and_drawn_by_the_held_out_rasteriser():
    items = held_out_items(5)
    assert Counter(it.question.type for it in items) == {t: 5 for t in (*QUESTION_TYPES, CAPTION)}
    assert set(QUESTION_TYPES) == {"count", "count_color", "color", "shape", "exist", "position"}
    assert HELD_OUT_RASTERISER in HELD_OUT_RASTERISERS and HELD_OUT_RASTERISER not in RASTERISERS
    for it in items:
        assert it.image.tobytes() == render(it.scene, rasteriser=HELD_OUT_RASTERISER).tobytes()
        # the reference detector reads the scene back: each answer holds on what it reads
        assert sorted((d.shape, d.color) for d in detect(it.image)) == sorted(
            (o.shape, o.color) for o in it.scene.objects)


def test_held_out_streams_cannot_meet_a_training_stream():
    """Training draws are seeded `shapes-{seed}-{index}[-layout]` strings or 63-bit integers; a string seed
    enters random.Random's seed verbatim, so a `heldout-` string never seeds like any of them."""
    probe = held_out_random(EVAL_SEED, "count", 0)
    assert probe.getstate() == random.Random(f"heldout-{EVAL_SEED}-count-0").getstate()
    for seed in (*TRAINING_SEEDS, EVAL_SEED):
        for index in range(3):
            assert probe.getstate() != random.Random(f"shapes-{seed}-{index}").getstate()
            for stream in STREAMS:
                assert probe.getstate() != random.Random(stream_seed(seed, index, stream)).getstate()


def test_no_held_out_scene_is_a_training_scene_of_the_recipe():
    held_out = {json.dumps(it.scene.to_dict(), sort_keys=True) for it in held_out_items(20)}
    training = {json.dumps(make_example(seed, i)[1]["scene"], sort_keys=True)
                for seed in TRAINING_SEEDS for i in range(1500)}
    assert len(training) > 2900 and not held_out & training


def test_vqa_overall_is_the_mean_of_the_six_types_on_the_held_out_set(tmp_path):
    items = held_out_items(2)
    model = AnswersModel(items, right={"count", "exist", CAPTION})
    results = evaluate_shapes(model, tmp_path, per_tag=1, num_images=1, num_scenes=2)
    und = results["understanding"]
    assert und["per_type"] == {"count": 1.0, "count_color": 0.0, "color": 0.0, "shape": 0.0, "exist": 1.0,
                               "position": 0.0, CAPTION: 1.0}
    assert und["num_per_type"] == {t: 2 for t in (*QUESTION_TYPES, CAPTION)}
    assert und["vqa_overall"] == pytest.approx(2 / 6) and und["caption"] == 1.0


def test_training_world_set_keeps_the_training_mix_and_its_overall(tmp_path):
    items = training_world_items(4)
    model = AnswersModel(items, right={"count"})
    results = evaluate_shapes(model, tmp_path, eval_set="training-world", per_tag=1, num_images=1, num_scenes=4)
    und = results["understanding"]
    counts = Counter(it.question.type for it in items)
    assert und["num_per_type"] == dict(counts) and counts[CAPTION] == 4
    asked = sum(n for t, n in counts.items() if t != CAPTION)
    assert und["vqa_overall"] == pytest.approx(counts["count"] / asked)
    assert [it.image.tobytes() for it in items[:1]] == [make_example(EVAL_SEED, 0, prompt_first=0.0)[0].tobytes()]
    assert results["settings"]["set"] == "training-world"


def test_an_unknown_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown evaluation set 'test'"):
        evaluate_shapes(BlankModel(), tmp_path, eval_set="test")
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("eval_set", ["held-out", "training-world"])
def test_eval_shapes_command_records_its_set_and_settings(tmp_path, capsys, eval_set):
    out = tmp_path / "ev"
    code = main(["eval", "shapes", "--model", "debug", "--out", str(out), "--set", eval_set, "--per-tag", "1",
                 "--num-images", "1", "--num-scenes", "1", "--num-edits", "1", "--steps", "2"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert settings["set"] == eval_set and settings["model"] == "debug" and settings["seed"] == EVAL_SEED
    assert (settings["per_tag"], settings["num_images"], settings["num_scenes"], settings["num_edits"]) == (1, 1, 1, 1)
    assert settings["sampling"]["steps"] == 2
    assert set(results["generation"]["scores"]) == {*TAGS, "overall"}
    assert results["generation"]["num_images"] == len(TAGS)
    held_out = eval_set == "held-out"
    assert settings["rasteriser"] == (HELD_OUT_RASTERISER if held_out else "the training data's mix")
    assert settings["vqa_overall"] == ("mean of the six types" if held_out else "over all questions")
    if held_out:
        assert results["understanding"]["num_per_type"] == {t: 1 for t in (*QUESTION_TYPES, CAPTION)}
    editing = results["editing"]  # the debug model edits: one edit of each type, scored
    assert editing["num_per_type"] == dict.fromkeys(EDIT_TYPES, 1) and editing["num_edits"] == len(EDIT_TYPES)
    assert set(editing["per_type"]["move"]) == {"change", "preservation", "pass"}
    assert editing["edit_overall"] == pytest.approx(sum(s["pass"] for s in editing["per_type"].values()) / 6)
    printed = capsys.readouterr().out
    assert f"set: {eval_set}" in printed and (out / "samples.png").exists()
    assert "\nediting\n                 change preservation   pass\n" in printed
    assert all(f"\n  {t:<14} " in printed for t in EDIT_TYPES) and "  edit overall   " in printed
    assert f"edits: {out / 'edits.png'}" in printed
    with Image.open(out / "edits.png") as grid:  # a (source, edited) pair a row, one row per type
        assert grid.size == (2 * 64, len(EDIT_TYPES) * 64)


def test_eval_shapes_refuses_an_unknown_set(tmp_path, capsys):
    assert main(["eval", "shapes", "--model", "debug", "--out", str(tmp_path / "ev"), "--set", "train"]) == 2
    assert "invalid choice: 'train'" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()
