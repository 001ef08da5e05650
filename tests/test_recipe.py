"""The nano recipe end to end at a toy scale, the per-stage CLI path, and the Shapes evaluation."""

import json

import pytest

from blip3o import Blip3o
from blip3o.cli import main as cli_main
from blip3o.shapes import write_shards
from blip3o.shapes.evaluate import evaluate_shapes, format_results
from blip3o.train.recipe import NANO_STAGES, train_nano


@pytest.fixture(scope="module")
def nano_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nano")
    final = train_nano(out, num_samples=64, scale=0.001)  # one step per stage
    return out, final


def test_recipe_runs_all_stages_in_order(nano_run):
    out, final = nano_run
    for cfg in NANO_STAGES:
        assert (out / cfg.stage / "model" / "config.json").exists(), cfg.stage
        assert (out / cfg.stage / "checkpoint" / "trainer_state.pt").exists(), cfg.stage
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) >= {"data", "data_generation", "data_edit", "clip", "understanding", "decoder", "generation",
                            "edit", "total_s"}
    model = Blip3o.from_pretrained(final)
    assert model.config.decoder_negative == "zeros"
    assert model.can_edit and model.config.dit.source == "both"  # the edit stage ran last
    # the generation stage trained on shards of its own: prompt scenes in their canonical cells
    import torch

    from blip3o.shapes import iter_examples

    metas = [meta for _, meta in iter_examples(out / "data_generation")]
    assert len(metas) == round(64 * 0.8) and all(m["prompt"] is not None and m["canonical"] for m in metas)
    state = torch.load(out / "generation" / "checkpoint" / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert state["identity"]["train"]["data"] == [str(out / "data_generation")]
    assert state["identity"]["train"]["stage_options"] == {"prompt_share": 0.9}
    # the edit stage read the edit shards mixed with the generation shards
    state = torch.load(out / "edit" / "checkpoint" / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert state["identity"]["train"]["data"] == [str(out / "data_edit"), str(out / "data_generation")]


def test_recipe_runs_in_parts(nano_run, tmp_path):
    out, _ = nano_run
    data = out / "data"
    first = train_nano(tmp_path, data=data, scale=0.001, stages=["clip", "understanding"])
    assert first == tmp_path / "understanding" / "model" and not (tmp_path / "model").exists()
    final = train_nano(tmp_path, data=data, scale=0.001, stages=["decoder", "generation", "edit"], steps={"decoder": 2})
    assert final == tmp_path / "model" and (final / "config.json").exists()
    import torch

    state = torch.load(tmp_path / "decoder" / "checkpoint" / "trainer_state.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2  # set outright, not scaled (0.001 x 600 rounds to 1)
    timings = json.loads((tmp_path / "timings.json").read_text())  # both calls' stages
    # both calls' stages, and the generation shards this run wrote (the first shards were reused)
    assert set(timings) == {"clip", "understanding", "decoder", "generation", "edit", "data_generation", "data_edit",
                            "total_s", "threads"}
    assert timings["total_s"] == pytest.approx(sum(v for k, v in timings.items() if k not in ("total_s", "threads")))


def test_recipe_refuses_unknown_stages_and_bad_steps_before_any_work(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="unknown stage 'vision' in steps; the recipe's stages: clip, understanding"):
        train_nano(out, steps={"vision": 5})
    with pytest.raises(ValueError, match="steps of stage 'decoder' must be a positive integer, got 0"):
        train_nano(out, steps={"decoder": 0})
    with pytest.raises(ValueError, match="unknown stage 'decodr' in stages"):
        train_nano(out, stages=["decodr"])
    assert not out.exists()  # nothing written
    assert cli_main(["train", "nano", "--out", str(out), "--steps", "decoder=many"]) == 2
    assert cli_main(["train", "nano", "--out", str(out), "--steps", "vision=3"]) == 2
    assert not out.exists()


def test_evaluation_reports_every_tag_and_type(nano_run, tmp_path):
    _, final = nano_run
    results = evaluate_shapes(Blip3o.from_pretrained(final), tmp_path, per_tag=1, num_images=2, num_scenes=3,
                              num_edits=1)
    scores = results["generation"]["scores"]
    assert set(scores) == {"single_object", "two_object", "counting", "colors", "position", "color_attr", "overall"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert results["generation"]["num_images"] == 12
    assert "caption" in results["understanding"]["per_type"]
    assert (tmp_path / "samples.png").exists() and (tmp_path / "results.json").exists()
    assert "overall" in format_results(results)


def test_single_stage_from_config(nano_run, tmp_path):
    out, _ = nano_run
    data = tmp_path / "data"
    write_shards(data, 40, seed=3, shard_size=20)
    (data / "shapes-000001.tar").write_bytes((data / "shapes-000001.tar").read_bytes()[:5000])  # truncated
    config = {"stage": "decoder", "init": str(out / "clip" / "model"), "out_dir": str(tmp_path / "dec"),
              "data": [str(data)], "steps": 1, "batch_size": 4, "progress": False, "device": "cpu"}
    (tmp_path / "decoder.json").write_text(json.dumps(config))
    assert cli_main(["train", "decoder", "--config", str(tmp_path / "decoder.json")]) == 0
    assert (tmp_path / "dec" / "model" / "config.json").exists()
    config["batch_size"] = 3
    (tmp_path / "decoder.json").write_text(json.dumps(config))
    assert cli_main(["train", "decoder", "--config", str(tmp_path / "decoder.json")]) == 2  # refused resume


def test_unknown_words_still_draw_and_warn(nano_run):
    _, final = nano_run
    model = Blip3o.from_pretrained(final)
    with pytest.warns(UserWarning, match="no words .*'giraffe'"):
        images = model.generate(["a photo of a giraffe left of a red circle"], seed=0)
    assert len(images) == 1 and images[0].size == (64, 64)
