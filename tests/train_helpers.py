"""Tiny in-memory data, an interrupted run and a torchrun entry point for the trainer tests."""

import json
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "blue": (40, 70, 210), "green": (40, 170, 60)}


def tiny_dataset(n: int = 64) -> list[dict]:
    items = []
    for i in range(n):
        name = list(COLORS)[i % 3]
        image = Image.new("RGB", (64, 64), (240, 240, 240))
        x = 4 + (i * 7) % 40
        ImageDraw.Draw(image).rectangle([x, 20, x + 14, 34], fill=COLORS[name])
        items.append({"image": image, "json": {
            "caption": f"a {name} square",
            "prompts": [{"tag": "colors", "prompt": f"a photo of a {name} square"}],
            "questions": [{"type": "color", "question": "what color is the square?", "answer": name}],
        }})
    return items


def fit_until_killed(trainer, step: int) -> None:
    """Run `trainer` until it reaches `step`, where it dies as Ctrl-C leaves it (a KeyboardInterrupt out of
    `fit`, after the checkpoints of the steps before)."""
    run_step = trainer.train_step

    def dying_step() -> float:
        if trainer.step == step:
            raise KeyboardInterrupt("killed")
        return run_step()

    trainer.train_step = dying_step
    try:
        trainer.fit()
    except KeyboardInterrupt:
        return
    raise AssertionError(f"the run ended without reaching step {step}")


def main() -> None:
    """torchrun --nproc_per_node N tests/train_helpers.py CONFIG.json"""
    from blip3o.distributed import shutdown
    from blip3o.train import TrainConfig, Trainer

    config = TrainConfig(**json.loads(Path(sys.argv[1]).read_text()))
    trainer = Trainer(config, tiny_dataset())
    trainer.fit()
    shutdown(trainer.world)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
