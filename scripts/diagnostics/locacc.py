"""locacc.py MODEL [N]: accuracy on `where is the X?` (held-out scenes) and the position questions' answers split by truth."""
import random, sys, torch
from blip3o import Blip3o
from blip3o.shapes.data import make_sample
from blip3o.shapes.questions import locate_questions
from blip3o.shapes.world import Scene
torch.set_num_threads(2)
m = Blip3o.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
n = int(sys.argv[2]) if len(sys.argv) > 2 else 200
rng = random.Random(99)
ims, qs, ans, pims, pqs, pans = [], [], [], [], [], []
for i in range(n):
    image, meta = make_sample(555, i, prompt_first=0.0)
    for q, a in locate_questions(Scene.from_dict(meta["scene"]), rng, 1):
        ims.append(image); qs.append(q); ans.append(a)
    for q in meta["questions"]:
        if q["type"] == "position":
            pims.append(image); pqs.append(q["question"]); pans.append(q["answer"])
got = []
for s in range(0, len(qs), 32):
    got += m.answer(ims[s:s+32], qs[s:s+32], max_new_tokens=8)
acc = sum(g.strip().rstrip(".") == a for g, a in zip(got, ans)) / len(ans)
print(f"locate accuracy {acc:.3f} on {len(ans)}; examples", list(zip(qs[:3], got[:3], ans[:3])))
pg = []
for s in range(0, len(pqs), 32):
    pg += m.answer(pims[s:s+32], pqs[s:s+32], max_new_tokens=4)
for truth in ("yes", "no"):
    idx = [k for k, a in enumerate(pans) if a == truth]
    print(f"position questions with answer {truth}: {len(idx)}, answered right {sum(pg[k].strip().startswith(truth) for k in idx) / max(1, len(idx)):.3f}")
