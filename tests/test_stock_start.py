"""The generation stage started from a stock Qwen2.5-VL folder: the folder's backbone exactly, fresh seeded
queries and DiT, and the CLIP encoder and decoder of `generation_from` (an official BLIP3-o folder here, whose
CLIP-target cache then trains the model; or a preset, whose random encoder is refused as a target).

The stock folder and the official folder are the tiny ones the stock and official checkpoint tests fabricate."""

import json

import pytest
import torch

from blip3o import Blip3o
from blip3o.checkpoints.stock_start import stock_generation_start
from blip3o.cli import main as cli_main
from blip3o.data.targets import encoder_identity
from blip3o.train import TrainConfig, Trainer
from blip3o.train.trainer import load_init
from test_clip_targets import write_shards
from test_official_checkpoint import parts, write_official  # noqa: F401  (fixtures: a tiny official folder)
from test_stock_qwen import folder  # noqa: F401  (fixture: a tiny stock Qwen2.5-VL folder)
from train_helpers import tiny_dataset

CPU = torch.device("cpu")
ITEMS = tiny_dataset(8)


@pytest.fixture(scope="module")
def official(parts, tmp_path_factory):  # noqa: F811
    return write_official(tmp_path_factory.mktemp("official") / "folder", parts)


@pytest.fixture(scope="module")
def cache(official, tmp_path_factory):
    """The CLIP targets of 8 samples, made with the official folder as docs/training.md says."""
    root = tmp_path_factory.mktemp("targets")
    shards = write_shards(root / "shards", ITEMS)
    out = root / "cache"
    assert cli_main(["data", "clip-targets", "--model", str(official), "--data", shards, "--out", str(out),
                     "--device", "cpu"]) == 0
    return out


def generation_config(out, stock, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(stage="generation", init=str(stock), out_dir=str(out), steps=15, batch_size=8,
                                 lr=3e-3, warmup_steps=2, log_every=1, checkpoint_every=100, progress=False,
                                 device="cpu", ema_decay=0.0, precision="fp32"), **kw})


@pytest.fixture(scope="module")
def trained(folder, official, cache, tmp_path_factory):  # noqa: F811
    """15 steps on the 8 cached samples, run as docs/training.md says; (the exported folder, the metrics)."""
    out = tmp_path_factory.mktemp("run")
    assert cli_main(["train", "generation", "--init", str(folder), "--generation-from", str(official),
                     "--data", str(cache), "--out", str(out), "--steps", "15", "--batch-size", "8", "--lr", "3e-3",
                     "--warmup-steps", "2", "--log-every", "1", "--ema-decay", "0", "--precision", "fp32",
                     "--device", "cpu", "--no-progress"]) == 0
    return out / "model", [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def backbone_state(model: Blip3o) -> dict[str, torch.Tensor]:
    return dict(model.backbone.state_dict())


def test_the_start_is_the_stock_backbone_with_the_official_towers_and_fresh_parts(folder, official):  # noqa: F811
    start = stock_generation_start(folder, str(official))
    stock, source = Blip3o.from_pretrained(folder), Blip3o.from_pretrained(official)
    assert start.config.backbone.generates and not start.config.clip_encoder_random
    assert start.backbone.img_token_id == 151665  # [IMG] after Qwen's 151,665 tokens, as the original adds it
    for name, tensor in backbone_state(stock).items():
        assert torch.equal(backbone_state(start)[name], tensor), name
    assert encoder_identity(start) == encoder_identity(source)
    for name, tensor in source.decoder.state_dict().items():
        assert torch.equal(start.decoder.state_dict()[name], tensor), name
    assert start.config.dit == source.config.dit and start.queries.shape == source.queries.shape
    assert not torch.equal(start.queries, source.queries)
    again = stock_generation_start(folder, str(official))  # every process draws the same fresh parts
    assert torch.equal(again.queries, start.queries)
    for (name, a), (_, b) in zip(again.dit.state_dict().items(), start.dit.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_training_from_the_official_cache_lowers_the_loss(trained):
    _, lines = trained
    losses = [line["loss"] for line in lines]
    assert len(losses) == 15
    assert sum(losses[-3:]) < 0.4 * sum(losses[:3]), losses


def test_the_exported_model_keeps_the_stock_backbone_loads_and_generates(trained, folder, official):  # noqa: F811
    exported, _ = trained
    model = Blip3o.from_pretrained(exported)
    assert model.config.backbone.generates and model.config.extra["converted_from"] == "stock Qwen2.5-VL"
    for name, tensor in backbone_state(Blip3o.from_pretrained(folder)).items():
        assert torch.equal(backbone_state(model)[name], tensor), name
    start = stock_generation_start(folder, str(official))
    assert not torch.equal(model.queries, start.queries)  # trained
    assert encoder_identity(model) == encoder_identity(start)
    images = model.generate(["t5 t7"], steps=2, decoder_steps=2, seed=0, size=64)
    assert len(images) == 1 and images[0].size == (64, 64)


def test_a_preset_start_has_random_towers_and_refuses_on_the_fly_targets(folder, tmp_path):  # noqa: F811
    model = load_init(str(folder), CPU, stage="generation", generation_from="debug")
    assert model.config.backbone.generates and model.config.clip_encoder_random
    assert model.config.dit.cond_size == 32 and model.config.extra["generation_from"] == "debug"
    with pytest.raises(ValueError, match="cannot train the generation stage: this model's CLIP encoder holds random"):
        Trainer(generation_config(tmp_path / "run", folder, generation_from="debug"), ITEMS)


@pytest.mark.parametrize("generation_from, message", [
    ("", "generation_from is empty and no BLIP3-o preset has this Qwen2.5-VL's size \\(hidden_size 32, 2 layers"),
    ("blip3o-9b", "generation_from 'blip3o-9b' is neither a BLIP3-o model folder nor a preset"),
    ("EMPTY", "generation_from '.*empty' is not a BLIP3-o model folder: .*config.json does not exist"),
    ("STOCK", "generation_from '.*' is a stock Qwen2.5-VL folder, with no CLIP encoder or decoder"),
])
def test_bad_generation_from_values_are_refused_naming_the_field(folder, tmp_path, capsys, generation_from,  # noqa: F811
                                                                 message):
    (tmp_path / "empty").mkdir()
    value = {"EMPTY": str(tmp_path / "empty"), "STOCK": str(folder)}.get(generation_from, generation_from)
    with pytest.raises(ValueError, match=message):
        load_init(str(folder), CPU, stage="generation", generation_from=value)
    shards = write_shards(tmp_path / "shards", ITEMS[:2])
    flags = ["--generation-from", value] if value else []
    assert cli_main(["train", "generation", "--init", str(folder), *flags, "--data", shards, "--out",
                     str(tmp_path / "run"), "--device", "cpu", "--steps", "1"]) == 2
    assert "generation_from" in capsys.readouterr().err


def test_generation_from_applies_to_a_stock_start_only(folder, official):  # noqa: F811
    with pytest.raises(ValueError, match="generation_from .* applies to the generation stage started from a stock"):
        load_init(str(official), CPU, stage="generation", generation_from="debug")
    with pytest.raises(ValueError, match="init .* of the understanding stage is not one"):
        load_init(str(folder), CPU, stage="understanding", generation_from="debug")
    assert not load_init(str(folder), CPU, stage="understanding").config.backbone.generates
