"""How much of the token variance the order of the named objects explains: the encoder's tokens of 3000 ordered
two-object scenes (blip3o data shapes --ordered), residual variance per element knowing nothing, the unordered
pair of shapes, and the ordered pair. usage: ordergain.py MODEL; env CANONICAL=1 (canonical scenes), FIXED=1
(canonical cells, no jitter, size 16)"""
import os, sys
import random, collections, torch
from blip3o import Blip3o
from blip3o.images import pil_to_tensor
from blip3o.shapes import canonical_scene, render, sample_prompt, scene_for
from blip3o.shapes.world import Obj, Scene
torch.set_num_threads(1)
m = Blip3o.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
rng = random.Random(3)
keys, ims = [], []
for _ in range(3000):
    p = sample_prompt(rng, "two_object")
    g = p.requirement.groups
    keys.append((g[0].shape, g[1].shape))
    if os.environ.get("FIXED") == "1":
        scene = Scene((Obj(g[0].shape, "red", 12, 28, 16), Obj(g[1].shape, "blue", 36, 28, 16)))
    elif os.environ.get("CANONICAL") == "1":
        scene = canonical_scene(p, rng)
    else:
        scene = scene_for(p, rng, extras=False, ordered=True)
    ims.append(render(scene, rng))
with torch.no_grad():
    x = torch.cat([m.clip_encoder.encode(pil_to_tensor(ims[i:i+200])) for i in range(0, 3000, 200)]).float()
total = ((x - x.mean(0)) ** 2).mean().item()
def cond_var(keyf):
    groups = collections.defaultdict(list)
    for i, k in enumerate(keys): groups[keyf(k)].append(i)
    res = 0.0
    for idx in groups.values():
        xs = x[idx]; res += ((xs - xs.mean(0)) ** 2).mean().item() * len(idx)
    return res / len(keys)
print("total var per element %.4f" % total)
print("residual var | nothing %.4f | unordered pair %.4f | ordered pair %.4f" % (
    total, cond_var(lambda k: tuple(sorted(k))), cond_var(lambda k: k)))
