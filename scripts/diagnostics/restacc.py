"""Teacher-forced accuracy on the understanding option `restate`'s answers. usage: restacc.py MODEL [THREADS]. For 96
fresh scenes (seed 991) it builds one image turn and one restate turn (as the stage trains them) and prints the
accuracy of every answer token of the restate turn and of its relation word alone (left/right/above/below).
Env OPTION=plan: a `plan` turn instead, and the accuracy of its first token (the shape that goes left or on top)."""
import os
import sys

import torch

from blip3o import Blip3o
from blip3o.shapes import make_sample
from blip3o.train.stages import UnderstandingStage

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
m = Blip3o.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
option = os.environ.get("OPTION", "restate")
st = UnderstandingStage(m, {"max_turns": 1, option: 1})
tok = m.backbone.tokenizer
rel_ids = set(tok(" left right above below", add_special_tokens=False).input_ids)
items = [{"image": im, "json": meta} for im, meta in (make_sample(991, i) for i in range(96))]
tot = corr = rtot = rcorr = 0
with torch.no_grad():
    for k in range(0, 96, 32):
        b = st.collate(items[k:k+32], list(range(k, k+32)), 77, torch.device("cpu"))
        labels = b.pop("labels")
        logits = m.backbone.model(**b).logits[:, :-1]
        tgt = labels[:, 1:]
        pred = logits.argmax(-1)
        for r in range(tgt.shape[0]):
            pos = (tgt[r] != -100).nonzero().flatten().tolist()
            # split the labelled positions into turns (runs of consecutive positions)
            runs, cur = [], []
            for p in pos:
                if cur and p != cur[-1] + 1:
                    runs.append(cur)
                    cur = []
                cur.append(p)
            runs.append(cur)
            turn = runs[0] if option == "plan" else runs[-1]  # plan turns open the conversation
            if option == "plan":  # the first answer token: which shape goes left / on top
                rtot, rcorr = rtot + 1, rcorr + int(pred[r, turn[0]] == tgt[r, turn[0]])
            for p in turn:
                hit = int(pred[r, p] == tgt[r, p])
                tot, corr = tot + 1, corr + hit
                if option == "restate" and tgt[r, p].item() in rel_ids:
                    rtot, rcorr = rtot + 1, rcorr + hit
key = "first (shape) token acc" if option == "plan" else "relation token acc"
print(sys.argv[1], option, "token acc", round(corr / tot, 3), key, round(rcorr / rtot, 3), rtot)
