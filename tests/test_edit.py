"""Editing in the model: the backbone's edit condition, the DiT's source readers, Blip3o.edit and the edit stage."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from blip3o import Blip3o
from blip3o.dit import DiT, DiTConfig
from blip3o.flow import sample_path
from blip3o.model import CannotEdit
from blip3o.presets import get_preset
from blip3o.shapes.edits import write_edit_shards
from blip3o.train.data import EditShardDataset, Mixture
from blip3o.train.stages.edit import EditStage
from blip3o.train.trainer import TrainConfig, Trainer
from train_helpers import fit_until_killed, tiny_dataset


def scene(color=(220, 40, 40), x=10) -> Image.Image:
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    ImageDraw.Draw(image).ellipse([x, 20, x + 16, 36], fill=color)
    return image


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Blip3o.from_preset("debug").eval()


def pixels(images):
    return [np.asarray(image) for image in images]


# ---------------------------------------------------------------------------- the backbone's condition


def test_edit_condition_reads_the_image_and_the_instruction(model):
    a, b = scene(), scene((40, 70, 210), x=30)
    with torch.no_grad():
        base = model.edit_condition([[a]], ["make the circle blue"])
        other_image = model.edit_condition([[b]], ["make the circle blue"])
        other_text = model.edit_condition([[a]], ["remove the circle"])
    assert base.shape == (1, model.config.num_queries, model.config.backbone.hidden_size)
    assert (base - other_image).abs().max() > 1e-4
    assert (base - other_text).abs().max() > 1e-4


def test_edit_condition_rows_are_independent_of_their_batch(model):
    a, b = scene(), scene((40, 70, 210), x=30)
    with torch.no_grad():
        together = model.edit_condition([[a], [a, b]], ["remove the circle", "put the first circle in the second"])
        first = model.edit_condition([[a]], ["remove the circle"])
        second = model.edit_condition([[a, b]], ["put the first circle in the second"])
    torch.testing.assert_close(together[0], first[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[1], second[0], atol=1e-5, rtol=1e-5)


def test_edit_condition_trains_the_queries_through_the_frozen_backbone(model):
    queries = model.queries.detach().clone().requires_grad_(True)
    sources, texts = [[scene()]], ["make the circle green"]
    cond = model.backbone.edit_condition(sources, texts, queries)  # the prompt once, then the queries
    cond.square().sum().backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    with torch.no_grad():
        whole = model.backbone.edit_condition(sources, texts, queries)  # one pass over the whole sequence
    torch.testing.assert_close(cond.detach(), whole, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- the DiT's readers


def tiny_dit(source: str) -> DiT:
    """A small DiT whose zero-initialised layers (output, modulations) hold random weights, so that every input
    shows in its output; an input reader stays at zero, as a fresh one is."""
    torch.manual_seed(0)
    dit = DiT(DiTConfig(in_channels=8, hidden_size=32, num_layers=2, num_heads=4, cond_size=16, multiple_of=16,
                        grid_size=4, cross_gate_init=1.0, source=source))
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if not name.startswith("source_embedder"):
                p.normal_(std=0.3)
    return dit


def predict(dit, cond, source, x_t, t):
    return dit.predict(x_t, t, dit.prepare_condition(cond, source=source))


def test_a_text_to_image_dit_gains_readers_and_first_generates_as_before():
    dit = tiny_dit("none")
    cond, x_t, t = torch.randn(2, 5, 16), torch.randn(2, 16, 8), torch.rand(2)
    before = dit.predict(x_t, t, dit.prepare_condition(cond))
    dit.add_source_readers("input")
    assert dit.config.source == "input" and dit.source_embedder is not None
    after = predict(dit, cond, torch.randn(2, 1, 16, 8), x_t, t)
    torch.testing.assert_close(after, before)
    with pytest.raises(ValueError, match="already reads source images"):
        dit.add_source_readers("context")


def test_the_input_reader_adds_the_source_token_by_token():
    dit = tiny_dit("input")
    torch.nn.init.normal_(dit.source_embedder.weight)
    cond, x_t, t = torch.randn(1, 5, 16), torch.randn(1, 16, 8), torch.rand(1)
    source = torch.randn(1, 1, 16, 8)
    out = predict(dit, cond, source, x_t, t)
    assert (out - dit.predict(x_t, t, dit.prepare_condition(cond))).abs().max() > 1e-4
    zeros = predict(dit, cond, torch.zeros_like(source), x_t, t)  # an all-zero slot is no source
    torch.testing.assert_close(zeros, dit.predict(x_t, t, dit.prepare_condition(cond)))


def test_the_context_reader_tells_sources_apart_and_ignores_empty_slots():
    dit = tiny_dit("context")
    cond, x_t, t = torch.randn(1, 5, 16), torch.randn(1, 16, 8), torch.rand(1)
    a, b = torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)
    one = predict(dit, cond, a, x_t, t)
    padded = predict(dit, cond, torch.cat([a, torch.zeros_like(a)], dim=1), x_t, t)
    torch.testing.assert_close(padded, one, atol=1e-5, rtol=1e-5)
    ab, ba = predict(dit, cond, torch.cat([a, b], 1), x_t, t), predict(dit, cond, torch.cat([b, a], 1), x_t, t)
    assert (ab - ba).abs().max() > 1e-5  # the image index is read
    with pytest.raises(ValueError, match="1 to 4 source images"):
        predict(dit, cond, torch.randn(1, 5, 16, 8), x_t, t)


def test_a_dit_without_readers_refuses_a_source():
    dit = tiny_dit("none")
    with pytest.raises(ValueError, match="does not read source images"):
        dit.prepare_condition(torch.randn(1, 5, 16), source=torch.randn(1, 1, 16, 8))
    with pytest.raises(ValueError, match="source must be one of"):
        DiTConfig(source="pixels")


def test_the_loss_reads_the_source():
    dit = tiny_dit("both")
    torch.nn.init.normal_(dit.source_embedder.weight)
    x_0, x_1, t = torch.randn(2, 16, 8), torch.randn(2, 16, 8), torch.rand(2)
    cond, source = torch.randn(2, 5, 16), torch.randn(2, 1, 16, 8)
    path = sample_path(x_0, x_1, t)
    assert dit.loss(path, cond, source=source) != dit.loss(path, cond, source=-source)


# ---------------------------------------------------------------------------- Blip3o.edit


def test_edit_returns_each_instructions_images_in_order_and_reproduces(model):
    a, b = scene(), scene((40, 70, 210), x=30)
    texts = ["make the circle blue", "put the circle of the first image in the colour of the second"]
    out = model.edit([a, [a, b]], texts, num_images=2, seed=[3, 4])
    assert len(out) == 4 and all(image.size == out[0].size for image in out)
    again = model.edit([a, [a, b]], texts, num_images=2, seed=[3, 4])
    assert all(np.array_equal(x, y) for x, y in zip(pixels(out), pixels(again), strict=True))
    alone = model.edit([[a, b]], texts[1:], num_images=2, seed=4)
    for x, y in zip(pixels(out[2:]), pixels(alone), strict=True):
        assert np.abs(x.astype(int) - y.astype(int)).max() <= 2  # batch rounding only


@pytest.mark.parametrize("images, texts, error", [
    ([], ["make it red"], "one source"),
    ([scene(), scene()], ["make it red"], "one source"),
    ([[]], ["make it red"], r"images\[0\] must be"),
    (["a.png"], ["make it red"], r"images\[0\] must be"),
    ([[scene()] * 5], ["make it red"], "1 to 4"),
    ([scene()], [""], "instructions"),
])
def test_bad_edit_arguments_are_refused(model, images, texts, error):
    with pytest.raises((ValueError, TypeError), match=error):
        model.edit(images, texts)


def test_a_text_to_image_model_says_it_cannot_edit():
    config = get_preset("debug")
    config.dit.source = "none"
    text_only = Blip3o(config)
    assert not text_only.can_edit
    with pytest.raises(CannotEdit, match="generates from text only"):
        text_only.edit([scene()], ["remove the circle"])


def test_an_input_reader_takes_one_source():
    config = get_preset("debug")
    config.dit.source = "input"
    with pytest.raises(ValueError, match="1 to 1"):
        Blip3o(config).edit([[scene(), scene()]], ["swap them"])


# ---------------------------------------------------------------------------- the edit stage


@pytest.fixture(scope="module")
def edit_shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edits")
    write_edit_shards(folder, 24, seed=0, shard_size=12)
    return folder


def test_edit_shards_read_as_edit_items(edit_shards):
    items = EditShardDataset(edit_shards)
    assert len(items) == 24
    item = items[5]
    assert set(item) == {"sources", "instruction", "image", "json"}
    assert len(item["sources"]) == 1 and item["instruction"] and item["image"].size == (64, 64)
    assert items[5]["instruction"] == item["instruction"]  # global item i is one example


class Cycle:
    """A list indexed by global item number, as the trainer's datasets are."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i % len(self.items)]


