"""usage: turnshare.py INIT SHARDS [N] -> the recipe's understanding conversations (its options, the first N samples
of SHARDS, default 256): answer tokens a conversation in image turns and in text-only turns (plan, reading,
restate), and the text-only share (session 21)."""
import dataclasses, sys, tempfile, torch
from blip3o.train.data import ShardDataset
from blip3o.train.recipe import NANO_STAGES
from blip3o.train.trainer import Trainer
init, shards = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 256
base = next(s for s in NANO_STAGES if s.stage == "understanding")
# text_weight 0.5 only marks the text-only tokens in label_weights; the conversations are the recipe's
cfg = dataclasses.replace(base, init=init, out_dir=tempfile.mkdtemp(), data=[shards], progress=False, device="cpu",
                          stage_options={**base.stage_options, "text_weight": 0.5})
trainer = Trainer(cfg, ShardDataset(shards, seed=0))
batch = trainer.stage.collate([trainer.dataset[i] for i in range(n)], list(range(n)), 0, torch.device("cpu"))
labelled, weights = batch["labels"] != -100, batch["label_weights"]
text, image = (labelled & (weights == 0.5)).sum().item(), (labelled & (weights == 1)).sum().item()
print(f"{n} conversations: image answer tokens {image / n:.1f} a conversation, text-only {text / n:.1f}, "
      f"text-only share {text / (text + image):.3f}")
