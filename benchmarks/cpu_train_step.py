"""The nano recipe's training steps on CPU, with and without `keep_freed_memory` (glibc keeps freed blocks).

Each stage runs in two fresh processes, BLIP3O_KEEP_FREED_MEMORY=0 and =1 (mallopt cannot be undone in a
process), on the same Shapes shards (written once, the recipe's kinds: random scenes; canonical prompt scenes
for generation), with the recipe's stage options, batch and a fresh nano model. Prints the mean step time
(steps after the first) and the minor page faults of each, then `ratio=<kept/default>` per stage (lower is
faster) and a last line `ratio=` for the understanding stage, the recipe's longest.

    python benchmarks/cpu_train_step.py                 # every stage, 6 steps each, torch's default threads
    python benchmarks/cpu_train_step.py --stages understanding --steps 12
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


def run(stage: str, data: Path, steps: int, keep: bool, tmp: Path) -> dict:
    env = {**os.environ, "BLIP3O_KEEP_FREED_MEMORY": "1" if keep else "0", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, stage, str(data), str(steps), str(tmp / f"{stage}-{keep}")],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", default=["clip", "understanding", "decoder", "generation"])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is not timed)")
    from blip3o.shapes import write_shards
    from blip3o.train.recipe import NANO_GENERATION_DATA, NANO_STAGES

    batch = max(s.batch_size for s in NANO_STAGES if s.stage in args.stages)
    print(f"device: cpu ({platform.processor() or platform.machine()}), {os.cpu_count()} cores; "
          f"{args.steps} steps a stage, the recipe's batch and options")
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = batch * args.steps
        write_shards(tmp / "data", n, 0)
        write_shards(tmp / "data_generation", n, 1, **NANO_GENERATION_DATA)
        for stage in args.stages:
            data = tmp / ("data_generation" if stage == "generation" else "data")
            default, kept = run(stage, data, args.steps, False, tmp), run(stage, data, args.steps, True, tmp)
            ratios[stage] = kept["step_s"] / default["step_s"]
            print(f"{stage:14s} default {default['step_s']:.3f} s/step ({default['faults_per_step']:.0f} page faults)"
                  f"  kept {kept['step_s']:.3f} s/step ({kept['faults_per_step']:.0f})  threads {kept['threads']}"
                  f"  ratio={ratios[stage]:.3f}")
    last = "understanding" if "understanding" in ratios else args.stages[-1]
    print(f"ratio={ratios[last]:.3f}")


if __name__ == "__main__":
    main()
