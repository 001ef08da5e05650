"""The nano recipe's training steps on CPU, with and without `keep_freed_memory` (glibc keeps freed blocks).

Each stage runs in two fresh processes, BLIP3O_KEEP_FREED_MEMORY=0 and =1 (mallopt cannot be undone in a
process), on the same Shapes shards (written once, the recipe's kinds: random scenes; canonical prompt scenes
for generation), with the recipe's stage options, batch and a fresh nano model. Prints the mean step time
(steps after the first) and the minor page faults of each, then `ratio=<kept/default>` per stage (lower is
faster) and a last line `ratio=` for the understanding stage, the recipe's longest.

    python benchmarks/cpu_train_step.py                 # every stage, 6 steps each, torch's default threads
    python benchmarks/cpu_train_step.py --stages understanding --steps 12
    python benchmarks/cpu_train_step.py --against HEAD~1   # this tree's code against a git revision's, both
                                                           # with freed memory kept, 3 alternated runs each
                                                           # (--rounds): ratio=<this/REF>
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from blip3o.train.data import ShardDataset
from blip3o.train.recipe import NANO_STAGES
from blip3o.train.trainer import Trainer
import dataclasses
stage, data, steps, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
base = next(s for s in NANO_STAGES if s.stage == stage)
cfg = dataclasses.replace(base, init="nano", out_dir=out, data=[data], steps=steps, progress=False, device="cpu")
dataset = ShardDataset(data, seed=0)
trainer = Trainer(cfg, dataset)
times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(steps):
    if len(times) == 1:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    trainer.train_step()
    times.append(time.perf_counter() - started)
print(json.dumps({"step_s": sum(times[1:]) / (steps - 1),
                  "faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / (steps - 1),
                  "threads": torch.get_num_threads()}))
"""


def run(stage: str, data: Path, steps: int, keep: bool, tmp: Path, src: Path | None = None) -> dict:
    """One fresh process; `src` (a tree's src/ folder) replaces the installed blip3o."""
    env = {**os.environ, "BLIP3O_KEEP_FREED_MEMORY": "1" if keep else "0", "HF_HUB_OFFLINE": "1"}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    out = subprocess.run([sys.executable, "-c", CHILD, stage, str(data), str(steps),
                          str(tmp / f"{stage}-{keep}-{src is not None}")], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{stage} step timing failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mean_of(results: list[dict]) -> dict:
    """The per-key mean of several runs' results."""
    return {k: sum(r[k] for r in results) / len(results) for k in results[0]}


def compare(label: str, a: dict, b: dict, names: tuple[str, str]) -> float:
    """Print one stage's two timings; returns b's step time over a's."""
    ratio = b["step_s"] / a["step_s"]
    print(f"{label:14s} {names[0]} {a['step_s']:.3f} s/step ({a['faults_per_step']:.0f} page faults)"
          f"  {names[1]} {b['step_s']:.3f} s/step ({b['faults_per_step']:.0f})  threads {b['threads']:.0f}"
          f"  ratio={ratio:.3f}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=["clip", "understanding", "decoder", "generation"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--against", metavar="REF", help="time this tree's code against git revision REF's "
                        "(both with freed memory kept) instead of the two allocator settings")
    parser.add_argument("--rounds", type=int, default=3, help="with --against: alternated runs of each tree")
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is not timed)")
    from blip3o.shapes import write_shards
    from blip3o.train.recipe import NANO_GENERATION_DATA, NANO_STAGES

    batch = max(s.batch_size for s in NANO_STAGES if s.stage in args.stages)
    print(f"device: cpu ({platform.processor() or platform.machine()}), {os.cpu_count()} cores; "
          f"{args.steps} steps a stage, the recipe's batch and options")
    ratios = {}
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = batch * args.steps
        write_shards(tmp / "data", n, 0)
        write_shards(tmp / "data_generation", n, 1, **NANO_GENERATION_DATA)
        if args.against:  # the revision's tree, checked out beside this one
            subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tmp / "ref"), args.against],
                           check=True, capture_output=True)
        try:
            for stage in args.stages:
                data = tmp / ("data_generation" if stage == "generation" else "data")
                if args.against:  # alternated, so that a drift of the machine's speed hits both alike
                    runs = [(run(stage, data, args.steps, True, tmp, tmp / "ref" / "src"),
                             run(stage, data, args.steps, True, tmp, root / "src")) for _ in range(args.rounds)]
                    ref, this = (mean_of([r[k] for r in runs]) for k in (0, 1))
                    ratios[stage] = compare(stage, ref, this, (args.against, "this tree"))
                else:
                    default, kept = run(stage, data, args.steps, False, tmp), run(stage, data, args.steps, True, tmp)
                    ratios[stage] = compare(stage, default, kept, ("default", "kept"))
        finally:
            if args.against:
                subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tmp / "ref")],
                               capture_output=True)
    last = "understanding" if "understanding" in ratios else args.stages[-1]
    print(f"ratio={ratios[last]:.3f}")


if __name__ == "__main__":
    main()
