"""The CLIP-target cache and the generation stage that trains from it (or from photos of any size and mode):
the cache trains exactly as the encoder on the fly does, a rerun computes only missing shards, a cache of another
encoder is refused, and a model whose CLIP tower is random says so and is refused."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from blip3o import Blip3o
from blip3o.cli import main as cli_main
from blip3o.clip_encoder import CLIP_ENCODER_PRESETS
from blip3o.data import StreamingDataset
from blip3o.data.targets import MANIFEST, CacheMismatch, TargetsDataset, build_cache, read_manifest
from blip3o.images import pil_to_tensor
from blip3o.train import TrainConfig, Trainer
from blip3o.train.stages import GenerationStage
from blip3o.train.trainer import load_init
from test_official_checkpoint import EVA, parts, write_official  # noqa: F401  (fixtures: a tiny official folder)
from train_helpers import tiny_dataset

CPU = torch.device("cpu")
ITEMS = tiny_dataset(12)


def write_shards(folder, items=ITEMS, per_shard: int = 4) -> str:
    """Webdataset shards of `items` (png + json members), `per_shard` a shard; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(items), per_shard):
        with tarfile.open(folder / f"{s // per_shard:05d}.tar", "w") as tar:
            for k, item in enumerate(items[s:s + per_shard]):
                image = io.BytesIO()
                item["image"].save(image, format="PNG")
                for suffix, data in (("png", image.getvalue()), ("json", json.dumps(item["json"]).encode())):
                    info = tarfile.TarInfo(f"{s + k:06d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("data") / "shards")


def debug_model() -> Blip3o:
    """The random `debug` model a run with init "random:debug" starts from (the same weights every call)."""
    return load_init("random:debug", CPU)


def train_config(out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(stage="generation", init="random:debug", out_dir=str(out), steps=3, batch_size=4,
                                 lr=1e-3, warmup_steps=1, checkpoint_every=100, progress=False, device="cpu",
                                 ema_decay=0.0), **kw})


@pytest.mark.parametrize("preset", ["debug", "nano"])
def test_encode_images_is_what_the_stage_computed_from_stacked_pixels(preset):
    encoder = Blip3o.from_preset(preset).clip_encoder
    images = [item["image"] for item in ITEMS]
    assert torch.equal(encoder.encode_images(images), encoder.encode(pil_to_tensor(images)))


def test_photos_of_different_sizes_and_modes_train():
    model = Blip3o.from_preset("debug")
    photos = [Image.new("RGB", (64, 64), (200, 10, 10)), Image.new("L", (90, 40), 128),
              Image.new("RGBA", (33, 120), (10, 200, 10, 90)), Image.new("P", (70, 70))]
    items = [{"image": photo, "json": {"caption": f"photo {k}"}} for k, photo in enumerate(photos)]
    stage = GenerationStage(model, {})
    batch = stage.collate(items, list(range(4)), 0, CPU)
    loss = stage.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.dit.parameters())


def test_training_from_the_cache_equals_training_on_the_fly(shards, tmp_path):
    cache = tmp_path / "cache"
    build_cache(debug_model(), shards, cache, batch_size=3, dtype="fp32")
    from_cache = Trainer(train_config(tmp_path / "cached"), TargetsDataset(cache, seed=0))
    by_key = {f"{k:06d}": item for k, item in enumerate(ITEMS)}
    order = [from_cache.dataset[i]["key"].rsplit(" ", 1)[-1] for i in range(12)]  # "<shard>, key 000003"
    on_the_fly = Trainer(train_config(tmp_path / "fly"), [by_key[key] for key in order])
    start = {name: p.detach().clone() for name, p in on_the_fly.named_params}
    from_cache.fit()
    on_the_fly.fit()
    assert from_cache.stage.encoder is not None and on_the_fly.stage.encoder is None  # cached targets vs encoder
    for (name, a), (_, b) in zip(from_cache.named_params, on_the_fly.named_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(p, start[name]) for name, p in on_the_fly.named_params)  # it trained


def test_a_cache_named_as_the_runs_data_streams_its_targets(shards, tmp_path):
    build_cache(debug_model(), shards, tmp_path / "cache", dtype="bf16")
    trainer = Trainer(train_config(tmp_path / "run", data=[str(tmp_path / "cache")], steps=2))
    before = {name: p.detach().clone() for name, p in trainer.named_params}
    trainer.fit()
    assert trainer.stage.encoder is not None  # the batches carried cached targets
    assert any(not torch.equal(p, before[name]) for name, p in trainer.named_params)


