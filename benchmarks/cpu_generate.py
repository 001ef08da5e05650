"""Images/s of `Blip3o.generate` on a CPU at batch 1 and 8, this tree's code against a git revision's.

The model is loaded and set up as the CLI and the server do (`blip3o.cli.models.load_for_command`, freed memory
kept). Each measurement runs in a fresh process (the model loaded, one warm-up call, then `--repeats` timed calls of
`--batch` prompts, one image each); the two trees alternate round by round, so that a drift of the machine's
speed hits both alike. Prints images/s of each tree at each batch and `ratio=<this/REF>` (higher is faster);
the last line is the ratio at batch 8. Without `--against`, the tree is timed alone and no ratio is printed.

    python benchmarks/cpu_generate.py --against HEAD~1          # the shipped nano, 2 rounds
    python benchmarks/cpu_generate.py --model runs/nano/model --batches 1 8 16 --rounds 3
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
from pathlib import Path

PROMPTS = ("a photo of a red circle left of a blue square", "a photo of three green triangles",
           "a photo of a yellow cross and a purple circle", "a photo of a cyan square")

CHILD = r"""
import argparse, json, sys, time
import torch
from blip3o.allocator import keep_freed_memory
from blip3o.cli.models import load_for_command
model_name, batch, repeats, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
keep_freed_memory()  # as the CLI's entry point does
model = load_for_command(argparse.Namespace(model=model_name, device=None, dtype=None))  # as the CLI loads it
texts = [prompts[i % len(prompts)] for i in range(batch)]
model.generate(texts, num_images=1, seed=0)  # warm-up: allocator, kernels, caches
seconds = []
for r in range(repeats):
    started = time.perf_counter()
    model.generate(texts, num_images=1, seed=r + 1)
    seconds.append(time.perf_counter() - started)
print(json.dumps({"images_per_s": batch / (sum(seconds) / repeats), "threads": torch.get_num_threads()}))
"""


def run(model: str, batch: int, repeats: int, src: Path) -> dict:
    """One fresh process whose blip3o is the tree at `src` (its src/ folder)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])}
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(batch), str(repeats), json.dumps(PROMPTS)],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"generate timing failed at batch {batch} (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nano", help="a preset with shipped weights or a model folder")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed generate calls a process")
    parser.add_argument("--rounds", type=int, default=2, help="alternated processes of each tree a batch")
    parser.add_argument("--against", metavar="REF", help="a git revision whose code is timed beside this tree's")
    args = parser.parse_args()
    if min(args.batches) < 1 or args.repeats < 1 or args.rounds < 1:
        raise SystemExit("--batches, --repeats and --rounds must be at least 1")
    root = Path(__file__).resolve().parents[1]
    print(f"device: cpu ({platform.processor() or platform.machine()}), {os.cpu_count()} cores; model "
          f"{args.model}; {args.repeats} timed calls a process, {args.rounds} rounds")
    ratio = None
    with tempfile.TemporaryDirectory() as tmp:
        ref = Path(tmp) / "ref"
        if args.against:
            subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(ref), args.against],
                           check=True, capture_output=True)
        try:
            for batch in args.batches:
                ours, theirs = [], []
                for _ in range(args.rounds):
                    if args.against:
                        theirs.append(run(args.model, batch, args.repeats, ref / "src")["images_per_s"])
                    ours.append(run(args.model, batch, args.repeats, root / "src")["images_per_s"])
                line = f"batch {batch:3d}: this tree {statistics.median(ours):.3f} images/s"
                if args.against:
                    ratio = statistics.median(ours) / statistics.median(theirs)
                    line += f"  {args.against} {statistics.median(theirs):.3f} images/s  ratio={ratio:.3f}"
                print(line, flush=True)
        finally:
            if args.against:
                subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(ref)],
                               capture_output=True)
    if ratio is not None:
        print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
