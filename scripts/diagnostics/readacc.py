"""Relation reading accuracy: `{caption}. is A rel B?` (answered from the caption), with the image as trained
and without it. usage: readacc.py MODEL [N]"""
import random, sys, torch
from blip3o import Blip3o
from blip3o.shapes import make_sample
from blip3o.shapes.questions import reading_questions
torch.set_num_threads(2)
path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200
m = Blip3o.from_pretrained(path, dtype=torch.float32).eval()
rng = random.Random(11)
qs, answers, images = [], [], []
i = 0
while len(qs) < n:
    image, meta = make_sample(99, 10_000_000 + i); i += 1
    if not meta.get("caption"):
        continue
    turns = reading_questions(meta["caption"], rng, 1)
    if turns and any(f" {r} the" in turns[0][0].split(". ")[-1] for r in ("above", "below", "left of", "right of")):
        qs.append(turns[0][0]); answers.append(turns[0][1]); images.append(image)
for label, imgs in (("with image", images), ("text only", [None] * n)):
    got = []
    for s in range(0, n, 32):
        got += m.answer(imgs[s:s + 32], qs[s:s + 32], max_new_tokens=3)
    acc = sum(g.strip().lower().rstrip(".") == a for g, a in zip(got, answers)) / n
    yes = sum(g.strip().lower().startswith("yes") for g in got) / n
    print(f"{path} {label}: relation reading accuracy {acc:.3f} (says yes {yes:.2f}; true yes rate "
          f"{answers.count('yes') / n:.2f}) e.g. {qs[0]!r} -> {got[0]!r}")
