"""The trainer on real data streamed from a data spec: photos of any mode and size train the generation stage,
bad samples are counted in metrics.jsonl, and a run killed mid-way resumes to exactly the uninterrupted one."""

import json
import math
import os
import time

import pytest
import torch
from PIL import Image
from skimage import data as photos

from blip3o.checkpoints import CheckpointError
from blip3o.train import TrainConfig, Trainer
from blip3o.train.stages.texts import captions_of, generation_text

# (skimage.data photo, mode written, size written): grey, colour, transparent and palette images of many sizes
PHOTOS = [("astronaut", "RGB", (64, 64)), ("camera", "L", (48, 40)), ("coffee", "RGB", (72, 48)),
          ("chelsea", "RGBA", (60, 40)), ("rocket", "P", (64, 43)), ("coins", "L", (50, 40)),
          ("immunohistochemistry", "RGB", (40, 40)), ("moon", "LA", (56, 56))]


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> str:
    """captions.jsonl: the eight photos, then a line naming a missing image and a line that is not JSON."""
    folder = tmp_path_factory.mktemp("photos")
    lines = []
    for name, mode, size in PHOTOS:
        image = Image.fromarray(getattr(photos, name)()).resize(size).convert(mode)
        image.save(folder / f"{name}.png")
        lines.append(json.dumps({"image": f"{name}.png", "caption": f"a photo: {name}"}))
    lines += [json.dumps({"image": "gone.png", "caption": "a missing photo"}), "{not json"]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "captions.jsonl")


def config(out, data: str | None, **kw) -> TrainConfig:
    base = dict(stage="generation", init="random:debug", out_dir=str(out), data=[data] if data else [], steps=4,
                batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=2, log_every=1, progress=False, device="cpu",
                ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_generation_trains_on_photos_of_any_mode_and_size(tmp_path, captions, capsys):
    trainer = Trainer(config(tmp_path / "run", captions))
    before = trainer.model.dit.norm_out.linear_2.weight.detach().clone()
    trainer.fit()
    assert not torch.equal(before, trainer.model.dit.norm_out.linear_2.weight)
    lines = metrics(tmp_path / "run")
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all(math.isfinite(m["loss"]) and m["lr"] > 0 and m["samples_per_s"] > 0 for m in lines)
    skipped = lines[-1]["skipped"]
    assert skipped["image_missing"] >= 1 and skipped["bad_json"] >= 1
    assert set(skipped) == {"image_missing", "bad_json"}
    out = capsys.readouterr().out
    assert "step 4/4: loss " in out and "skipped: bad_json" in out
    assert trainer.stream.stats.good == 16  # four steps of four samples


def test_streamed_texts_are_the_samples_own():
    """A JSONL record's `prompt` is a plain string: the stages train on the sample's text."""
    sample = {"image": None, "text": "a red bus", "json": {"image": "bus.png", "prompt": "a red bus"}}
    assert captions_of(sample) == ["a red bus"]
    assert {generation_text(sample, 0, i, 0.9) for i in range(20)} == {"a red bus"}


def test_no_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="TrainConfig.data names no data"):
        Trainer(config(tmp_path, None))
    with pytest.raises(ValueError, match="missing.jsonl"):
        Trainer(config(tmp_path, str(tmp_path / "missing.jsonl")))


def killed_at(step: int, cfg: TrainConfig) -> int:
    """Run `cfg` in a forked child that dies as kill -9 leaves it (no cleanup, no checkpoint) when it reaches
    `step`; its exit status."""
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(1)
        trainer = Trainer(cfg)
        run_step = trainer.train_step

        def dying_step() -> float:
            if trainer.step == step:
                os._exit(9)
            return run_step()

        trainer.train_step = dying_step
        trainer.fit()
        os._exit(0)
    deadline = time.monotonic() + 120
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the training child still runs after 120 s")
        time.sleep(0.05)
    return os.waitstatus_to_exitcode(status[1])


