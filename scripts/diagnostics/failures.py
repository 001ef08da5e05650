"""Why do a family's images fail? usage: failures.py MODEL TAG N [THREADS]; env G (guidance), REAL=1 (also decode the
real tokens of each prompt's canonical scene: the decoder's upper bound). For N evaluation-style prompts of TAG
(2 images each) it detects the objects and counts the kinds of failure: the number of objects, the shapes, the
colours, colours swapped between the two named shapes, the relation."""
import collections, dataclasses, os, random, sys, torch
from blip3o import Blip3o
from blip3o.shapes import canonical_scene, render, sample_prompt
from blip3o.shapes.detect import detect
from blip3o.shapes.prompts import check
from blip3o.shapes.world import relation_holds

path, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
m = Blip3o.from_pretrained(path, dtype=torch.float32).eval()
if "G" in os.environ:
    m.config = dataclasses.replace(m.config, guidance=float(os.environ["G"]))
rng = random.Random(4242)
prompts = [sample_prompt(rng, tag) for _ in range(n)]


def kind(p, objs):
    if check(p, objs):
        return "pass"
    groups = p.requirement.groups
    want = sum(g.count for g in groups)
    if len(objs) != want:
        return f"{len(objs)} objects (want {want})"
    shapes = sorted(o.shape for o in objs)
    if shapes != sorted(g.shape for g in groups for _ in range(g.count)):
        return "wrong shapes"
    if tag in ("color_attr", "colors"):
        by_shape = {o.shape: o.color for o in objs}
        got = [by_shape.get(g.shape) for g in groups]
        want_c = [g.color for g in groups]
        if len(groups) == 2 and got == want_c[::-1]:
            return "colours swapped"
        wrong = sum(a != b for a, b in zip(got, want_c))
        return f"{wrong} colour(s) wrong" + (" (one takes the other's)" if len(set(got)) == 1 and got[0] in want_c else "")
    if p.requirement.relations:
        r = p.requirement.relations[0]
        a = [o for o in objs if o.shape == groups[r.a].shape]
        b = [o for o in objs if o.shape == groups[r.b].shape]
        inv = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[r.rel]
        if any(relation_holds(inv, x, y) for x in a for y in b):
            return "relation reversed"
        return "relation neither"
    return "other"


def tally(images_of):
    kinds = collections.Counter()
    for i, p in enumerate(prompts):
        for im in images_of(i, p):
            kinds[kind(p, detect(im))] += 1
    total = sum(kinds.values())
    return {k: f"{v} ({v / total:.2f})" for k, v in kinds.most_common()}


gen = []
for s in range(0, n, 16):
    gen += m.generate([p.text for p in prompts[s:s + 16]], num_images=2, seed=4242 + s)
print("generated:", tally(lambda i, p: gen[2 * i:2 * i + 2]), flush=True)
if tag == "position":  # pass rate by relation word: a DiT that ignores the word passes one of each pair
    by_rel = collections.defaultdict(list)
    for i, p in enumerate(prompts):
        by_rel[p.requirement.relations[0].rel] += [check(p, detect(im)) for im in gen[2 * i:2 * i + 2]]
    print("pass by relation:", {r: f"{sum(v)}/{len(v)}" for r, v in sorted(by_rel.items())}, flush=True)
if os.environ.get("REAL") == "1":
    r2 = random.Random(7)
    real = [render(canonical_scene(p, r2, jitter=0), r2) for p in prompts]
    rec = []
    for s in range(0, n, 16):
        rec += m.reconstruct(real[s:s + 16], seed=s)
    print("real tokens decoded:", tally(lambda i, p: [rec[i]]), flush=True)
