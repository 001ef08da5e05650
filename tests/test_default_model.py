"""The shipped default: nano's trained weights in the package, the default of the CLI, `make demo` and the API."""

import pytest
import torch

from blip3o import DEFAULT_MODEL, Blip3o
from blip3o.cli import main as cli_main
from blip3o.cli.entry import command_table
from blip3o.presets import preset_weights
from blip3o.train import TrainConfig, Trainer
from train_helpers import tiny_dataset

BUDGET = 25 * 2**20  # the most the shipped checkpoint may weigh: it ships inside the package


@pytest.fixture(scope="module")
def shipped():
    return Blip3o.from_preset()


def test_nano_ships_within_budget_and_is_the_default():
    folder = preset_weights("nano")
    assert DEFAULT_MODEL == "nano" and folder is not None
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= BUDGET, f"the shipped nano checkpoint is {size / 2**20:.1f} MiB, over the 25 MiB budget"
    for command in (["generate", "a circle"], ["demo"], ["eval", "shapes"], ["serve"]):
        assert command_table().parse(command).model == "nano"


def test_the_api_default_and_init_nano_load_the_shipped_weights_and_random_nano_does_not(shipped):
    assert shipped.config.extra.get("world") == "shapes"
    assert next(shipped.parameters()).dtype == torch.float32  # stored fp16, computed in fp32
    loaded = Blip3o.from_pretrained(preset_weights("nano"), dtype=torch.float32)
    for (name, a), (_, b) in zip(shipped.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    fresh = Blip3o.from_preset("nano", pretrained=False)
    assert not torch.equal(fresh.queries, shipped.queries)
    # a stage config's `init: random:nano` (the recipe's first stage) starts from random weights, `init: nano`
    # from the shipped ones
    for init, starts_shipped in (("random:nano", False), ("nano", True)):
        cfg = TrainConfig(stage="clip", init=init, out_dir="unused", steps=1, batch_size=2, device="cpu",
                          progress=False)
        trainer = Trainer(cfg, tiny_dataset())
        assert torch.equal(trainer.model.queries, shipped.queries) == starts_shipped, init


def test_the_shipped_model_draws_and_reads_a_shapes_scene(shipped):
    from blip3o.shapes.detect import detect

    images = shipped.generate(["a photo of a red circle"], num_images=2, seed=0)
    found = [detect(image) for image in images]
    assert any(any(o.shape == "circle" for o in objs) for objs in found), found
    (answer,) = shipped.answer([images[0]], ["how many circles are there?"])
    assert isinstance(answer, str) and answer.strip()


def test_make_demo_runs_the_shipped_model(tmp_path, capsys):
    assert cli_main(["demo", "--outdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[nano] generated" in out and "debug" not in out
    assert (tmp_path / "generated.png").exists()


def test_the_shipped_model_edits(shipped):
    from blip3o.shapes.edits import held_out_edit

    assert shipped.can_edit and shipped.config.edit_guidance is not None
    triplet = held_out_edit("recolor", 0)
    (edited,) = shipped.edit([triplet.source], [triplet.instruction], seed=0)
    assert edited.size == triplet.target.size
