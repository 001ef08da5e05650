"""Can the order of the named objects be read from the condition? An attention probe (one learned query per
slot over the 64 condition states, then a linear read-out) learns the first and the second object's shape
and colour of `a photo of a {c1} {s1} and a {c2} {s2}` prompts, trained on 70% of the 360 prompts and tested
on the rest. A bag-of-words condition gives chance (0.5 between the two named shapes); an ordered one 1.0.
usage: orderprobe.py MODEL [LAYER]  (LAYER: the backbone layer whose query states to read; default the condition)"""
import itertools, random, sys, torch
from torch import nn
from blip3o import Blip3o
from blip3o.shapes import COLORS, SHAPES
torch.set_num_threads(1)
m = Blip3o.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
items = [(c1, s1, c2, s2) for s1, s2 in itertools.permutations(SHAPES, 2) for c1, c2 in itertools.permutations(COLORS, 2)]
random.Random(0).shuffle(items)
texts = [f"a photo of a {c1} {s1} and a {c2} {s2}" for c1, s1, c2, s2 in items]
with torch.no_grad():
    cond = torch.cat([m.condition(texts[i:i + 60]) for i in range(0, len(texts), 60)]).float()
import os
cond = (cond - cond.mean(0)) / (cond.std(0) + 1e-5) if os.environ.get("RAW") != "1" else cond / cond.std()
labels = torch.tensor([[SHAPES.index(s1), COLORS.index(c1), SHAPES.index(s2), COLORS.index(c2)] for c1, s1, c2, s2 in items])
cut = int(0.7 * len(items))
torch.manual_seed(0)
H = cond.shape[-1]
q = nn.Parameter(torch.randn(2, H) * 0.1)
heads = nn.ModuleList([nn.Linear(H, 4), nn.Linear(H, 6), nn.Linear(H, 4), nn.Linear(H, 6)])
opt = torch.optim.Adam([q, *heads.parameters()], lr=3e-3, weight_decay=1e-4)
def run(x):
    att = torch.softmax(torch.einsum("sh,blh->bsl", q, x) / H ** 0.5, -1)
    pooled = torch.einsum("bsl,blh->bsh", att, x)
    return [heads[0](pooled[:, 0]), heads[1](pooled[:, 0]), heads[2](pooled[:, 1]), heads[3](pooled[:, 1])]
for step in range(1500):
    outs = run(cond[:cut])
    loss = sum(nn.functional.cross_entropy(o, labels[:cut, k]) for k, o in enumerate(outs))
    opt.zero_grad(); loss.backward(); opt.step()
with torch.no_grad():
    outs = run(cond[cut:])
    acc = [(o.argmax(-1) == labels[cut:, k]).float().mean().item() for k, o in enumerate(outs)]
    tr = [(o.argmax(-1) == labels[:cut, k]).float().mean().item() for k, o in enumerate(run(cond[:cut]))]
print(f"held-out: first shape {acc[0]:.2f} colour {acc[1]:.2f}  second shape {acc[2]:.2f} colour {acc[3]:.2f}"
      f"   (train {', '.join(f'{a:.2f}' for a in tr)})")
