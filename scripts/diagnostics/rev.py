"""The DiT's clean-token error on real position scenes with the true prompt vs the relation swapped.
usage: rev.py MODEL [N]; env ORDERED=1 draws the scenes in the ordered layout (blip3o data shapes --ordered)"""
import os, random, sys, torch
from blip3o import Blip3o
from blip3o.images import pil_to_tensor
from blip3o.shapes import evaluation_prompts, render, scene_for, sample_prompt
torch.set_num_threads(2)
path, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 64
m = Blip3o.from_pretrained(path, dtype=torch.float32).eval()
rng = random.Random(7)
SWAP = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}
prompts, swapped, images = [], [], []
while len(prompts) < n:
    p = sample_prompt(rng, "position")
    rel = next(r for r in SWAP if f" {r} " in p.text)
    scene = scene_for(p, rng, extras=False, ordered=os.environ.get("ORDERED") == "1")
    prompts.append(p.text); swapped.append(p.text.replace(f" {rel} ", f" {SWAP[rel]} "))
    images.append(render(scene, rng))
with torch.no_grad():
    x0 = m.dit.to_model_space(m.clip_encoder.encode(pil_to_tensor(images)))
    ct, cs = m.condition(prompts), m.condition(swapped)
    g = torch.Generator().manual_seed(0)
    for tv in (0.3, 0.5, 0.7, 0.9):
        x1 = torch.randn(x0.shape, generator=g)
        t = torch.full((n,), tv)
        xt = (1 - tv) * x0 + tv * x1
        errs = []
        for c in (ct, cs):
            pc = m.dit.prepare_condition(c)
            v = m.dit.velocity(xt, t, pc)
            est = xt - tv * v
            errs.append(((est - x0) ** 2).mean(dim=(1, 2)))
        e_t, e_s = errs
        print(f"t={tv}: err true {e_t.mean():.4f} swapped {e_s.mean():.4f} ratio {(e_s.mean()/e_t.mean()):.4f} "
              f"true better in {(e_t < e_s).float().mean():.2f} of {n}")
