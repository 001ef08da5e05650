"""usage: und_step.py INIT SHARDS STEPS [OPTIONS_JSON] [PRECISION] -> one JSON line: the recipe's understanding
step (its batch and options, OPTIONS_JSON merged over them) timed over STEPS steps (the first not counted), with the
tokens of a 64-conversation batch: padded length, real tokens and answer tokens per conversation (session 20), and
those in text-only turns (plan, reading, restate: `UnderstandingStage.turns`) with their share (sessions 21, 22).
STEPS 0 prints the tokens only."""
import dataclasses, json, random, sys, tempfile, time, torch
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
tok, text_only = trainer.model.backbone.tokenizer, 0
for i, item in enumerate(items):  # the turns collate drew (the same rng), the answer tokens of the text-only ones
    pairs, flags = trainer.stage.turns(item, random.Random(i))  # collate (seed 0) draws with Random(0 * 7919 + i)
    text_only += sum(len(tok(a + "<|im_end|>", add_special_tokens=False).input_ids)
                     for (_, a), flag in zip(pairs, flags) if flag)
times = []
for _ in range(steps):
    started = time.perf_counter()
    trainer.train_step()
    times.append(time.perf_counter() - started)
step = sum(times[1:]) / (steps - 1) if steps > 1 else float("nan")
answers = (batch["labels"] != -100).sum().item() / 64
print(json.dumps({"options": extra, "precision": precision, "batch": cfg.batch_size, "step_s": round(step, 3),
                  "padded_len": batch["input_ids"].shape[1], "tokens": batch["attention_mask"].sum().item() / 64,
                  "answer_tokens": answers,
                  "text_only_answer_tokens": text_only / 64, "text_only_share": round(text_only / 64 / answers, 3),
                  "answer_tokens_per_s": round(answers * cfg.batch_size / step, 1),
                  "threads": torch.get_num_threads()}))