def test_a_mixture_draws_each_item_from_one_part_by_weight(edit_shards):
    mixture = Mixture([(EditShardDataset(edit_shards), 3.0), (Cycle(tiny_dataset(8)), 1.0)], seed=0)
    kinds = ["sources" in mixture[i] for i in range(400)]
    assert 0.65 < sum(kinds) / len(kinds) < 0.85
    assert kinds == ["sources" in mixture[i] for i in range(400)]  # the same draw every time
    with pytest.raises(ValueError, match="weights"):
        Mixture([(Cycle(tiny_dataset(2)), 0.0)])


def edit_config(tmp_path, **options) -> TrainConfig:
    return TrainConfig(stage="edit", init="random:debug", out_dir=str(tmp_path / "run"), steps=6, batch_size=8,
                       lr=3e-3, warmup_steps=1, ema_decay=0.0, log_every=100, checkpoint_every=1000, progress=False,
                       tensorboard=False, stage_options=options)


def text_to_image_model() -> Blip3o:
    torch.manual_seed(0)
    config = get_preset("debug")
    config.dit.source = "none"
    return Blip3o(config)


def test_the_edit_stage_makes_a_text_to_image_model_edit(tmp_path, edit_shards):
    data = Mixture([(EditShardDataset(edit_shards), 1.0), (Cycle(tiny_dataset(16)), 1.0)], seed=0)
    trainer = Trainer(edit_config(tmp_path, source="context"), data, model=text_to_image_model())
    assert trainer.model.config.dit.source == "context"
    assert {"queries", "dit.source_projection.weight"} <= {n for n, _ in trainer.named_params}
    out = trainer.fit()
    edited = Blip3o.from_pretrained(out)
    assert edited.can_edit and edited.config.dit.source == "context"
    assert len(edited.edit([scene()], ["remove the circle"], seed=0)) == 1


