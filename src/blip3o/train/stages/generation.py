"""The generation stage: the queries and the DiT learn to flow from noise to the frozen encoder's tokens.

    text -> backbone (frozen) with the queries -> cond (B, 64, H)
    image -> clip_encoder (frozen) -> x_0 (B, 64, C);  x_t = (1 - t) x_0 + t x_1
    loss = dit.loss(path, cond * keep, self_condition)

The objective is `blip3o.train.objective.generation_loss`; the stage draws each item's randomness from its own
streams and trains with the model's `train_layout` and `train_timesteps`.
"""

from __future__ import annotations

from dataclasses import dataclass

from blip3o.images import pil_to_tensor
from blip3o.train.objective import GenerationDraws, draw_generation, generation_loss
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
        o = self.options
        draws = draw_generation(len(items), self.model.config.dit, self.model.config.train_timesteps,
                                condition_drop=o.condition_drop, self_condition_rate=o.self_condition_rate,
                                generator=lambda k, name: item_generator(seed, indices[k], name))
        return {
            "prompts": [generation_text(item, seed, i, o.prompt_share) for item, i in zip(items, indices, strict=True)],
            "pixels": pil_to_tensor([it["image"] for it in items]).to(device),  # (B, 3, H, W)
            "x_1": draws.x_1.to(device),  # (B, 64, C)
            "t": draws.t.to(device),  # (B,)
            "keep": draws.keep.to(device),  # (B,) False: condition dropped
            "self_condition": draws.self_condition.to(device),  # (B,) reads a first pass's estimate
        }

    def loss(self, batch):
        draws = GenerationDraws(batch["x_1"], batch["t"], batch["keep"], batch["self_condition"])
        return generation_loss(self.model, batch["prompts"], batch["pixels"], draws)
