"""usage: und_step.py INIT SHARDS STEPS [OPTIONS_JSON] [PRECISION] -> one JSON line: the recipe's understanding
step (its batch and options, OPTIONS_JSON merged over them) timed over STEPS steps (the first not counted), with the
tokens of a 64-conversation batch: padded length, real tokens and answer tokens per conversation (session 20)."""
import dataclasses, json, sys, tempfile, time, torch
from blip3o.train.data import ShardDataset
from blip3o.train.recipe import NANO_STAGES
from blip3o.train.trainer import Trainer
init, shards, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
precision = sys.argv[5] if len(sys.argv) > 5 else "auto"
base = next(s for s in NANO_STAGES if s.stage == "understanding")
cfg = dataclasses.replace(base, init=init, out_dir=tempfile.mkdtemp(), data=[shards], steps=steps, progress=False,
                          device="cpu", precision=precision, stage_options={**base.stage_options, **extra})
trainer = Trainer(cfg, ShardDataset(shards, seed=0))
items = [trainer.dataset[i] for i in range(64)]
batch = trainer.stage.collate(items, list(range(64)), 0, torch.device("cpu"))
times = []
for _ in range(steps):
    started = time.perf_counter()
    trainer.train_step()
    times.append(time.perf_counter() - started)
step = sum(times[1:]) / (steps - 1)
answers = (batch["labels"] != -100).sum().item() / 64
print(json.dumps({"options": extra, "precision": precision, "batch": cfg.batch_size, "step_s": round(step, 3),
                  "padded_len": batch["input_ids"].shape[1], "tokens": batch["attention_mask"].sum().item() / 64,
                  "answer_tokens": answers, "answer_tokens_per_s": round(answers * cfg.batch_size / step, 1),
                  "threads": torch.get_num_threads()}))
