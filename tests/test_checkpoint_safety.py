"""Checkpoints that cannot hurt: absurd configs are refused before anything is built, the loader reads only the
folder's own regular files, and a crash (kill -9) at any point of a save leaves a complete checkpoint that the
next run resumes from, ending with the weights of a run never interrupted.

Crashes are real: the save runs in a forked child that dies with os._exit(9) at the injected point (no
`finally`, no `except` runs), and the parent resumes from what is on disk.
"""

import dataclasses
import json
import os
import shutil
import signal
import time
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from blip3o import Blip3o, get_preset
from blip3o import checkpoints as ckpt
from blip3o.checkpoints import CheckpointError, atomic, resumable
from blip3o.checkpoints.limits import MAX_PARAMETERS, MODEL_BOUNDS, TRAIN_BOUNDS
from blip3o.cli import main as cli_main
from blip3o.config import Blip3oConfig
from blip3o.presets import PRESETS
from blip3o.train import TrainConfig, Trainer
from train_helpers import tiny_dataset

DATA = tiny_dataset()
CRASHED = 9  # the exit status of a child killed at the injected point


def forked(target: Callable[[], object], timeout: float = 120) -> tuple[int, str]:
    """Run `target` in a forked child: (its exit status, the repr of its result or its error). A child that
    still runs after `timeout` seconds hangs: it is killed and the test fails."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any of the parent's cleanup
        os.close(read)
        code, text = 0, ""
        try:
            torch.set_num_threads(1)
            text = repr(target())
        except BaseException as e:  # noqa: BLE001  (everything the child raises is reported to the parent)
            code, text = 1, f"{type(e).__name__}: {e}"
        os.write(write, text.encode()[:60_000])
        os._exit(code)
    os.close(write)
    deadline = time.monotonic() + timeout
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"still running after {timeout} s: it hangs")
        time.sleep(0.02)
    with os.fdopen(read) as f:
        text = f.read()
    return os.waitstatus_to_exitcode(status[1]), text


# ---------------------------------------------------------------------------------------------- absurd configs


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return Blip3o.from_preset("debug").save_pretrained(tmp_path_factory.mktemp("saved") / "debug")


def edited(saved: Path, folder: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the saved folder whose config.json `edit` changed."""
    shutil.copytree(saved, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def set_field(path: str, value) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        *parts, name = path.split(".")
        holder = config
        for part in parts:
            holder = holder[part]
        holder[name] = value
    return edit


@pytest.mark.parametrize("field, value, message", [
    ("dit.num_layers", 10**9, "dit.num_layers is 1000000000; at most 4096"),
    ("backbone.num_layers", 1e9, "backbone.num_layers is 1000000000.0; it must be an integer"),
    ("backbone.hidden_size", "64", "backbone.hidden_size is '64'; it must be an integer"),
    ("backbone.num_heads", -4, "backbone.num_heads is -4; at least 1"),
    ("backbone.vocab_size", 10**12, "backbone.vocab_size is 1000000000000; at most 4194304"),
    ("backbone.min_pixels", 10**12, "backbone.min_pixels is 1000000000000; at most 67108864"),
    ("backbone.max_pixels", 1e12, "backbone.max_pixels is 1000000000000.0; it must be an integer"),
    ("backbone.vision_depth", 5000, "backbone.vision_depth is 5000; at most 4096"),
    ("dit.norm_eps", float("nan"), "dit.norm_eps is nan; it must be a finite number"),
    ("dit.num_kv_heads", 10**6, "dit.num_kv_heads is 1000000; at most 1024"),
    ("steps", 10**9, "steps is 1000000000; at most 10000"),
    ("steps", 1e9, "steps is 1000000000.0; it must be an integer"),
    ("clip_encoder.depth", 10**6, "clip_encoder.depth is 1000000; at most 4096"),
    ("clip_encoder.image_size", 10**6, "clip_encoder.image_size is 1000000; at most 16384"),
    ("decoder.block_out_channels", [32, 10**9], r"decoder.block_out_channels\[1\] is 1000000000; at most 131072"),
    ("decoder.transformer_layers_per_block", [1] * 10**5, "decoder.transformer_layers_per_block has 100000 "
                                                           "entries; at most 8"),
    ("decoder.layers_per_block", 10**9, "decoder.layers_per_block is 1000000000; at most 64"),
    ("decoder.scheduler.num_train_timesteps", 10**12, "decoder.scheduler.num_train_timesteps is 1000000000000; "
                                                      "at most 100000"),
    ("decoder.default_steps", True, "decoder.default_steps is True; it must be an integer"),
    ("dit.depth", 3, "dit.depth is not a field of DiTConfig"),
])
def test_absurd_native_configs_are_refused_naming_the_file_and_field_before_anything_is_built(
        saved, tmp_path, monkeypatch, field, value, message):
    folder = edited(saved, tmp_path / "model", set_field(field, value))

    def built(*args, **kwargs):
        raise AssertionError("a part was built from a config that is refused")

    monkeypatch.setattr("blip3o.model.Backbone", built)
    monkeypatch.setattr("blip3o.model.DiT", built)
    with pytest.raises(CheckpointError, match=f"^{folder / 'config.json'}: {message}"):
        Blip3o.from_pretrained(folder)


def test_a_model_too_large_in_all_is_refused_before_a_weight_is_read(saved, tmp_path, monkeypatch):
    # every field within its bounds, but 1.5 trillion parameters in all
    folder = edited(saved, tmp_path / "model", lambda c: c["dit"].update(hidden_size=131072, num_heads=1024))

    def read(*args, **kwargs):
        raise AssertionError("weights were read for a model over the cap")

    monkeypatch.setattr("blip3o.checkpoints.folders.iter_tensors", read)
    with pytest.raises(CheckpointError, match=rf"^{folder}: the config describes a model of [\d,]+ parameters; "
                                              r"at most 100,000,000,000"):
        Blip3o.from_pretrained(folder)


def test_the_cli_refuses_an_absurd_config_with_exit_2(saved, tmp_path, capsys):
    folder = edited(saved, tmp_path / "model", set_field("dit.num_layers", 10**9))
    assert cli_main(["generate", "a red circle", "--model", str(folder), "--outdir", str(tmp_path / "out")]) == 2
    assert f"{folder / 'config.json'}: dit.num_layers is 1000000000; at most 4096" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_shipped_and_official_presets_are_well_inside_the_limits():
    for name in PRESETS:
        total = Blip3o.from_preset(name, device="meta").num_parameters()["total"]
        assert total * 5 < MAX_PARAMETERS, name  # the 8B: 16.6 billion
    assert Blip3o.from_preset("nano").num_parameters()["total"] == 11_667_987  # the shipped weights still load


def _int_fields(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if int in (hints[f.name], *typing.get_args(hints[f.name]))]


def test_every_integer_field_of_every_config_has_a_bound():
    """A new size field without a bound would let a config allocate without end again."""
    from blip3o.backbone import BackboneConfig
    from blip3o.clip_encoder import ClipEncoderConfig
    from blip3o.decoder import DecoderConfig
    from blip3o.dit import DiTConfig

    classes = [Blip3oConfig, BackboneConfig, DiTConfig, *typing.get_args(ClipEncoderConfig),
               *typing.get_args(DecoderConfig)]
    unbounded = [f"{cls.__name__}.{name}" for cls in classes for name in _int_fields(cls) if name not in MODEL_BOUNDS]
    assert unbounded == []
    assert [name for name in _int_fields(TrainConfig) if name not in TRAIN_BOUNDS] == []


# ---------------------------------------------------------------------------------------------- files the loader reads


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "notes.txt"])
def test_a_fifo_in_the_folder_is_refused_not_opened(saved, tmp_path, name):
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    code, text = forked(lambda: Blip3o.from_pretrained(folder), timeout=60)
    assert code == 1 and text == f"CheckpointError: {folder / name} is not a regular file (a FIFO, socket or " \
                                 "device); refusing to read it"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return Blip3o.from_preset("debug").save_pretrained(tmp_path_factory.mktemp("sharded") / "debug",
                                                        max_shard_bytes=2_000_000)


