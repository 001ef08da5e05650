"""A training run's log figures, written where a user reads them: a line of out_dir/metrics.jsonl per log step
and, when the `tensorboard` package is importable, the same figures as TensorBoard scalars in
out_dir/tensorboard (`tensorboard --logdir OUT_DIR/tensorboard`).

A log line is a JSON object of numbers and of objects of numbers:

    {"step": 20, "loss": 0.41, "lr": 2.9e-4, "samples_per_s": 51.0, "skipped": {"unreadable": 1},
     "counts": {"truncated": 3}}

and each number but the step is one scalar, tagged by its path ("loss", "skipped/unreadable",
"counts/truncated") and written at that step.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

from blip3o.distributed import World, all_gather

METRICS_NAME = "metrics.jsonl"  # in out_dir: one JSON line per log step
TENSORBOARD_NAME = "tensorboard"  # in out_dir: TensorBoard's event files


def tensorboard_available() -> bool:
    """True when the `tensorboard` package (what torch's SummaryWriter writes with) is importable."""
    return importlib.util.find_spec("tensorboard") is not None


def append_line(path: Path, line: str) -> None:
    """Append one line to `path` and flush it to disk: a crash leaves whole lines (at most the last one cut)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def summed(counts: Mapping[str, int], world: World) -> dict[str, int]:
    """`counts` (name -> count on this rank) summed over every rank, by name."""
    total: Counter = Counter()
    for theirs in all_gather(dict(counts), world):
        total.update(theirs)
    return dict(sorted(total.items()))


def scalars(line: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every number of a log line but its step; nested objects' numbers are tagged "key/inner"."""
    for key, value in line.items():
        if key == "step" and not prefix:
            continue
        if isinstance(value, dict):
            yield from scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


class TrainLog:
    """Where one run's log lines go: out_dir/metrics.jsonl, and out_dir/tensorboard when `tensorboard` is True
    and the package is importable. Only the main process makes one.

    resumed_at: the checkpoint's step where the run resumes (0: a fresh run); TensorBoard hides the events an
    earlier, interrupted run wrote past it, as metrics.jsonl drops its lines past it.
    """

    def __init__(self, out_dir: Path, *, tensorboard: bool = True, resumed_at: int = 0) -> None:
        self.metrics = Path(out_dir) / METRICS_NAME
        self.writer = None
        if tensorboard and tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out_dir) / TENSORBOARD_NAME),
                                        purge_step=resumed_at + 1 if resumed_at else None)

    def write(self, line: dict) -> None:
        """Append `line` (it has a "step") to metrics.jsonl and its numbers to TensorBoard."""
        append_line(self.metrics, json.dumps(line))
        if self.writer is not None:
            for tag, value in scalars(line):
                self.writer.add_scalar(tag, value, line["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
