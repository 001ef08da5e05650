"""The clip stage: the CLIP encoder learns by SigLIP against a small text tower kept only for training.

    image -> clip_encoder -> tokens (B, 64, C) -> pool -> (B, E)  \\
                                                                    sigmoid loss on every pair of the global batch
    caption -> tokenizer -> TextTower ----------------> (B, E)  /
    (+ the auxiliaries' loss terms on the tokens: the Shapes object codes)

It trains an encoder with a contrastive embedding of its own (`pool`, `config.embed_dim`: the Shapes
encoder); the official presets' encoders come pretrained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip3o.images import pil_to_tensor
from blip3o.train.options import StageOptions
from blip3o.train.stages.base import Stage, gather
from blip3o.train.stages.texts import captions_of
from blip3o.train.streams import item_random

TEXT_WIDTH = 128  # the text tower's width: 2 layers of 128 read a Shapes caption (under 48 tokens)
TEXT_TOWER_SEED = 0  # its initial weights: the same on every process and on resume


class TextTower(nn.Module):
    """A small transformer over the backbone's tokenizer ids, mean-pooled: the contrastive partner."""

    def __init__(self, vocab: int, width: int, embed_dim: int, layers: int = 2, heads: int = 4, max_len: int = 48):
        super().__init__()
        self.max_len = max_len
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, L) -> embeddings (B, embed_dim)."""
        x = self.tokens(ids) + self.positions[: ids.shape[1]]  # (B, L, width)
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        m = mask.float()[..., None]  # (B, L, 1)
        return self.proj((x * m).sum(1) / m.sum(1).clamp_min(1))


@dataclass(frozen=True)
class ClipOptions(StageOptions):
    """The clip stage has no options of its own; the Shapes auxiliary adds `object_codes`."""


class ClipStage(Stage):
    """SigLIP: sigmoid loss on every image-caption pair of the global batch; each item's caption is one of
    its texts (stream "caption")."""

    name, trains, Options = "clip", ("clip_encoder",), ClipOptions

    def __init__(self, model, options=None):
        super().__init__(model, options)
        encoder = model.clip_encoder
        if not hasattr(encoder, "pool"):
            raise ValueError(f"the clip stage trains an encoder with a contrastive embedding of its own (the Shapes "
                             f"encoder); {type(encoder).__name__} has none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TEXT_TOWER_SEED)
            self.text = TextTower(len(model.backbone.tokenizer), TEXT_WIDTH, encoder.config.embed_dim)
        self.text.to(model.device)
        # SigLIP's initialisation: t = log 10, b = -10
        self.logit_scale = nn.Parameter(torch.tensor(2.302585, device=model.device))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0, device=model.device))

    def aux_parameters(self):
        own = [(f"text.{n}", p) for n, p in self.text.named_parameters()]
        return own + [("logit_scale", self.logit_scale), ("logit_bias", self.logit_bias)] + super().aux_parameters()

    def collate(self, items, indices, seed, device):
        captions = [item_random(seed, i, "caption").choice(captions_of(item))
                    for item, i in zip(items, indices, strict=True)]
        tok = self.model.backbone.tokenizer(captions, padding="max_length", truncation=True,
                                            max_length=self.text.max_len, padding_side="right", return_tensors="pt")
        batch = {"pixels": pil_to_tensor([it["image"] for it in items]).to(device),  # (b, 3, H, W)
                 "ids": tok.input_ids.to(device), "mask": tok.attention_mask.bool().to(device)}  # (b, L)
        return self.aux_collate(items, batch, device)

    def loss(self, batch):
        encoder = self.model.clip_encoder
        tokens = encoder(batch["pixels"])  # (b, 64, C)
        img = F.normalize(encoder.pool(tokens), dim=-1)  # (b, E)
        txt = F.normalize(self.text(batch["ids"], batch["mask"]), dim=-1)  # (b, E)
        img, txt = gather(img), gather(txt)  # (B, E): the whole global batch on every process
        logits = img @ txt.T * self.logit_scale.exp() + self.logit_bias  # (B, B)
        labels = 2 * torch.eye(len(img), device=img.device) - 1
        return -F.logsigmoid(labels * logits).sum() / len(img) + self.aux_loss(batch, tokens)