def with_index(sharded: Path, folder: Path, edit: Callable[[dict], object]) -> Path:
    shutil.copytree(sharded, folder)
    index = json.loads((folder / ckpt.INDEX_NAME).read_text())
    (folder / ckpt.INDEX_NAME).write_text(json.dumps(edit(index)))
    return folder


def first_shard_to(target: str) -> Callable[[dict], dict]:
    def edit(index: dict) -> dict:
        first = next(iter(index["weight_map"].values()))
        index["weight_map"] = {k: target if v == first else v for k, v in index["weight_map"].items()}
        return index
    return edit


def test_a_shard_index_names_only_the_folders_own_files(sharded, tmp_path):
    first = json.loads((sharded / ckpt.INDEX_NAME).read_text())["weight_map"]
    first = next(iter(first.values()))
    outside = tmp_path / "outside.safetensors"
    shutil.copy(sharded / first, outside)  # a real shard: only its place is wrong
    folder = with_index(sharded, tmp_path / "up", first_shard_to("../outside.safetensors"))
    with pytest.raises(CheckpointError, match=f"'../outside.safetensors' resolves to {outside}, outside the folder"):
        Blip3o.from_pretrained(folder)
    folder = with_index(sharded, tmp_path / "absolute", first_shard_to(str(outside)))
    with pytest.raises(CheckpointError, match=f"{ckpt.INDEX_NAME}: '{outside}' is not a file name inside the folder"):
        Blip3o.from_pretrained(folder)
    folder = with_index(sharded, tmp_path / "link", first_shard_to("link.safetensors"))
    (folder / "link.safetensors").symlink_to(outside)
    with pytest.raises(CheckpointError, match=f"'link.safetensors' resolves to {outside}, outside the folder"):
        Blip3o.from_pretrained(folder)
    for edit, message in [(lambda i: [i], "must hold a JSON object, got list"),
                          (lambda i: {"metadata": {}}, "weight_map must be an object of tensor names to shard files, "
                                                       "got None"),
                          (lambda i: {"weight_map": {}}, "weight_map must be an object"),
                          (lambda i: {"weight_map": {"queries": 3}}, r"weight_map\['queries'\] is 3; it must be a "
                                                                     "file name")]:
        folder = with_index(sharded, tmp_path / f"bad-{len(list(tmp_path.iterdir()))}", edit)
        with pytest.raises(CheckpointError, match=message):
            Blip3o.from_pretrained(folder)


