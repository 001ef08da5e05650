"""vision_first.py INIT SHARDS STEPS BATCH OUT [LR]: the backbone's vision tower (and merger) trained alone on
the recipe's object-code read-out (object_labels_at centre) for STEPS steps of BATCH images (AdamW, 50 warm-up
steps, cosine), no language model; INIT with that tower saved to OUT. Prints seconds a step (session 22: the
recipe's understanding stage from it reached VQA 0.727 against 0.734 from the clip model; not in the recipe)."""
import dataclasses, math, sys, tempfile, time, torch
from blip3o.train.data import ShardDataset
from blip3o.train.recipe import NANO_STAGES
from blip3o.train.stages import code_loss, object_codes_of
from blip3o.train.trainer import Trainer
init, shards, steps, batch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
lr = float(sys.argv[6]) if len(sys.argv) > 6 else 1e-3
base = next(s for s in NANO_STAGES if s.stage == "understanding")
cfg = dataclasses.replace(base, init=init, out_dir=tempfile.mkdtemp(), data=[shards], steps=1, progress=False,
                          device="cpu")
tr = Trainer(cfg, ShardDataset(shards, seed=0))
backbone, head = tr.model.backbone, tr.stage.object_head
visual = backbone.model.model.visual
merge = backbone.config.spatial_merge_size
params = list(visual.parameters()) + list(head.parameters())
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 50 if s < 50 else
                                          0.1 + 0.45 * (1 + math.cos(math.pi * (s - 50) / max(1, steps - 50))))
visual.train()
started = time.perf_counter()
for step in range(steps):
    items = [tr.dataset[step * batch + i] for i in range(batch)]
    inputs = backbone.processor.image_processor(images=[it["image"] for it in items], return_tensors="pt")
    tokens = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    codes = torch.cat([object_codes_of(it, int(h) // merge, int(w) // merge)
                       for it, (_, h, w) in zip(items, inputs["image_grid_thw"].tolist())])
    loss = code_loss(head(tokens.float()), codes)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
    if step % 50 == 0 or step == steps - 1:
        print(f"step {step} loss {loss.item():.4f} s/step {(time.perf_counter() - started) / (step + 1):.3f}",
              flush=True)
tr.model.save_pretrained(out)
print("saved", out)
