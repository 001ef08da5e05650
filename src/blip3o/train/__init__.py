"""Training: one trainer (trainer.py), four stages (stages.py), the nano recipe (recipe.py)."""

from blip3o.train.stages import STAGES, Stage
from blip3o.train.trainer import TrainConfig, Trainer

__all__ = ["STAGES", "Stage", "TrainConfig", "Trainer"]
