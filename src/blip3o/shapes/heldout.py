"""The held-out draws of the Shapes evaluation: random streams no training draw uses, and their rasteriser.

Both the evaluation (`evaluate.py`) and the held-out edit file (`edits.py`) draw from them.
"""

from __future__ import annotations

import random

from .render import HELD_OUT_RASTERISERS

EVAL_SEED = 1_000_003  # the seed of every evaluation draw
HELD_OUT_PREFIX = "heldout"  # every held-out draw's string seed starts with it; no training draw's does
HELD_OUT_RASTERISER = HELD_OUT_RASTERISERS[0]


def held_out_random(seed: int, *stream: str | int) -> random.Random:
    """The random.Random of one held-out draw: string-seeded `heldout-{seed}-{stream...}`.

    A string seed enters the generator's seed verbatim (followed by its SHA-512), so two different strings
    seed differently. Training draws are seeded `shapes-{seed}-{index}[-layout]` (`make_example`) or by
    integers (the trainer's streams): none starts with `heldout-`, whatever the training seed.
    """
    return random.Random("-".join(str(part) for part in (HELD_OUT_PREFIX, seed, *stream)))