def test_a_folder_of_the_hub_cache_reads_its_blobs(sharded, tmp_path):
    """A hub-cache snapshot (HUB/snapshots/REV/...) links its files into HUB/blobs: those links are its own."""
    hub = tmp_path / "models--blip3o--debug"
    snapshot = hub / "snapshots" / "0123abc"
    (hub / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sharded.iterdir():
        if path.is_dir():  # the tokenizer
            shutil.copytree(path, snapshot / path.name)
            continue
        blob = hub / "blobs" / f"blob-{path.name}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", blob.name))
    loaded = Blip3o.from_pretrained(snapshot)
    assert torch.equal(loaded.queries, Blip3o.from_pretrained(sharded).queries)


# ---------------------------------------------------------------------------------------------- crash-safe saves


def train_config(out: Path, **kw) -> TrainConfig:
    base = dict(stage="generation", init="random:debug", out_dir=str(out), steps=3, batch_size=2, lr=1e-3,
                warmup_steps=1, checkpoint_every=1, progress=False, device="cpu", ema_decay=0.9,
                tensorboard=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Trainer:
    """The run no crash interrupted."""
    trainer = Trainer(train_config(tmp_path_factory.mktemp("straight") / "run"), DATA)
    trainer.fit()
    return trainer


def die() -> None:
    os._exit(CRASHED)


def crash_around(module: object, name: str, when: str, nth: int = 1) -> None:
    """Make the process die just `before` or `after` the `nth` call of `module.name`."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth and when == "before":
            die()
        result = real(*args, **kwargs)
        if len(calls) == nth and when == "after":
            die()
        return result

    setattr(module, name, wrapper)


def crash_mid_write() -> None:
    """torch.save writes half its file, then the process dies."""
    real = torch.save

    def half(obj, path, *args, **kwargs):
        real(obj, path, *args, **kwargs)
        os.truncate(path, os.path.getsize(path) // 2)
        die()

    torch.save = half


def no_exchange() -> None:
    """A platform that cannot swap folders in one step: the save renames twice."""
    atomic.exchange = lambda a, b: False


# point -> (what the child patches, whether the new checkpoint is complete on disk when it dies)
CRASH_POINTS = {
    "mid-write": (crash_mid_write, False),
    "before the marker": (lambda: crash_around(resumable, "write_marker", "before"), False),
    "after the marker": (lambda: crash_around(resumable, "swap_in", "before"), True),
    "after the swap": (lambda: crash_around(resumable, "swap_in", "after"), True),
    "mid-removal of the replaced": (lambda: crash_around(resumable, "remove", "before"), True),
    "between the two renames": (lambda: (no_exchange(), crash_around(atomic, "rename", "after", 1)), True),
    "after the two renames": (lambda: (no_exchange(), crash_around(atomic, "rename", "after", 2)), True),
}


def run_until_a_crash(config: TrainConfig, crash_step: int, inject: Callable[[], object]) -> None:
    """Train as `fit` does up to `crash_step`, then save that step's checkpoint in a child that dies."""
    trainer = Trainer(config, DATA)
    while trainer.step < crash_step:
        trainer.train_step()
        if trainer.step % config.checkpoint_every == 0 and trainer.step < crash_step:
            trainer.save_checkpoint()
    code, text = forked(lambda: (inject(), trainer.save_checkpoint()))
    assert code == CRASHED, f"the save ran past the injected crash: {text}"


# the first save (step 1) has no checkpoint to replace: no removal, and one rename
FIRST_SAVE_POINTS = ("mid-write", "before the marker", "after the marker", "after the swap")


@pytest.mark.parametrize("point, crash_step", [(p, 1) for p in FIRST_SAVE_POINTS] + [(p, 2) for p in CRASH_POINTS])
def test_a_crash_at_any_point_of_a_save_resumes_from_the_newest_complete_checkpoint(
        straight, tmp_path, capsys, point, crash_step):
    inject, complete = CRASH_POINTS[point]
    config = train_config(tmp_path / "run")
    run_until_a_crash(config, crash_step, inject)
    expected = crash_step if complete else crash_step - 1  # a checkpoint every step
    capsys.readouterr()
    resumed = Trainer(config, DATA)
    resumed.fit()
    out = capsys.readouterr().out
    assert (f"resumed at step {expected}" in out) == (expected > 0), out
    for (name, a), (_, b) in zip(straight.named_params, resumed.named_params, strict=True):
        assert torch.equal(a, b), name
    for name in straight.ema:
        assert torch.equal(straight.ema[name], resumed.ema[name]), name
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint", "metrics.jsonl", "model"]


def test_recover_promotes_the_newest_complete_leftover_and_removes_the_rest(tmp_path, capsys):
    def folder(name: str, step: int | None) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "trainer_state.pt").write_text(name)
        if step is not None:
            resumable.write_marker(path, step)
        return path

    folder(".checkpoint.old-1", 2)
    folder(".checkpoint.tmp-a", 6)
    folder(".checkpoint.tmp-b", None)  # a save cut short
    notes = resumable.recover(tmp_path)
    assert (tmp_path / "checkpoint" / "trainer_state.pt").read_text() == ".checkpoint.tmp-a"
    assert resumable.read_marker(tmp_path / "checkpoint") == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert notes == [
        f"{tmp_path}: resuming from .checkpoint.tmp-a (step 6), a complete checkpoint that a crash left before it "
        "became checkpoint/",
        f"{tmp_path}: removed .checkpoint.old-1 (superseded, step 2), a leftover of an interrupted checkpoint save",
        f"{tmp_path}: removed .checkpoint.tmp-b (incomplete), a leftover of an interrupted checkpoint save"]
    folder(".checkpoint.tmp-c", 4)  # older than checkpoint/: stale
    assert resumable.recover(tmp_path) == [f"{tmp_path}: removed .checkpoint.tmp-c (superseded, step 4), a leftover "
                                           "of an interrupted checkpoint save"]
    assert resumable.recover(tmp_path) == []