def test_a_killed_run_resumes_to_the_uninterrupted_one(tmp_path, captions):
    straight = Trainer(config(tmp_path / "straight", captions))
    straight.fit()
    cfg = config(tmp_path / "killed", captions)
    assert killed_at(3, cfg) == 9  # the checkpoint of step 2 is on disk, step 3's metrics line too
    assert [m["step"] for m in metrics(tmp_path / "killed")] == [1, 2, 3]
    resumed = Trainer(cfg)
    resumed.fit()
    assert resumed.stream.state_dict() == straight.stream.state_dict()  # the data position and its counts
    for (name, a), (_, b) in zip(straight.named_params, resumed.named_params, strict=True):
        assert torch.equal(a, b), name
        assert torch.equal(straight.ema[name], resumed.ema[name]), name
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[k][m], sb[k][m]) for k in sa for m in ("exp_avg", "exp_avg_sq"))

    def same(lines):
        return [{k: v for k, v in m.items() if k != "samples_per_s"} for m in lines]

    assert same(metrics(tmp_path / "killed")) == same(metrics(tmp_path / "straight"))


def test_resume_refuses_a_checkpoint_without_the_data_position(tmp_path, captions):
    cfg = config(tmp_path / "run", captions, steps=2)
    Trainer(cfg).fit()
    state_path = tmp_path / "run" / "checkpoint" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    assert len(state["data"]) == 1
    torch.save({**state, "data": None}, state_path)
    with pytest.raises(CheckpointError, match="it holds no data position, and this run streams its data on 1"):
        Trainer(config(tmp_path / "run", captions, steps=3)).fit()


def test_train_command_takes_every_field_as_a_flag_over_its_config(tmp_path, captions, capsys):
    from blip3o.cli.entry import main

    config_file = tmp_path / "generation.json"
    config_file.write_text(json.dumps({"stage": "generation", "init": "random:debug", "data": [captions],
                                       "steps": 9, "batch_size": 8, "out_dir": str(tmp_path / "from-file")}))
    out = tmp_path / "run"
    assert main(["train", "generation", "--config", str(config_file), "--out", str(out), "--steps", "2",
                 "--batch-size", "4", "--grad-accum", "2", "--device", "cpu", "--no-progress", "--log-every", "1",
                 "--stage-options", '{"condition_drop": 0.2}', "--betas", "0.9", "0.99"]) == 0
    assert f"trained model: {out / 'model'}" in capsys.readouterr().out
    assert [m["step"] for m in metrics(out)] == [1, 2] and not (tmp_path / "from-file").exists()
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    train = state["identity"]["train"]
    assert (train["grad_accum"], train["batch_size"], train["betas"]) == (2, 4, [0.9, 0.99])
    assert train["stage_options"] == {"condition_drop": 0.2} and train["data"] == [captions]


@pytest.mark.parametrize("flags, expected", [
    (["--steps", "0"], "--steps is 0"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--grad-accum", "-1"], "--grad-accum is -1"),
    (["--precision", "fp8"], "--precision: precision 'fp8' is not one of auto, fp32, bf16"),
    (["--export-dtype", "int4"], "--export-dtype: export_dtype 'int4' is not one of"),
    (["--stage-options", "[1]"], "argument --stage-options: a JSON object is expected"),
    (["--stage-options", '{"bogus": 1}'], "--stage-options: stage option"),
    (["--betas", "0.9"], "argument --betas: expected 2 arguments"),
    (["--data", "missing.jsonl"], "--data: "),
    ([], "give the training data: --data SPEC"),
])
def test_train_command_refuses_bad_values_naming_the_flag(tmp_path, monkeypatch, capsys, flags, expected):
    from blip3o.cli.entry import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("blip3o.train.Trainer.fit", lambda self: pytest.fail("training started"))
    assert main(["train", "generation", "--init", "random:debug", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
