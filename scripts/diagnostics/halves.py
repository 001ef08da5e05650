"""Where generated objects land, for models trained on ordered layouts (blip3o data shapes --ordered).
usage: halves.py MODEL [N] [TAG]: N prompts of TAG (position or two_object; default position), one image each.
Prints, per prompt kind, how often each named shape is drawn and how often it lies in the half its text gives."""
import collections, random, sys, torch
from blip3o import Blip3o
from blip3o.shapes import detect, sample_prompt
torch.set_num_threads(1)
path = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 40
tag = sys.argv[3] if len(sys.argv) > 3 else "position"
m = Blip3o.from_pretrained(path, dtype=torch.float32).eval()
rng = random.Random(11)
prompts = [sample_prompt(rng, tag) for _ in range(n)]
images = m.generate([p.text for p in prompts], seed=5)
c = collections.Counter()
for p, im in zip(prompts, images):
    req, objs = p.requirement, detect(im)
    if req.relations:
        r = req.relations[0]
        a, b = req.groups[r.a].shape, req.groups[r.b].shape
        axis = "cx" if r.rel in ("left of", "right of") else "cy"
        low_a = r.rel in ("left of", "above")
    else:
        a, b, axis, low_a = req.groups[0].shape, req.groups[1].shape, "cx", True
    A = [o for o in objs if o.shape == a]
    B = [o for o in objs if o.shape == b]
    c["n"] += 1
    c["objects"] += len(objs)
    c["has_first"] += bool(A)
    c["has_second"] += bool(B)
    c["both"] += bool(A and B)
    c["first_in_half"] += any((getattr(o, axis) < 32) == low_a for o in A)
    c["second_in_half"] += any((getattr(o, axis) >= 32) == low_a for o in B)
    c["both_in_halves"] += (any((getattr(o, axis) < 32) == low_a for o in A)
                            and any((getattr(o, axis) >= 32) == low_a for o in B))
print(dict(c))
