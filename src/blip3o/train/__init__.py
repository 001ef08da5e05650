"""Training: one trainer (trainer.py), four stages (stages/, one file each), the nano recipe (recipe.py).

Stage options are checked dataclasses (options.py); every random draw comes from a stream keyed by
(seed, item, name) (streams.py).
"""

from blip3o.train.stages import STAGES, Stage
from blip3o.train.trainer import TrainConfig, Trainer

__all__ = ["STAGES", "Stage", "TrainConfig", "Trainer"]
