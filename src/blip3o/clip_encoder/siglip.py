"""SigLIP / SigLIP2 vision tower (transformers) pooled to an 8x8 grid of tokens.

    pixels (B, 3, S, S), mean/std 0.5 -> SiglipVisionModel -> last_hidden_state (B, g*g, C)
      -> (B, C, g, g) -> adaptive_avg_pool2d 8x8 -> (B, 64, C)

`last_hidden_state` is after the tower's post_layernorm. The attention-pooling head is not
built (`vision_use_head=False`): we never read the pooled vector, so its weights would be dead.
For so400m-patch14-384, g = 27 and the 8x8 adaptive windows overlap by a row/column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Siglip2VisionConfig, Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel

from .eva import GRID_SIDE, ClipEncoderBase

# SigLIP was trained on pixels mapped to [-1, 1] (its image processor: mean = std = 0.5).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
VARIANTS = ("siglip", "siglip2")


@dataclass
class SiglipEncoderConfig:
    kind: str = "siglip"  # dispatch key for clip_encoder_config_from_dict
    variant: str = "siglip"  # "siglip" (SiglipVisionModel) or "siglip2" (Siglip2VisionModel, fixed res)
    image_size: int = 384  # input side (so400m-patch14-384)
    patch_size: int = 14  # 384 // 14 = 27x27 patches (the last 6 px are dropped by the conv)
    width: int = 1152  # hidden_size
    depth: int = 27  # num_hidden_layers
    num_heads: int = 16  # num_attention_heads
    mlp_dim: int = 4304  # intermediate_size
    norm_eps: float = 1e-6  # layer_norm_eps

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.image_size // self.patch_size < GRID_SIDE:
            raise ValueError(f"image_size / patch_size must give at least {GRID_SIDE} patches a side")

    @property
    def grid(self) -> int:
        """Patches a side (the last image_size % patch_size pixels are dropped)."""
        return self.image_size // self.patch_size


def _hf_config(c: SiglipEncoderConfig):
    """The transformers config of the tower `c` describes, without the attention-pooling head."""
    common = dict(
        hidden_size=c.width,
        intermediate_size=c.mlp_dim,
        num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads,
        patch_size=c.patch_size,
        layer_norm_eps=c.norm_eps,
        vision_use_head=False,
    )
    if c.variant == "siglip":
        return SiglipVisionConfig(image_size=c.image_size, **common)
    return Siglip2VisionConfig(num_patches=c.grid**2, **common)


def _hf_model_class(variant: str):
    return SiglipVisionModel if variant == "siglip" else Siglip2VisionModel


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, (H/p)(W/p), p*p*3), row-major patches with channels last inside each

    patch: the layout Siglip2's image processor feeds its Linear patch embedding.
    """
    b, c, h, w = x.shape
    g_h, g_w = h // patch_size, w // patch_size
    x = x[..., : g_h * patch_size, : g_w * patch_size]
    x = x.reshape(b, c, g_h, patch_size, g_w, patch_size).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, 3)
    return x.reshape(b, g_h * g_w, patch_size * patch_size * c)


class SiglipEncoder(ClipEncoderBase):
    """Frozen SigLIP(2) tower: pixels -> (B, 64, width) by adaptive average pooling."""

    MEAN = SIGLIP_MEAN
    STD = SIGLIP_STD

    def __init__(self, config: SiglipEncoderConfig):
        super().__init__()
        self.config = config
        self.width = config.width
        self.image_size = config.image_size
        self.model = _hf_model_class(config.variant)(_hf_config(config))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        g = self.config.grid
        if self.config.variant == "siglip":
            hidden = self.model(pixel_values=x).last_hidden_state  # (B, g*g, C)
        else:
            patches = patchify(x, self.config.patch_size)  # (B, g*g, p*p*3)
            mask = torch.ones(patches.shape[:2], dtype=torch.long, device=x.device)  # no padding
            shapes = torch.tensor([[g, g]] * x.shape[0], device=x.device)  # (B, 2)
            out = self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
            hidden = out.last_hidden_state  # (B, g*g, C)
        grid = hidden.transpose(1, 2).reshape(x.shape[0], self.width, g, g)  # (B, C, g, g)
        pooled = F.adaptive_avg_pool2d(grid, GRID_SIDE)  # (B, C, 8, 8)
        return pooled.flatten(2).transpose(1, 2)  # (B, 64, C)

    def init_buffers(self) -> None:
        # SigLIP's `position_ids` is a non-persistent arange: absent from checkpoints, so a
        # meta-built model must rebuild it on the device its weights landed on.
        for module in self.model.modules():
            ids = module._buffers.get("position_ids")
            if ids is not None:
                device = module.position_embedding.weight.device
                module._buffers["position_ids"] = torch.arange(ids.shape[-1], device=device).expand(1, -1)
