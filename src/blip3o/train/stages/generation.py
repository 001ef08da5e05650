"""The generation stage: the queries and the DiT learn to flow from noise to the frozen encoder's tokens.

    text -> backbone (frozen) with the queries -> cond (B, 64, H)
    image -> clip_encoder (frozen) -> x_0 (B, 64, C);  x_t = (1 - t) x_0 + t x_1
    loss = dit.loss(path, cond * keep, self_condition)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blip3o.flow import sample_path
from blip3o.images import pil_to_tensor
from blip3o.train.options import StageOptions, share
from blip3o.train.stages.base import Stage
from blip3o.train.stages.texts import generation_text
from blip3o.train.streams import item_generator


@dataclass(frozen=True)
class GenerationOptions(StageOptions):
    # how often an item drawn for a prompt is conditioned on that prompt rather than its caption (None: either
    # text equally likely). With shards written prompt-first, p > 0.5 trains more on the form the evaluation
    # asks in; nano: 0.9
    prompt_share: float | None = share(None)
    # the share of items trained with the condition zeroed: the unconditional branch of guidance
    condition_drop: float = share(0.1)
    # for a DiT built with `self_condition=True`: the share of items that read the DiT's clean estimate from a
    # first, gradient-free pass; the others read zeros, as the first sampling step does
    self_condition_rate: float = share(0.5)


class GenerationStage(Stage):
    """Backbone, encoder and decoder frozen; the queries and the DiT learn flow matching on the encoder's
    tokens, each item with one path sample (noise, time, condition drop) from its own streams."""

    name, trains, Options = "generation", ("queries", "dit"), GenerationOptions
    options: GenerationOptions

    def collate(self, items, indices, seed, device):
        c, o = self.model.config.dit, self.options
        prompts, x_1, t, keep, self_cond = [], [], [], [], []
        for item, i in zip(items, indices, strict=True):
            prompts.append(generation_text(item, seed, i, o.prompt_share))
            x_1.append(torch.randn(c.num_tokens, c.in_channels, generator=item_generator(seed, i, "noise")))
            t.append(torch.rand((), generator=item_generator(seed, i, "time")))
            keep.append(torch.rand((), generator=item_generator(seed, i, "condition_drop")) >= o.condition_drop)
            self_cond.append(torch.rand((), generator=item_generator(seed, i, "self_condition"))
                             < o.self_condition_rate)
        return {
            "prompts": prompts,
            "pixels": pil_to_tensor([it["image"] for it in items]).to(device),  # (B, 3, H, W)
            "x_1": torch.stack(x_1).to(device),  # (B, 64, C)
            "t": torch.stack(t).to(device),  # (B,)
            "keep": torch.stack(keep).to(device),  # (B,) False: condition dropped
            "self_condition": torch.stack(self_cond).to(device),  # (B,) reads a first pass's estimate
        }

    def loss(self, batch):
        model = self.model
        x_0 = model.clip_encoder.encode(batch["pixels"])  # (B, 64, C), the targets
        cond = model.condition(batch["prompts"])  # (B, 64, H): gradients reach the queries
        cond = cond * batch["keep"].view(-1, 1, 1).to(cond.dtype)
        path = sample_path(x_0, batch["x_1"].to(x_0.dtype), batch["t"])
        return model.dit.loss(path, cond, batch["self_condition"])
