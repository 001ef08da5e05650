"""The generation stage: the queries and the DiT learn to flow from noise to the frozen encoder's tokens.

    text -> backbone (frozen) with the queries -> cond (B, 64, H)
    image -> clip_encoder (frozen) -> x_0 (B, 64, C);  x_t = (1 - t) x_0 + t x_1
    loss = dit.loss(path, cond * keep, self_condition)

The objective is `blip3o.train.objective.target_loss`; the stage draws each item's randomness from its own
streams and trains with the model's `train_layout` and `train_timesteps`. An item's x_0 comes from its image
through the encoder's own preprocessing (`encode_images`: any size and mode), or, for an item of a CLIP-target
cache (`blip3o.data.targets`), from its cached `targets`: the stage then checks the cache was made by this
model's encoder and moves the encoder and the decoder off the training device, which never runs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blip3o.data.targets import cached_items, check_items_encoder, encoder_identity, release_towers
from blip3o.train.objective import GenerationDraws, draw_generation, target_loss
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

    def __init__(self, model, options: dict | None = None) -> None:
        model.config.require_trained_clip_encoder("train the generation stage")
        super().__init__(model, options)
        self.encoder: dict | None = None  # the encoder's identity, once a batch of cached targets arrives

    def trainable(self, model):
        """The queries and the DiT, but not an editing DiT's source readers, which text-to-image items never reach
        (so they take no optimiser state, and a sharded checkpoint holds what every parameter trained)."""
        named = super().trainable(model)
        for part in model.dit.source_readers():
            part.requires_grad_(False)
        return [(n, p) for n, p in named if p.requires_grad]

    def collate(self, items, indices, seed, device):
        o = self.options
        draws = draw_generation(len(items), self.model.config.dit, self.model.config.train_timesteps,
                                condition_drop=o.condition_drop, self_condition_rate=o.self_condition_rate,
                                generator=lambda k, name: item_generator(seed, indices[k], name))
        return {
            "prompts": [generation_text(item, seed, i, o.prompt_share) for item, i in zip(items, indices, strict=True)],
            **self.targets(items, device),
            "x_1": draws.x_1.to(device),  # (B, 64, C)
            "t": draws.t.to(device),  # (B,)
            "keep": draws.keep.to(device),  # (B,) False: condition dropped
            "self_condition": draws.self_condition.to(device),  # (B,) reads a first pass's estimate
        }

    def targets(self, items: list[dict], device: torch.device) -> dict:
        """{"x_0": (B, 64, C) in the model's dtype} from items of a CLIP-target cache (made by this model's encoder,
        else refused), or {"images": their PIL images}."""
        if not cached_items(items):
            return {"images": [item["image"] for item in items]}
        if self.encoder is None:  # the first cached batch: the towers are not needed from here on
            self.encoder = encoder_identity(self.model)
            release_towers(self.model)
        check_items_encoder(items, self.encoder)
        return {"x_0": torch.stack([item["targets"] for item in items]).to(device, self.model.queries.dtype)}

    def loss(self, batch):
        draws = GenerationDraws(batch["x_1"], batch["t"], batch["keep"], batch["self_condition"])
        x_0 = batch["x_0"] if "x_0" in batch else self.model.clip_encoder.encode_images(batch["images"])  # (B, 64, C)
        return target_loss(self.model, batch["prompts"], x_0, draws)