def test_a_trainer_state_that_is_not_a_regular_file_is_refused(tmp_path):
    config = train_config(tmp_path / "run")
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    os.mkfifo(tmp_path / "run" / "checkpoint" / "trainer_state.pt")
    code, text = forked(lambda: Trainer(config, DATA).fit(), timeout=60)
    assert code == 1 and "trainer_state.pt is not a regular file" in text


# ---------------------------------------------------------------------------------------------- model folders


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    return Blip3o.from_pretrained(folder).state_dict()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# point -> (what the child patches, which model the folder holds after the crash: "old" or "new")
SAVE_POINTS = {
    "mid-write": (lambda: crash_around(ckpt, "save_weights", "after"), "old"),
    "before the swap": (lambda: crash_around(atomic, "swap_in", "before"), "old"),
    "after the swap": (lambda: crash_around(atomic, "remove", "before"), "new"),
    "after the two renames": (lambda: (no_exchange(), crash_around(atomic, "rename", "after", 2)), "new"),
}


@pytest.mark.parametrize("point", list(SAVE_POINTS))
def test_save_pretrained_over_a_folder_leaves_it_whole_whatever_interrupts_it(saved, tmp_path, point):
    inject, holds = SAVE_POINTS[point]
    target = tmp_path / "model"
    shutil.copytree(saved, target)
    old = weights_of(saved)
    torch.manual_seed(1)
    new_model = Blip3o.from_preset("debug")
    code, text = forked(lambda: (inject(), new_model.save_pretrained(target)))
    assert code == CRASHED, text
    assert same(weights_of(target), old if holds == "old" else new_model.state_dict())


def test_without_an_atomic_swap_a_crash_between_the_renames_leaves_the_old_folder_whole_beside(saved, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(saved, target)
    code, text = forked(lambda: (no_exchange(), crash_around(atomic, "rename", "after", 1),
                                 Blip3o.from_preset("debug").save_pretrained(target)))
    assert code == CRASHED, text
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(".model.old-")]
    assert not target.exists() and len(aside) == 1
    assert same(weights_of(aside[0]), weights_of(saved))


def test_every_preset_config_passes_the_checks_as_saved():
    for name in PRESETS:
        config = get_preset(name)
        assert Blip3oConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config, name
