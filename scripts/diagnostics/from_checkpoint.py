"""from_checkpoint.py INIT CHECKPOINT_DIR OUT: the model of a stage's INIT with a mid-run checkpoint's EMA weights
(its trained parameters) loaded, saved to OUT, to measure a run before it ends."""
import os, sys, torch
from blip3o import Blip3o
init, ckpt, out = sys.argv[1:4]
m = Blip3o.from_pretrained(init, dtype=torch.float32)
state = torch.load(f"{ckpt}/trainer_state.pt", map_location="cpu", weights_only=False)
weights = state["params"] if os.environ.get("RAW") == "1" or state.get("ema") is None else state["ema"]
params = dict(m.named_parameters())
with torch.no_grad():
    for n, t in weights.items():
        if n.startswith('aux.'):  # a stage's training-only heads
            continue
        params[n].copy_(t)
print("step", state.get("step"), "loaded", len(weights), "tensors")
m.save_pretrained(out)
