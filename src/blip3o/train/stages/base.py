"""What every stage shares: its options, its auxiliaries, what it trains and freezes."""

from __future__ import annotations

import math
from collections import Counter
from typing import ClassVar

import torch
from torch import nn

from blip3o.model import Blip3o
from blip3o.train.options import StageOptions, split_options
from blip3o.train.stages.hooks import Auxiliary, auxiliaries_for

PARTS = ("backbone", "dit", "clip_encoder", "decoder")  # the modules of Blip3o a stage trains or freezes


class Stage:
    """One training stage: `collate` turns dataset items into a batch, `loss` the batch into a scalar.

    options: the TrainConfig's `stage_options`, split between the stage's own `Options` and those of the
    auxiliaries registered for it (blip3o.train.stages.hooks); unknown keys and bad values are refused.
    """

    name: ClassVar[str]
    trains: ClassVar[tuple[str, ...]]  # attributes of Blip3o this stage trains
    Options: ClassVar[type[StageOptions]]

    def __init__(self, model: Blip3o, options: dict | None = None) -> None:
        self.model = model
        self.options, parsed = self.parse_options(options or {})
        self.auxiliaries: list[Auxiliary] = [a(model, o) for a, o in parsed if a.switched_on(o)]
        # events the stage counts while it collates, by name (understanding: conversations cut or skipped); the
        # trainer logs their sums over every process
        self.counts: Counter[str] = Counter()

    @classmethod
    def parse_options(cls, options: dict) -> tuple[StageOptions, list[tuple[type[Auxiliary], StageOptions]]]:
        """The stage's own options and each registered auxiliary's; an unknown key or a bad value is refused
        (ValueError "stage option <name> ...")."""
        registered = auxiliaries_for(cls.name)
        own, *theirs = split_options(cls.name, options, [cls.Options, *(a.Options for a in registered)])
        return cls.Options(**own), [(a, a.Options(**raw)) for a, raw in zip(registered, theirs, strict=True)]

    def trainable(self, model: Blip3o) -> list[tuple[str, nn.Parameter]]:
        """Freeze every part but `trains` (frozen parts also go to eval mode); return what trains."""
        model.requires_grad_(False)
        for part in PARTS:
            getattr(model, part).train(part in self.trains).requires_grad_(part in self.trains)
        model.queries.requires_grad_("queries" in self.trains)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return named + [(f"aux.{n}", p) for n, p in self.aux_parameters()]

    def aux_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Parameters kept only for training (heads, a text tower): the stage's own and its auxiliaries'."""
        return [(f"{a.name}.{n}", p) for a in self.auxiliaries for n, p in a.parameters()]

    def aux_collate(self, items: list[dict], batch: dict, device: torch.device) -> dict:
        """The batch with every auxiliary's entries added (moved to `device`)."""
        for auxiliary in self.auxiliaries:
            extra = auxiliary.collate(items, batch)
            batch.update({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()})
        return batch

    def aux_loss(self, batch: dict, features: torch.Tensor | None) -> torch.Tensor | float:
        return sum((a.loss(batch, features) for a in self.auxiliaries), 0.0)

    def before_export(self) -> None:
        """Called with the weights to export in place, just before the model is saved: a stage that trains
        something the saved model must not hold (adapters) folds it into the model's own weights here."""

    def collate(self, items: list[dict], indices: list[int], seed: int, device: torch.device) -> dict:
        """items (dataset entries) with their global indices -> a batch on `device`."""
        raise NotImplementedError

    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError


def training_head(d_in: int, d_out: int, device: torch.device, seed: int = 0) -> nn.Linear:
    """A linear head kept only for training, initialised as nn.Linear is (uniform in +-1/sqrt(d_in)) from its
    own seeded generator: every process, and a resumed run, starts from the same head."""
    head = nn.Linear(d_in, d_out)
    generator, bound = torch.Generator().manual_seed(seed), 1 / math.sqrt(d_in)
    with torch.no_grad():
        nn.init.uniform_(head.weight, -bound, bound, generator=generator)
        nn.init.uniform_(head.bias, -bound, bound, generator=generator)
    return head.to(device)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x over processes with gradients flowing back to each process's own part."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))
