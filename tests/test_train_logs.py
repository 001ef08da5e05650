"""The trainer's log figures: metrics.jsonl and the same numbers as TensorBoard scalars, a resumed run's
TensorBoard events replacing what the interrupted run wrote past its checkpoint, and the understanding stage's
cut and skipped conversations counted in every log line and in the progress log."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from blip3o.train import TrainConfig, Trainer
from blip3o.train.logs import TENSORBOARD_NAME, TrainLog, scalars
from train_helpers import tiny_dataset

SHAPES = tiny_dataset(2)
SHORT = {"messages": [{"role": "user", "content": "what color is the square?"},
                      {"role": "assistant", "content": "red"}], "where": "short.jsonl, line 1"}
LONG = {"messages": [{"role": "user", "content": " ".join(["what color is the square?"] * 8)},
                     {"role": "assistant", "content": "red"}], "where": "long.jsonl, line 1"}
# a Shapes item's two turns are 51 tokens and its first alone 34: under max_length 40 each Shapes item is cut after
# its first turn, the short conversation fits and the long one's first turn does not
CONVERSATIONS = [SHAPES[0], SHAPES[1], SHORT, LONG] * 2


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def events(out) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard reads back from out/tensorboard: tag -> [(step, value)]."""
    accumulator = EventAccumulator(str(out / TENSORBOARD_NAME))
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def expected_events(lines: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The scalars of metrics.jsonl's lines, as float32 (what an event file stores)."""
    tags: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        for tag, value in scalars(line):
            tags.setdefault(tag, []).append((line["step"], float(torch.tensor(value, dtype=torch.float32))))
    return tags


def run(out, **kw) -> Trainer:
    config = TrainConfig(**{**dict(stage="understanding", init="random:debug", out_dir=str(out), steps=2,
                                   batch_size=4, lr=1e-3, warmup_steps=1, log_every=1, checkpoint_every=100,
                                   progress=False, device="cpu", ema_decay=0.0,
                                   stage_options={"max_turns": 2, "max_length": 40}), **kw})
    trainer = Trainer(config, CONVERSATIONS)
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    out = tmp_path_factory.mktemp("understanding")
    return out, run(out)


def test_cut_and_skipped_conversations_are_counted_in_every_log_line(counted):
    out, _ = counted
    lines = metrics(out)
    assert [line["step"] for line in lines] == [1, 2]
    assert [line["counts"] for line in lines] == [{"too_long": 1, "truncated": 2}, {"too_long": 2, "truncated": 4}]
    assert all(line["skipped"] == {} for line in lines)


def test_the_progress_log_names_the_counts(tmp_path, capsys):
    run(tmp_path / "run", steps=1, tensorboard=False)
    out = capsys.readouterr().out
    assert "step 1/1: loss " in out and "samples/s, skipped: none; too_long 1, truncated 2\n" in out


def test_tensorboard_scalars_equal_the_metrics_lines(counted):
    out, _ = counted
    lines = metrics(out)
    read = events(out)
    assert set(read) == {"loss", "lr", "samples_per_s", "counts/too_long", "counts/truncated"}
    assert read == expected_events(lines)
    assert read["counts/truncated"] == [(1, 2.0), (2, 4.0)]


def test_the_tensorboard_switch_turns_the_event_files_off(tmp_path):
    run(tmp_path / "off", steps=1, tensorboard=False)
    assert not (tmp_path / "off" / TENSORBOARD_NAME).exists()
    assert [line["step"] for line in metrics(tmp_path / "off")] == [1]


def test_a_resumed_log_replaces_the_events_past_its_checkpoint(tmp_path):
    interrupted = TrainLog(tmp_path)
    for step in (1, 2, 3, 4):  # the checkpoint was at step 2; steps 3 and 4 are done again
        interrupted.write({"step": step, "loss": float(step)})
    interrupted.close()
    resumed = TrainLog(tmp_path, resumed_at=2)
    for step in (3, 4, 5):
        resumed.write({"step": step, "loss": 10.0 * step})
    resumed.close()
    assert events(tmp_path)["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]


def test_scalars_are_every_number_but_the_step():
    line = {"step": 7, "loss": 0.5, "skipped": {"unreadable": 2}, "counts": {}, "note": "text", "flag": True}
    assert list(scalars(line)) == [("loss", 0.5), ("skipped/unreadable", 2.0)]
