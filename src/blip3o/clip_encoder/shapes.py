"""A small ViT for the Shapes world: 64x64 pixels -> 8x8 = 64 tokens, one per 8x8 patch.

    pixels (B, 3, 64, 64) -> 8x8 patches + pos_embed (B, 64, C) -> pre-norm blocks -> LN
                                              (attention global, or within `window` cells)
      [-> Linear -> LN (B, 64, token_dim)]       (`token_dim` > 0: narrower tokens)
      -> tokens (B, 64, C)                     (what BLIP3-o's DiT learns to produce)
      -> mean over tokens -> Linear -> (B, D)  (`embed`: the image side of a SigLIP-style
                                                sigmoid contrastive loss that trains it)

No pooling and no cls token: the patch grid already is 8x8.

`window` = k > 0 lets each token attend only to the tokens within k rows and k columns of it, so a
token describes its own neighbourhood (receptive field (2 k depth + 1) patches a side, clipped to the
grid) instead of carrying a summary of the whole scene: with global attention a token whose whole
neighbourhood is empty background still varies across images almost as much as an object's token
(rms 0.77 against 0.92; window=1 cuts it to 0.28), and the DiT has to draw that scene summary
consistently into all 64 tokens. Yet a DiT trained on window=1 tokens generates worse (Shapes GenEval
0.100 against 0.147 on global tokens, 1500 steps, guidance 3), so nano keeps 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .eva import GRID_SIDE, Attention, ClipEncoderBase, LayerNorm, Mlp, PatchEmbed

# Shapes images are flat colours on a (240, 240, 240) background: map [0, 1] to [-1, 1].
SHAPES_MEAN = (0.5, 0.5, 0.5)
SHAPES_STD = (0.5, 0.5, 0.5)


@dataclass
class ShapesEncoderConfig:
    kind: str = "shapes"  # dispatch key for clip_encoder_config_from_dict
    image_size: int = 64  # Shapes images are 64x64
    patch_size: int = 8  # 64 / 8 = 8x8 patches = the 64 tokens, no pooling
    width: int = 128  # token width C
    depth: int = 4  # number of pre-norm blocks
    num_heads: int = 4  # head width 32
    mlp_dim: int = 512  # 4 x width
    embed_dim: int = 128  # width of the pooled contrastive embedding from `embed`
    norm_eps: float = 1e-6
    window: int = 0  # 0: global attention; k > 0: attend within k rows and k columns (local tokens)
    token_dim: int = 0  # 0: tokens are `width` wide; d > 0: a linear map + LayerNorm narrows them to d

    @property
    def token_width(self) -> int:
        """Width of the tokens the encoder hands out (what the DiT and the decoder see)."""
        return self.token_dim or self.width

    def __post_init__(self) -> None:
        if self.image_size != GRID_SIDE * self.patch_size:
            raise ValueError(f"image_size must be {GRID_SIDE} x patch_size to give 64 tokens")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be an integer >= 0 (0 = global attention), got {self.window!r}")
        if not isinstance(self.token_dim, int) or self.token_dim < 0:
            raise ValueError(f"token_dim must be an integer >= 0 (0 = width), got {self.token_dim!r}")


class PreNormBlock(nn.Module):
    """x = x + attn(LN(x)); x = x + mlp(LN(x)): the usual ViT block, stable to train from scratch."""

    def __init__(self, c: ShapesEncoderConfig):
        super().__init__()
        self.norm1 = LayerNorm(c.width, eps=c.norm_eps)
        self.attn = Attention(c.width, c.num_heads)
        self.norm2 = LayerNorm(c.width, eps=c.norm_eps)
        self.mlp = Mlp(c.width, c.mlp_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def window_mask(side: int, window: int) -> torch.Tensor | None:
    """(side^2, side^2) bool: True where token i may attend token j (row-major grid), None if global."""
    if window <= 0:
        return None
    r, c = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    return ((r[:, None] - r[None, :]).abs() <= window) & ((c[:, None] - c[None, :]).abs() <= window)


class ShapesEncoder(ClipEncoderBase):
    """Small ViT, trained (later) with a sigmoid image/caption loss on Shapes images."""

    MEAN = SHAPES_MEAN
    STD = SHAPES_STD

    def __init__(self, config: ShapesEncoderConfig):
        super().__init__()
        self.config = config
        self.width = config.token_width
        self.image_size = config.image_size
        self.patch_embed = PatchEmbed(config.patch_size, config.width)
        self.pos_embed = nn.Parameter(torch.empty(1, GRID_SIDE * GRID_SIDE, config.width))
        self.blocks = nn.ModuleList([PreNormBlock(config) for _ in range(config.depth)])
        self.norm = LayerNorm(config.width, eps=config.norm_eps)
        self.narrow = None
        if config.token_dim:  # width -> token_dim, then a norm of its own
            self.narrow = nn.Sequential(nn.Linear(config.width, config.token_dim),
                                        LayerNorm(config.token_dim, eps=config.norm_eps))
        self.head = nn.Linear(config.token_width, config.embed_dim)
        self.register_buffer("attn_mask", None, persistent=False)
        self.init_buffers()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def init_buffers(self) -> None:
        """The attention mask is derived, not stored: rebuild it after a meta build."""
        mask = window_mask(GRID_SIDE, self.config.window)
        self.attn_mask = None if mask is None else mask.to(self.pos_embed.device)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed  # (B, 64, C)
        for block in self.blocks:
            x = block(x, self.attn_mask)
        x = self.norm(x)  # (B, 64, C)
        return x if self.narrow is None else self.narrow(x)  # (B, 64, token_width)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (B, 3, H, W) -> pooled embedding (B, embed_dim), with gradients.

        Unnormalised: the contrastive loss L2-normalises it next to the text embedding.
        """
        return self.pool(self(pixels))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 64, C) -> pooled embedding (B, D): the mean token through the head."""
        return self.head(tokens.mean(dim=1))
