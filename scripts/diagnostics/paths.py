"""Which condition path the DiT reads: its clean-token error on real prompt scenes with the full condition,
with the cross-attention shut (gates at 0), with the pooled caption (adaLN) taken from the empty condition,
and with the prompt's two objects named in the other order.
usage: paths.py MODEL [N] [TAG]; env ORDERED=1 draws ordered scenes (blip3o data shapes --ordered), CANONICAL=1
canonical ones (--canonical; CJ their jitter, 3)"""
import os, random, sys, torch
from blip3o import Blip3o
from blip3o.images import pil_to_tensor
from blip3o.shapes import canonical_scene, render, sample_prompt, scene_for
torch.set_num_threads(int(os.environ.get("THREADS", "1")))
path = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 64
tag = sys.argv[3] if len(sys.argv) > 3 else "two_object"
m = Blip3o.from_pretrained(path, dtype=torch.float32).eval()
dit = m.dit
rng = random.Random(7)
prompts, swapped, images = [], [], []
for _ in range(n):
    p = sample_prompt(rng, tag)
    g = p.requirement.groups
    prompts.append(p.text)
    items = [f"{x.color} {x.shape}" if x.color else x.shape for x in g[:2]]  # the two named objects, whole
    swapped.append(p.text.replace(items[0], "@").replace(items[1], items[0]).replace("@", items[1]))
    if os.environ.get("CANONICAL") == "1":
        images.append(render(canonical_scene(p, rng, jitter=int(os.environ.get("CJ", "3"))), rng))
    else:
        images.append(render(scene_for(p, rng, extras=False, ordered=os.environ.get("ORDERED") == "1"), rng))
with torch.no_grad():
    x0 = dit.to_model_space(m.clip_encoder.encode(pil_to_tensor(images)))
    cond, cswap = m.condition(prompts), m.condition(swapped)
    full, sw, empty = dit.prepare_condition(cond), dit.prepare_condition(cswap), dit.prepare_condition(torch.zeros_like(cond))
    embed = dit.time_caption_embed
    gates = [b.gate.clone() for b in dit.layers]
    g = torch.Generator().manual_seed(0)
    for tv in (0.5, 0.7, 0.9):
        xt = (1 - tv) * x0 + tv * torch.randn(x0.shape, generator=g)
        t = torch.full((n,), tv)
        def err(c, shut=False, pooled_from=None):
            if shut:
                for b in dit.layers: b.gate.zero_()
            if pooled_from is not None:
                orig = embed.forward
                embed.forward = lambda t_, ctx, mask: orig(t_, pooled_from.context, pooled_from.mask)
            v = dit.velocity(xt, t, c)
            for b, g0 in zip(dit.layers, gates): b.gate.copy_(g0)
            if pooled_from is not None:
                embed.forward = orig
            return (((xt - tv * v) - x0) ** 2).mean().item()
        e = {"full": err(full), "no cross-attn": err(full, shut=True), "no pooled": err(full, pooled_from=empty),
             "order swapped": err(sw), "uncond": err(empty)}
        print(f"t={tv}: " + "  ".join(f"{k} {v:.4f}" for k, v in e.items()), flush=True)
