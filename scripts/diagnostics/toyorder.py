"""Can the DiT learn the order of two named objects at all? A fresh DiT (the model's DiT config) trains alone
on `a photo of a {c1} {s1} and a {c2} {s2}` prompts whose scenes put the first object on the left and the
second on the right, with the frozen backbone's conditions computed once. It prints the clean-token error on
fresh scenes with the true prompt and with the two objects named in the other order (colours and shapes
swapped together), every EVAL steps. If the swapped error never rises above the true one, the DiT cannot read
the order even when it decides the target; if it rises, the real data's dilution is what hides the order.
usage: toyorder.py MODEL STEPS; env POS=1 (position prompts in canonical scenes; the test flips the relation), CANON=1 (canonical scenes), MIX=1 (train on prompts of every family, canonical
scenes; the test stays color_attr), CJ (their jitter, 3), FIXED=1 (fixed centres (16, 32) and (48, 32), size 16: one target
per prompt), JITTER=k (centres moved by up to k px), THREADS, LR (1e-3), QUERIES=1 (the queries train too), EVAL (250), SAVE (a path: the DiT's
state_dict at the end)"""
import itertools, os, random, sys, time, torch
from blip3o import Blip3o
from blip3o.flow import sample_path
from blip3o.images import pil_to_tensor
from blip3o.shapes import canonical_scene, make_prompt, render, sample_prompt
from blip3o.shapes.world import COLORS, SHAPES, Obj, Scene
from blip3o.dit import DiT

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
m = Blip3o.from_pretrained(sys.argv[1], dtype=torch.float32).eval().requires_grad_(False)
steps, every = int(sys.argv[2]), int(os.environ.get("EVAL", "250"))
fixed, jitter = os.environ.get("FIXED") == "1", int(os.environ.get("JITTER", "0"))
canon, mix = os.environ.get("CANON") == "1", os.environ.get("MIX") == "1"
cj = int(os.environ.get("CJ", "3"))  # the canonical layouts' jitter
pos = os.environ.get("POS") == "1"  # position prompts `a photo of a {s1} {rel} a {s2}`; the swap flips the relation
FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
if pos:
    pairs = [(s1, rel, s2) for (s1, s2) in itertools.permutations(SHAPES, 2) for rel in FLIP]
    text = lambda s1, rel, s2: f"a photo of a {s1} {rel} a {s2}"  # noqa: E731
    swapped = lambda s1, rel, s2: text(s1, FLIP[rel], s2)  # noqa: E731
else:
    pairs = [(c1, s1, c2, s2) for (c1, c2) in itertools.permutations(COLORS, 2)
             for (s1, s2) in itertools.permutations(SHAPES, 2)]
    text = lambda c1, s1, c2, s2: f"a photo of a {c1} {s1} and a {c2} {s2}"  # noqa: E731
    swapped = lambda c1, s1, c2, s2: text(c2, s2, c1, s1)  # noqa: E731
with torch.no_grad():
    cond = torch.cat([m.condition([text(*p) for p in pairs[i:i + 64]]) for i in range(0, len(pairs), 64)])
    swap = torch.cat([m.condition([swapped(*p) for p in pairs[i:i + 64]]) for i in range(0, len(pairs), 64)])


def scene(p, rng):
    if pos:
        return canonical_scene(make_prompt("position", [p[0], p[2]], rel=p[1]), rng, jitter=cj)
    c1, s1, c2, s2 = p
    if canon:
        return canonical_scene(make_prompt("color_attr", [s1, s2], [c1, c2]), rng, jitter=cj)
    if fixed:
        dx = [rng.randint(-jitter, jitter) for _ in range(4)]
        return Scene((Obj(s1, c1, 8 + dx[0], 24 + dx[1], 16), Obj(s2, c2, 40 + dx[2], 24 + dx[3], 16)))
    # random sizes and places, object 1 inside the left half, object 2 inside the right
    a, b = rng.randint(12, 18), rng.randint(12, 18)
    o1 = Obj(s1, c1, rng.randint(2, 30 - a), rng.randint(2, 62 - a), a)
    o2 = Obj(s2, c2, rng.randint(34, 62 - b), rng.randint(2, 62 - b), b)
    return Scene((o1, o2))


def batch(n, rng):
    idx = [rng.randrange(len(pairs)) for _ in range(n)]
    with torch.no_grad():
        x0 = m.dit.to_model_space(m.clip_encoder.encode(pil_to_tensor([render(scene(pairs[i], rng), rng) for i in idx])))
    return idx, x0


dit = DiT(m.config.dit).float()
train_queries = os.environ.get("QUERIES") == "1"  # the queries train too (conditions recomputed every step)
if train_queries:
    m.queries.requires_grad_(True)
opt = torch.optim.AdamW([*dit.parameters(), *([m.queries] if train_queries else [])], lr=float(os.environ.get("LR", "1e-3")), weight_decay=0.0)
rng, g = random.Random(0), torch.Generator().manual_seed(0)
test_idx, test_x0 = batch(128, random.Random(99))
test_noise = torch.randn(test_x0.shape, generator=torch.Generator().manual_seed(1))


def evaluate(step):
    dit.eval()
    out = []
    with torch.no_grad():
        for tv in (0.5, 0.9):
            xt = (1 - tv) * test_x0 + tv * test_noise
            t = torch.full((len(test_idx),), tv)
            e = {}
            ct = m.condition([text(*pairs[i]) for i in test_idx]) if train_queries else cond[test_idx]
            cs = m.condition([swapped(*pairs[i]) for i in test_idx]) if train_queries else swap[test_idx]
            for name, c in (("true", ct), ("swapped", cs), ("none", torch.zeros_like(ct))):
                v = dit.velocity(xt, t, dit.prepare_condition(c))
                e[name] = (((xt - tv * v) - test_x0) ** 2).mean().item()
            out.append(f"t={tv}: true {e['true']:.4f} swapped {e['swapped']:.4f} none {e['none']:.4f} "
                       f"(swap/true {e['swapped'] / e['true']:.3f})")
    dit.train()
    print(f"step {step}: " + " | ".join(out), flush=True)


start = time.time()
for step in range(1, steps + 1):
    if mix:  # prompts of every family, canonical scenes, conditions computed per batch
        ps = [sample_prompt(rng) for _ in range(32)]
        with torch.no_grad():
            x0 = m.dit.to_model_space(m.clip_encoder.encode(pil_to_tensor([render(canonical_scene(p, rng, jitter=cj), rng) for p in ps])))
            c = m.condition([p.text for p in ps])
    else:
        idx, x0 = batch(32, rng)
        c = m.condition([text(*pairs[i]) for i in idx]) if train_queries else cond[idx]
    c = c * (torch.rand(32, generator=g) >= 0.1).view(-1, 1, 1).float()
    lr = float(os.environ.get("LR", "1e-3")) * min(1.0, step / 100)
    for group in opt.param_groups:
        group["lr"] = lr
    path = sample_path(x0, torch.randn(x0.shape, generator=g), torch.rand(32, generator=g))
    loss = dit.loss(path, c, torch.rand(32, generator=g) < 0.5)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
    opt.step()
    if step % every == 0 or step == 1:
        print(f"[{time.time() - start:.0f}s] loss {loss.item():.4f}", end="  ")
        evaluate(step)
if os.environ.get("SAVE"):
    torch.save(dit.state_dict(), os.environ["SAVE"])
