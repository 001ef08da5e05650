"""knock_area.py MODEL: decode 48 two-object scenes with object 0's 3x3 token neighbourhood replaced by a
one-object donor's, and with only the two centre tokens kept on that donor; counts the detected objects."""
import random, sys, torch
from blip3o import Blip3o
from blip3o.images import pil_to_tensor, tensor_to_pil
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
donor = [s for s in (sample_scene(rng) for _ in range(400)) if len(s.objects) == 1]
cell = lambda o: min(7, int(o.cy) // 8) * 8 + min(7, int(o.cx) // 8)
near = lambda a, b, r: abs(a // 8 - b // 8) <= r and abs(a % 8 - b % 8) <= r
with torch.no_grad():
    tok = m.clip_encoder.encode(pil_to_tensor([render(s) for s in scenes]))
    dtok = m.clip_encoder.encode(pil_to_tensor([render(s) for s in donor]))
    k3, only = tok.clone(), tok.clone()
    for i, s in enumerate(scenes):
        c0, c1 = cell(s.objects[0]), cell(s.objects[1])
        # a donor whose one object is far from both
        j = next(j for j, d in enumerate(donor) if not near(cell(d.objects[0]), c0, 2) and not near(cell(d.objects[0]), c1, 2))
        for c in range(64):
            if near(c, c0, 1):
                k3[i, c] = dtok[j, c]
            if c not in (c0, c1):
                only[i, c] = dtok[j, c]
    g = torch.Generator().manual_seed(0)
    for name, t in (("3x3 of object 0 replaced", k3), ("only the 2 centre tokens kept (rest: a 1-object donor)", only)):
        ims = tensor_to_pil(m.decoder.decode(t, generator=g))
        counts = [len(detect(im)) for im in ims]
        print(name, "objects detected:", {k: counts.count(k) for k in sorted(set(counts))})
