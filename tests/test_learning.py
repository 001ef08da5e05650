"""The understanding stage really learns to look: a colour question on one-shape images, from random weights.

A pipeline check, not a benchmark: each conversation asks the image's colour question and its caption
request (`max_turns` 2, so every conversation holds the question); if images did not reach the language
model, or labels were misaligned, accuracy on new images would stay near chance (1/6).
"""

import random

import torch

from blip3o.shapes import render
from blip3o.shapes.world import COLORS, Obj, Scene
from blip3o.train import TrainConfig, Trainer


class Looping(list):
    def __getitem__(self, i):
        return list.__getitem__(self, i % len(self))


def one_shape(i: int) -> dict:
    r = random.Random(i)
    color, shape = r.choice(list(COLORS)), r.choice(["circle", "square", "triangle", "cross"])
    image = render(Scene([Obj(shape, color, r.randint(2, 40), r.randint(2, 40), 16)]))
    question = {"type": "color", "question": f"what color is the {shape}?", "answer": color}
    return {"image": image, "json": {"caption": f"a {shape}", "questions": [question]}}


def test_understanding_stage_learns_colours_from_pixels(tmp_path):
    # the caption names the shape only: the colour is in the pixels alone
    cfg = TrainConfig(stage="understanding", init="random:nano", out_dir=str(tmp_path), steps=300, batch_size=32,
                      lr=1e-3, warmup_steps=30, ema_decay=0.0, progress=False, checkpoint_every=10_000,
                      stage_options={"max_turns": 2})
    trainer = Trainer(cfg, Looping(one_shape(i) for i in range(4000)))
    batch = trainer.stage.collate([trainer.dataset[0]], [0], cfg.seed, torch.device("cpu"))
    asked = trainer.model.backbone.tokenizer.decode(batch["inputs"]["input_ids"][0])
    assert "what color is the" in asked and "describe the image." in asked
    for _ in range(cfg.steps):
        trainer.train_step()
    test = [one_shape(10**6 + i) for i in range(48)]
    questions = [t["json"]["questions"][0] for t in test]
    answers = trainer.model.eval().answer([t["image"] for t in test], [q["question"] for q in questions],
                                          max_new_tokens=4)
    accuracy = sum(a == q["answer"] for a, q in zip(answers, questions, strict=True)) / len(test)
    assert accuracy >= 0.9, (accuracy, answers[:8])
