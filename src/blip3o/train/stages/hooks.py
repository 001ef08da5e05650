"""The one hook by which a data world adds to the generic stages: `Auxiliary`.

An auxiliary belongs to one stage and brings stage options of its own (a `StageOptions` dataclass, every
field off by default). A stage builds every auxiliary registered for it whose options switch it on, and
calls it at fixed points:

    turns(item, seed, index)   understanding: (turns before the image turns, turns after them), as
                               (question, answer) pairs; draws from its own streams (blip3o.train.streams)
    collate(items, batch)      extra batch entries (its targets), given the stage's batch so far
    loss(batch, features)      an extra loss term (scalar) on the stage's features: the clip stage's encoder
                               tokens (B, 64, C); the understanding stage's merged vision tokens (cells, H),
                               computed only when an auxiliary sets `wants_features`
    parameters()               (name, parameter) of the heads it trains along with the stage

The Shapes world's auxiliaries (object codes, object labels, plan and restate turns) live in
`blip3o.shapes.training`, which registers them when the stage registry is imported.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from blip3o.train.options import StageOptions

Turn = tuple[str, str]  # (question, answer)


class Auxiliary:
    """Base of the auxiliaries: every hook does nothing."""

    stage: ClassVar[str]  # the stage it plugs into
    name: ClassVar[str]  # prefix of its parameters' names ("aux.<name>.<parameter>")
    Options: ClassVar[type[StageOptions]]
    wants_features: ClassVar[bool] = False

    def __init__(self, model: Any, options: StageOptions) -> None:
        self.model = model
        self.options = options

    @classmethod
    def switched_on(cls, options: StageOptions) -> bool:
        """Whether these options ask for the auxiliary at all (a stage builds only those that are on)."""
        raise NotImplementedError

    def turns(self, item: dict, seed: int, index: int) -> tuple[list[Turn], list[Turn]]:
        return [], []

    def collate(self, items: list[dict], batch: dict) -> dict:
        return {}

    def loss(self, batch: dict, features: torch.Tensor) -> torch.Tensor | float:
        return 0.0

    def parameters(self) -> list[tuple[str, nn.Parameter]]:
        return []


AUXILIARIES: dict[str, list[type[Auxiliary]]] = {}


def register_auxiliary(auxiliary: type[Auxiliary]) -> type[Auxiliary]:
    """Register an auxiliary for its stage (usable as a class decorator); registering twice is a no-op."""
    registered = AUXILIARIES.setdefault(auxiliary.stage, [])
    if auxiliary not in registered:
        registered.append(auxiliary)
    return auxiliary


def auxiliaries_for(stage: str) -> list[type[Auxiliary]]:
    return list(AUXILIARIES.get(stage, []))
