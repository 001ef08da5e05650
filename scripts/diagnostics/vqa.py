"""usage: vqa.py MODEL THREADS -> VQA per type (evaluate_understanding, 200 scenes, the eval's seed)"""
import inspect, json, sys, time, torch
from blip3o import Blip3o
from blip3o import evaluate as E
torch.set_num_threads(int(sys.argv[2]))
m = Blip3o.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
t0 = time.time()
r = E.evaluate_understanding(m, num_scenes=200, seed=E.EVAL_SEED)
print(json.dumps({"model": sys.argv[1], "per_type": {k: round(v, 3) for k, v in r["per_type"].items()},
                  "vqa": round(r["vqa_overall"], 3), "seconds": round(time.time() - t0)}))
