"""knock_centre.py MODEL: Knock one object's centre token out of real token grids (replace it by the same cell of a scene that has
no object centre there) and decode: does the decoder still draw the object from the other tokens?"""
import random, sys, torch
from blip3o import Blip3o
from blip3o.images import pil_to_tensor
from blip3o.shapes import render, sample_scene
from blip3o.shapes.detect import detect
torch.set_num_threads(1)
m = Blip3o.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
rng = random.Random(3)
scenes = []
while len(scenes) < 48:
    s = sample_scene(rng)
    if len(s.objects) == 2:
        scenes.append(s)
donor = [sample_scene(rng) for _ in range(200)]
def cells(s):
    out = []
    for o in s.objects:
        out.append(min(7, int(o.cy) // 8) * 8 + min(7, int(o.cx) // 8))
    return out
with torch.no_grad():
    tok = m.clip_encoder.encode(pil_to_tensor([render(s) for s in scenes]))
    dtok = m.clip_encoder.encode(pil_to_tensor([render(s) for s in donor]))
    dcells = [set(cells(s)) for s in donor]
    knocked = tok.clone()
    for i, s in enumerate(scenes):
        c = cells(s)[0]
        j = next(j for j in range(len(donor)) if all(abs(c // 8 - d // 8) > 1 or abs(c % 8 - d % 8) > 1 for d in dcells[j]))
        knocked[i, c] = dtok[j, c]
    g = torch.Generator().manual_seed(0)
    for name, t in (("real", tok), ("knocked", knocked)):
        px = m.decoder.decode(t, generator=g)
        from blip3o.images import tensor_to_pil
        ims = tensor_to_pil(px)
        counts = [len(detect(im)) for im in ims]
        print(name, "objects detected:", {k: counts.count(k) for k in sorted(set(counts))})
