"""The understanding stage really learns to look: a colour question on one-shape images, from random weights.

A pipeline check, not a benchmark: each conversation is one turn, the image's colour question or its
caption request (the caption names the colour too), so the colour is learned from the pixels either
way; if images did not reach the language model, or labels were misaligned, accuracy on new images
would stay near chance (1/6).
"""

import random

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
    return {"image": image, "json": {"caption": f"a {color} {shape}", "questions": [question]}}


def test_understanding_stage_learns_colours_from_pixels(tmp_path):
    cfg = TrainConfig(stage="understanding", init="random:nano", out_dir=str(tmp_path), steps=300, batch_size=32,
                      lr=1e-3, warmup_steps=30, ema_decay=0.0, progress=False, checkpoint_every=10_000)
    trainer = Trainer(cfg, Looping(one_shape(i) for i in range(4000)))
    asked = [trainer.stage.conversation(trainer.dataset[i], cfg.seed, i)[0][0][0] for i in range(64)]
    assert 16 <= sum(q.startswith("what color is the") for q in asked) <= 48  # about half ask the colour
    for _ in range(cfg.steps):
        trainer.train_step()
    test = [one_shape(10**6 + i) for i in range(48)]
    questions = [t["json"]["questions"][0] for t in test]
    answers = trainer.model.eval().answer([t["image"] for t in test], [q["question"] for q in questions],
                                          max_new_tokens=4)
    accuracy = sum(a == q["answer"] for a, q in zip(answers, questions, strict=True)) / len(test)
    assert accuracy >= 0.9, (accuracy, answers[:8])
