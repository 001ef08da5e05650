"""The edit stage: the queries and the DiT learn to generate the edited image from the source and the instruction.

    source image(s) + instruction -> backbone (frozen) with the queries -> cond (B, 64, H)
    source image(s) -> clip_encoder (frozen) -> source tokens (B, K, 64, C)
    target image -> clip_encoder (frozen) -> x_0 (B, 64, C);  x_t = (1 - t) x_0 + t x_1
    loss = dit.loss(path, cond * keep, self_condition, source)

An item is an edit ({"sources": [PIL, ...], "instruction": str, "image": the target PIL, "json"}: Shapes edit
shards through `blip3o.train.data.EditShardDataset`, triplet shards and JSONL through `blip3o.data`) or a
generation item ({"image", "json"}/"text": what the generation stage reads), so that a mixture keeps the model
generating from text while it learns to edit; a generation row reads no source. A condition dropped (the
unconditional branch of guidance) keeps its source, as sampling's unconditional branch does: guidance then pulls
from the source towards the instruction.

With `train_queries` false the queries keep the values generation trained (text-to-image conditions stay exactly
as they were) and only the DiT trains: every frozen input of an item (its condition, source tokens and target
tokens) is then a function of the item alone, computed with the batch it first comes in and kept in memory for
its later epochs (a resumed run computes them again, in other batches: equal up to float rounding).

A model whose DiT reads no source yet (a text-to-image model) gains the readers of the `source` option
(`DiT.add_source_readers`; the aligned input starts at zero, so the model first generates as before).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from blip3o.flow import sample_path
from blip3o.train.objective import draw_generation, training_condition
from blip3o.train.options import StageOptions, choice, flag, share
from blip3o.train.stages.base import Stage
from blip3o.train.stages.texts import generation_text
from blip3o.train.streams import item_generator


def content_key(text: str, *images) -> bytes:
    """A digest of an item's text and images (their sizes, modes and pixels)."""
    digest = hashlib.blake2b(text.encode(), digest_size=20)
    for image in images:
        digest.update(f"|{image.size}{image.mode}|".encode())
        digest.update(image.tobytes())
    return digest.digest()


@dataclass(frozen=True)
class EditOptions(StageOptions):
    # how a text-to-image DiT reads the sources once it edits (DiTConfig.source); a DiT that edits already keeps
    # its own. "both" (aligned input and context): docs/editing.md gives the measurement
    source: str = choice("both", "input", "context")
    # the share of items trained with the instruction's condition zeroed (source kept): guidance's unconditional
    # branch
    condition_drop: float = share(0.1)
    # for a self-conditioned DiT: the share of items that read a first, gradient-free pass's clean estimate
    self_condition_rate: float = share(0.5)
    # generation items of a mixture: how often one drawn for a prompt is conditioned on it rather than its caption
    prompt_share: float | None = share(None)
    # false: the queries stay frozen and each item's frozen inputs are computed once (module docstring)
    train_queries: bool = flag(True)


class EditStage(Stage):
    """Backbone, encoder and decoder frozen; the queries and the DiT learn flow matching to the target's tokens,
    reading the instruction's condition and the source's tokens."""

    name, trains, Options = "edit", ("queries", "dit"), EditOptions
    options: EditOptions

    def __init__(self, model, options: dict | None = None) -> None:
        model.config.require_trained_clip_encoder("train the edit stage")
        super().__init__(model, options)
        if not model.config.dit.edits:
            model.dit.add_source_readers(self.options.source)
        if not self.options.train_queries:
            self.trains = ("dit",)
        # frozen inputs by item content (train_queries false): (condition (Q, H), source (K, N, C), x_0 (N, C))
        self.frozen_inputs: dict[bytes, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def collate(self, items, indices, seed, device):
        o = self.options
        draws = draw_generation(len(items), self.model.config.dit, self.model.config.train_timesteps,
                                condition_drop=o.condition_drop, self_condition_rate=o.self_condition_rate,
                                generator=lambda k, name: item_generator(seed, indices[k], name))
        texts = [item["instruction"] if "sources" in item else generation_text(item, seed, i, o.prompt_share)
                 for item, i in zip(items, indices, strict=True)]
        for k, item in enumerate(items):
            if "sources" in item and not item["instruction"].strip():
                raise ValueError(f"edit item {indices[k]} has an empty instruction")
        return {
            "texts": texts,
            "sources": [item.get("sources") for item in items],  # None: a generation row
            "images": [item["image"] for item in items],
            "x_1": draws.x_1.to(device),  # (B, 64, C)
            "t": draws.t.to(device),  # (B,)
            "keep": draws.keep.to(device),  # (B,) False: the instruction's condition dropped
            "self_condition": draws.self_condition.to(device),  # (B,)
        }

    def condition(self, texts: list[str], sources: list[list | None]) -> torch.Tensor:
        """(B, Q, H): edit rows through `edit_condition`, generation rows through the generation sequence."""
        model = self.model
        edits = [k for k, s in enumerate(sources) if s is not None]
        plain = [k for k, s in enumerate(sources) if s is None]
        parts = {}
        if edits:
            parts["edits"] = model.edit_condition([sources[k] for k in edits], [texts[k] for k in edits])
        if plain:
            parts["plain"] = training_condition(model, [texts[k] for k in plain])
        if not plain:
            return parts["edits"]
        if not edits:
            return parts["plain"]
        order = torch.tensor(edits + plain, device=parts["edits"].device).argsort()
        return torch.cat([parts["edits"], parts["plain"]])[order]

    def inputs(self, texts: list[str], sources: list[list | None], images: list) -> tuple[torch.Tensor, ...]:
        """The frozen parts' outputs for a batch: condition (B, Q, H), source tokens (B, K, N, C), x_0 (B, N, C)."""
        model = self.model
        x_0 = model.clip_encoder.encode_images(images).to(model.queries.dtype)  # (B, 64, C)
        source = model.source_tokens([row or [] for row in sources])  # (B, K, 64, C), zeros for a generation row
        return self.condition(texts, sources), source, x_0

    @torch.no_grad()
    def remembered_inputs(self, texts: list[str], sources: list[list | None], images: list) -> tuple[torch.Tensor, ...]:
        """`inputs` with frozen queries: the items whose content is new are computed together, then kept."""
        keys = [content_key(text, image, *(row or [])) for text, row, image in zip(texts, sources, images, strict=True)]
        new = [k for k, key in enumerate(keys) if key not in self.frozen_inputs]
        if new:
            fresh = self.inputs([texts[k] for k in new], [sources[k] for k in new], [images[k] for k in new])
            for j, k in enumerate(new):
                count = len(sources[k] or [None])  # a generation row keeps its one zero slot
                self.frozen_inputs[keys[k]] = (fresh[0][j].clone(), fresh[1][j, :count].clone(), fresh[2][j].clone())
        rows = [self.frozen_inputs[key] for key in keys]
        cond, source, x_0 = zip(*rows, strict=True)
        most = max(s.shape[0] for s in source)
        source = [torch.cat([s, s.new_zeros(most - s.shape[0], *s.shape[1:])]) for s in source]
        return torch.stack(cond), torch.stack(source), torch.stack(x_0)

    def loss(self, batch):
        model = self.model
        read = self.inputs if self.options.train_queries else self.remembered_inputs
        cond, source, x_0 = read(batch["texts"], batch["sources"], batch["images"])
        cond = cond * batch["keep"].view(-1, 1, 1).to(cond.dtype)
        path = sample_path(x_0, batch["x_1"].to(x_0.dtype), batch["t"])
        return model.dit.loss(path, cond, batch["self_condition"], source)
