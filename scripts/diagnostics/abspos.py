"""abspos.py MODEL [SHARDS]: Does the DiT know absolute position? Per-cell mean of its clean estimate at t=0.98 (pure-ish noise,
real conditions) vs the per-cell mean of real tokens; also a cheap position-in-cell check on real tokens."""
import sys, torch
from blip3o import Blip3o
from blip3o.images import pil_to_tensor
from blip3o.train.data import ShardDataset
from blip3o.train.stages import generation_text
torch.set_num_threads(1)
m = Blip3o.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ds = ShardDataset(sys.argv[2] if len(sys.argv) > 2 else "runs/nano5/data", seed=0)
n = 256
items = [ds[i] for i in range(n)]
with torch.no_grad():
    x0 = m.dit.to_model_space(m.clip_encoder.encode(pil_to_tensor([it["image"] for it in items])))
    cond = m.condition([generation_text(it, 0, i) for i, it in enumerate(items)])
    pc = m.dit.prepare_condition(cond)
    data_dev = x0.mean(0) - x0.mean((0, 1))  # (64, C)
    g = torch.Generator().manual_seed(0)
    for tv in (0.98, 0.9, 0.7):
        x1 = torch.randn(x0.shape, generator=g)
        xt = (1 - tv) * x0 + tv * x1
        est = xt - tv * m.dit.velocity(xt, torch.full((n,), tv), pc)
        dev = est.mean(0) - est.mean((0, 1))
        corr = (dev * data_dev).sum() / (dev.norm() * data_dev.norm())
        print(f"t={tv}: per-cell deviation norm dit {dev.norm():.3f} data {data_dev.norm():.3f} cosine {corr:.3f}")
        # with x_t shifted by one row (content moves, grid stays): a position-blind DiT's estimate moves with it
        G = 8
        xs = xt.view(n, G, G, -1).roll(1, dims=1).view(n, G * G, -1)
        es = xs - tv * m.dit.velocity(xs, torch.full((n,), tv), pc)
        back = es.view(n, G, G, -1).roll(-1, dims=1).view(n, G * G, -1)
        inner = slice(1, 7)
        a = back.view(n, G, G, -1)[:, inner]; b = est.view(n, G, G, -1)[:, inner]
        print(f"   rolled-by-one-row estimate vs original (inner rows): rel diff {((a-b).norm()/b.norm()):.3f}")