def test_frozen_queries_train_the_dit_alone_from_remembered_inputs(tmp_path, edit_shards):
    items = EditShardDataset(edit_shards)
    trainer = Trainer(edit_config(tmp_path, train_queries=False), items, model=text_to_image_model())
    assert all(name.startswith("dit.") for name, _ in trainer.named_params)
    stage: EditStage = trainer.stage
    batch = stage.collate([items[i] for i in range(4)], [0, 1, 2, 3], 0, torch.device("cpu"))
    with torch.no_grad():
        fresh = stage.inputs(batch["texts"], batch["sources"], batch["images"])
    remembered = stage.remembered_inputs(batch["texts"], batch["sources"], batch["images"])
    assert len(stage.frozen_inputs) == 4
    for x, y in zip(remembered, fresh, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    queries = trainer.model.queries.detach().clone()
    trainer.fit()
    torch.testing.assert_close(trainer.model.queries.detach(), queries, atol=0, rtol=0)


def test_the_edit_stage_learns(tmp_path, edit_shards):
    items = EditShardDataset(edit_shards)
    config = edit_config(tmp_path, train_queries=False)
    config.steps, config.log_every = 30, 1
    trainer = Trainer(config, items, model=text_to_image_model())
    stage, fixed = trainer.stage, [items[i] for i in range(8)]
    batch = stage.collate(fixed, list(range(8)), 0, torch.device("cpu"))
    with torch.no_grad():
        before = stage.loss(batch).item()
    trainer.fit()
    with torch.no_grad():
        after = stage.loss(batch).item()
    assert after < 0.8 * before


def test_an_empty_instruction_is_refused_in_a_batch(tmp_path, edit_shards):
    items = EditShardDataset(edit_shards)
    stage = EditStage(text_to_image_model(), {})
    item = dict(items[0], instruction="  ")
    with pytest.raises(ValueError, match="empty instruction"):
        stage.collate([item], [0], 0, torch.device("cpu"))


def test_edit_stage_options_are_checked():
    with pytest.raises(ValueError, match="stage option source"):
        TrainConfig(stage="edit", stage_options={"source": "pixels"})


def test_edit_guidance_is_the_default_scale_of_an_edit(model, monkeypatch):
    seen = []
    sample = model.sample_tokens
    monkeypatch.setattr(model, "sample_tokens", lambda *a, **k: seen.append(k["guidance"]) or sample(*a, **k))
    monkeypatch.setattr(model.config, "edit_guidance", 1.5)
    firsts = []
    for call in (lambda: model.edit([scene()], ["remove the circle"], seed=0),
                 lambda: model.edit([scene()], ["remove the circle"], seed=0, guidance=4.0),
                 lambda: model.generate(["a red circle"], seed=0)):
        seen.clear()
        call()
        firsts.append(seen[0])  # the tokens of the images (the decoder's negative may follow)
    assert firsts == [1.5, 4.0, None]  # generation keeps the config's guidance


def test_train_edit_streams_triplet_shards_from_the_command_line(tmp_path, edit_shards):
    from blip3o.cli import main as cli_main

    out = tmp_path / "run"
    code = cli_main(["train", "edit", "--init", "random:debug", "--data", str(edit_shards), "--out", str(out),
                     "--steps", "2", "--batch-size", "4", "--no-progress", "--no-tensorboard", "--device", "cpu"])
    assert code == 0
    model = Blip3o.from_pretrained(out / "model")
    assert model.can_edit and len(model.edit([scene()], ["make the circle red"], seed=0)) == 1
    bad = cli_main(["train", "edit", "--init", "random:debug", "--data", str(edit_shards), "--out", str(out / "x"),
                    "--stage-options", '{"source": "pixels"}'])
    assert bad == 2


def test_a_killed_edit_run_resumes_to_identical_weights(tmp_path, edit_shards):
    data = Mixture([(EditShardDataset(edit_shards), 1.0), (Cycle(tiny_dataset(16)), 1.0)], seed=0)

    def run(name: str) -> TrainConfig:
        cfg = edit_config(tmp_path / name, source="both")
        cfg.steps, cfg.checkpoint_every, cfg.ema_decay = 4, 2, 0.9
        return cfg

    straight = Trainer(run("a"), data, model=text_to_image_model())
    straight.fit()
    fit_until_killed(Trainer(run("b"), data, model=text_to_image_model()), 2)
    resumed = Trainer(run("b"), data, model=text_to_image_model())  # a text-to-image model gains its readers again
    resumed.fit()
    assert resumed.step == 4
    for (n, a), (_, b) in zip(straight.named_params, resumed.named_params, strict=True):
        assert torch.equal(a, b), n


def test_the_generation_stage_leaves_an_editing_dits_source_readers_alone(tmp_path):
    from blip3o.train.stages.generation import GenerationStage

    model = Blip3o.from_preset("debug")  # its DiT reads sources both ways
    named = dict(GenerationStage(model, {}).trainable(model))
    assert "dit.patch_embedder.proj.weight" in named and "queries" in named
    assert not [n for n in named if n.startswith("dit.source_")]
    assert not model.dit.source_index.requires_grad
