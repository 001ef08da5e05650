"""`blip3o eval shapes` on CPU, with and without `keep_freed_memory` (glibc keeps freed blocks).

Runs the CLI's evaluation of a model in fresh processes, alternately with BLIP3O_KEEP_FREED_MEMORY=0 (glibc's
defaults) and =1 (what the CLI does), on the training-world set (`--set`) at a reduced size (by default 4 prompts
a tag, 4 images each, 40 scenes of questions), and prints the wall seconds of each run, the scores of the last of
each (they must agree: the setting changes where memory comes from, not what is computed) and a last line
`ratio=<kept/default>` of the mean times.

    python benchmarks/cpu_eval.py                          # the shipped nano, 2 runs each
    python benchmarks/cpu_eval.py --model runs/nano/model --per-tag 25 --num-scenes 200 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: argparse.Namespace, keep: bool, out: Path) -> tuple[float, dict]:
    env = {**os.environ, "BLIP3O_KEEP_FREED_MEMORY": "1" if keep else "0", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "blip3o.cli", "eval", "shapes", "--model", args.model, "--out", str(out),
               "--set", args.set, "--per-tag", str(args.per_tag), "--num-images", str(args.num_images),
               "--num-scenes", str(args.num_scenes)]
    started = time.perf_counter()
    subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    return seconds, json.loads((out / "results.json").read_text())


def summary(results: dict) -> str:
    return (f"generation {results['generation']['scores']['overall']:.3f}, "
            f"VQA {results['understanding']['vqa_overall']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano")
    # the training-world set: the one its figures in docs/benchmarks.md were measured on
    parser.add_argument("--set", choices=("held-out", "training-world"), default="training-world")
    parser.add_argument("--per-tag", type=int, default=4)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--num-scenes", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    import torch

    print(f"device: cpu ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model}, "
          f"{args.set} set, {args.per_tag} prompts a tag x {args.num_images} images, {args.num_scenes} scenes")
    times: dict[bool, list[float]] = {False: [], True: []}
    last: dict[bool, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for keep in (False, True):  # alternated, so that drift of the machine hits both alike
                seconds, last[keep] = run(args, keep, Path(tmp) / f"{int(keep)}-{i}")
                times[keep].append(seconds)
                print(f"{'kept' if keep else 'default':8s} run {i}: {seconds:.1f} s ({summary(last[keep])})",
                      flush=True)
    if summary(last[False]) != summary(last[True]):  # the docstring's promise, checked rather than assumed
        print(f"WARNING: the scores differ between the settings: default {summary(last[False])}, "
              f"kept {summary(last[True])}")
    default, kept = statistics.mean(times[False]), statistics.mean(times[True])
    print(f"mean: default {default:.1f} s, kept {kept:.1f} s")
    print(f"ratio={kept / default:.3f}")


if __name__ == "__main__":
    main()