def test_the_cache_holds_every_sample_with_its_text_and_reads_as_a_data_source(shards, tmp_path):
    model = debug_model()
    build_cache(model, shards, tmp_path / "cache", batch_size=5, dtype="bf16")
    manifest = read_manifest(tmp_path / "cache")
    assert manifest["count"] == 12 and manifest["dtype"] == "bf16" and len(manifest["shards"]) == 3
    assert manifest["encoder"]["config"]["kind"] == model.config.clip_encoder.kind
    samples = [s for s in StreamingDataset(str(tmp_path / "cache"), epochs=1, shuffle=False) if "targets" in s]
    assert len(samples) == 12 and samples[0]["targets"].dtype == torch.bfloat16
    expected = model.clip_encoder.encode_images([ITEMS[0]["image"]])[0]
    assert torch.equal(samples[0]["targets"], expected.to(torch.bfloat16))  # the rounding bf16 implies
    assert samples[0]["text"] == ITEMS[0]["json"]["caption"] and samples[0]["key"].endswith("key 000000")


def test_a_rerun_after_deleting_one_shard_recomputes_only_that_shard(shards, tmp_path):
    model = debug_model()
    first = build_cache(model, shards, tmp_path / "cache", dtype="fp16")
    assert len(first.written) == 3 and not first.skipped
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("targets-*")}
    deleted = sorted(kept)[1]
    (tmp_path / "cache" / deleted).unlink()
    again = build_cache(model, shards, tmp_path / "cache", dtype="fp16")
    assert again.written == [deleted] and sorted(again.skipped) == sorted(set(kept) - {deleted})
    for name, mtime in kept.items():
        if name != deleted:
            assert (tmp_path / "cache" / name).stat().st_mtime_ns == mtime, name
    assert read_manifest(tmp_path / "cache")["count"] == 12


def other_encoder() -> Blip3o:
    model = debug_model()
    with torch.no_grad():
        next(model.clip_encoder.parameters()).add_(1e-3)
    return model


def test_a_cache_of_another_encoder_is_refused(shards, tmp_path):
    build_cache(debug_model(), shards, tmp_path / "cache", dtype="fp32")
    trainer = Trainer(train_config(tmp_path / "run"), TargetsDataset(tmp_path / "cache"), model=other_encoder())
    with pytest.raises(CacheMismatch, match="holds the CLIP targets of another encoder: its encoder weights differ"):
        trainer.fit()
    with pytest.raises(CacheMismatch, match="another encoder"):
        build_cache(other_encoder(), shards, tmp_path / "cache", dtype="fp32")
    with pytest.raises(CacheMismatch, match="dtype 'fp32', not 'bf16'"):
        build_cache(debug_model(), shards, tmp_path / "cache", dtype="bf16")


def test_the_cli_writes_a_cache_and_refuses_bad_input(shards, tmp_path, capsys):
    out = tmp_path / "cache"
    assert cli_main(["data", "clip-targets", "--model", "debug", "--data", shards, "--out", str(out),
                     "--batch-size", "8", "--device", "cpu"]) == 0
    assert "3 shards computed, 0 already done; 12 samples cached" in capsys.readouterr().out
    assert json.loads((out / MANIFEST).read_text())["complete"] is True
    assert cli_main(["data", "clip-targets", "--model", "debug", "--data", str(tmp_path / "none.tar"),
                     "--out", str(tmp_path / "c2"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    assert cli_main(["data", "clip-targets", "--model", "debug", "--data", shards, "--out", str(tmp_path / "full"),
                     "--device", "cpu"]) == 2
    assert "is not empty and holds no manifest.json" in capsys.readouterr().err


def test_a_random_clip_tower_is_recorded_and_refused(parts, shards, tmp_path, monkeypatch):  # noqa: F811
    folder = write_official(tmp_path / "no-eva", parts, eva=False)
    monkeypatch.setitem(CLIP_ENCODER_PRESETS, "eva-clip-e", EVA)
    with pytest.warns(UserWarning, match="RANDOM"):
        model = Blip3o.from_pretrained(folder, dtype=torch.float32)
    assert model.config.clip_encoder_random is True
    model.save_pretrained(tmp_path / "native")
    assert json.loads((tmp_path / "native" / "config.json").read_text())["clip_encoder_random"] is True
    model = Blip3o.from_pretrained(tmp_path / "native")
    assert model.config.clip_encoder_random is True
    with pytest.raises(ValueError, match="cannot train the generation stage: this model's CLIP encoder holds random"):
        GenerationStage(model, {})
    with pytest.raises(ValueError, match="cannot cache its CLIP targets: this model's CLIP encoder holds random"):
        build_cache(model, shards, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
    assert cli_main(["data", "clip-targets", "--model", str(tmp_path / "native"), "--data", shards,
                     "--out", str(tmp_path / "cache"), "--device", "cpu"]) == 2
    assert Blip3o.from_pretrained(write_official(tmp_path / "eva", parts)).config.clip_encoder_random is False
