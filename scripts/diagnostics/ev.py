"""usage: scripts/diagnostics/ev.py MODEL PER_TAG NUM_IMAGES THREADS ; env G, S, SAMPLER, ETA, TS override the DiT sampling.
Prints per-tag scores (evaluate_generation, seed 4242)."""
import dataclasses, json, os, sys, time, torch
from blip3o import Blip3o
from blip3o.evaluate import evaluate_generation
path, per_tag, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
m = Blip3o.from_pretrained(path, dtype=torch.float32).eval()
over = {}
if "G" in os.environ: over["guidance"] = float(os.environ["G"])
if "S" in os.environ: over["steps"] = int(os.environ["S"])
if "SAMPLER" in os.environ: over["sampler"] = os.environ["SAMPLER"]
if "ETA" in os.environ: over["eta"] = float(os.environ["ETA"])
if "TS" in os.environ: over["time_shift"] = float(os.environ["TS"])
m.config = dataclasses.replace(m.config, **over)
t0 = time.time()
r = evaluate_generation(m, per_tag=per_tag, num_images=n, seed=4242)
s = r["scores"]
print(json.dumps({"model": path, **over, "scores": {k: round(v, 3) for k, v in s.items()},
                  "diverse": round(r["diverse_prompts"], 3), "seconds": round(time.time() - t0)}), flush=True)
