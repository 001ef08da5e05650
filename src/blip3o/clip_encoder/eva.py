"""EVA-CLIP-E/14-plus vision tower: the frozen encoder whose 64 tokens BLIP3-o generates.

Data flow (official BLIP3-o, `--gen_vision_tower eva-clip-E-14-plus --gen_pooling early_pool2d_4`):

    pixels (B, 3, 448, 448), OpenAI-CLIP mean/std
      -> 14x14 patches (B, 1024, 1792) -> [cls] + patches + pos_embed (B, 1025, 1792)
      -> 64 POST-norm blocks   x = x + LN(attn(x));  x = x + LN(mlp(x))
      -> drop cls (B, 1024, 1792) -> 32x32 grid -> avg_pool 4x4 -> 8x8 = (B, 64, 1792)

There is no final norm and no head: BLIP3-o reads the raw output of the last block.

Checkpoint mapping. The official BLIP3-o checkpoint stores this tower as
`OFFICIAL_PREFIX + suffix` (772 tensors, ~4.35B parameters). Our parameter names ARE those
suffixes, so loading one (`blip3o.checkpoints.official`) only strips the prefix:

    patch_embed.proj.weight (1792, 3, 14, 14)   patch_embed.proj.bias (1792,)
    cls_token (1, 1, 1792)                      pos_embed (1, 1025, 1792)
    blocks.{i}.norm1.{weight,bias} (1792,)      blocks.{i}.attn.qkv.weight (5376, 1792)
    blocks.{i}.attn.qkv.bias (5376,)            blocks.{i}.attn.proj.{weight (1792, 1792), bias}
    blocks.{i}.norm2.{weight,bias} (1792,)      blocks.{i}.mlp.fc1.{weight (15360, 1792), bias}
    blocks.{i}.mlp.fc2.{weight (1792, 15360), bias (1792,)}

(12 tensors per block x 64 + 4 = 772; one fused qkv Linear with a full bias, no q_bias/v_bias,
no rope, no layer scale, no rel-pos bias, no norm/fc_norm/head.)

This module also holds `ClipEncoderBase`, the contract every encoder of the package follows
(input checks, resize, normalise, freeze), so the other encoders import it from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from blip3o.images import check_images, pil_to_tensor, tensor_to_pil

OFFICIAL_PREFIX = "model.gen_vision_tower.vision_tower.model."
# EVA-CLIP was trained on OpenAI-CLIP-normalised pixels (eva_clip_processors.py, constants.py).
EVA_MEAN = (0.48145466, 0.4578275, 0.40821073)
EVA_STD = (0.26862954, 0.26130258, 0.27577711)
NUM_TOKENS = 64  # every encoder of the package hands the DiT an 8x8 grid of tokens
GRID_SIDE = 8


# ----------------------------------------------------------------------------------------------
# The contract shared by every encoder in blip3o.clip_encoder
# ----------------------------------------------------------------------------------------------


def check_pixels(pixels: torch.Tensor) -> None:
    """Raise a clear error unless `pixels` is a float (B, 3, H, W) tensor in [0, 1]."""
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(f"pixels must be a torch.Tensor, got {type(pixels).__name__}")
    if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[0] == 0:
        raise ValueError(
            f"pixels must have shape (B, 3, H, W) with B >= 1, got {tuple(pixels.shape)}; "
            "add a batch dim with .unsqueeze(0) or repeat grey channels with .expand(-1, 3, -1, -1)"
        )
    if not pixels.is_floating_point():
        raise TypeError(f"pixels must be float in [0, 1], got dtype {pixels.dtype}: use .float() / 255")
    if pixels.device.type != "meta":
        lo, hi = pixels.min().item(), pixels.max().item()
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"pixels must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                "the encoder normalises itself, so pass raw [0, 1] pixels (not [-1, 1], not 0..255)"
            )


def resize_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size), both sides squashed to `size` (the SigLIP processor's
    resize) with bicubic + antialias, clamped to [0, 1]."""
    if pixels.shape[-2:] == (size, size):
        return pixels
    x = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(0, 1)  # bicubic overshoots near edges; a uint8 image pipeline would clip there too


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) -> (pixels - mean) / std per channel, in the pixels' dtype (torchvision's `Normalize`)."""
    mean_ = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std_ = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean_) / std_


class ClipEncoderBase(nn.Module):
    """Frozen image -> (B, 64, width) tokens. Subclasses set the constants and `tokens`."""

    MEAN: ClassVar[tuple[float, float, float]]  # normalisation the encoder was trained with
    STD: ClassVar[tuple[float, float, float]]
    num_tokens: int = NUM_TOKENS
    width: int
    image_size: int

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, image_size, image_size) -> (B, 64, width); differentiable."""
        raise NotImplementedError

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (B, 3, H, W) -> normalised (B, 3, S, S) on the encoder's device/dtype."""
        check_pixels(pixels)
        ref = next(self.parameters())
        x = resize_pixels(pixels.to(ref.device, torch.float32), self.image_size)
        return normalise(x, self.MEAN, self.STD).to(ref.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (B, 3, H, W) -> tokens (B, 64, width), with gradients (for training)."""
        return self.tokens(self.prepare(pixels))

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (B, 3, H, W), any H, W -> tokens (B, 64, width), without gradients."""
        return self.tokens(self.prepare(pixels))

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images (any sizes, any convertible mode; transparency on white) -> tokens (B, 64, width)."""
        # One at a time: the images may differ in size, and each is resized like `encode` does.
        x = torch.cat([self.prepare(pil_to_tensor([im])) for im in check_images(images)])
        return self.tokens(x)

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers after a meta build + load_state_dict(assign=True)."""

    def freeze(self) -> ClipEncoderBase:
        """eval() + requires_grad_(False); the encoder is a fixed target for the DiT."""
        self.eval()
        self.requires_grad_(False)
        return self


def pool_patch_tokens(x: torch.Tensor, stride: int) -> torch.Tensor:
    """Average-pool a square row-major token grid: (B, g*g, C) -> (B, (g/stride)^2, C).

    Same op as BLIP3-o's `pool_img` (blip3o_arch.py): tokens -> (B, C, g, g) -> avg_pool2d.
    """
    b, n, c = x.shape
    g = int(round(n**0.5))
    if g * g != n or g % stride:
        raise ValueError(f"{n} tokens are not a square grid divisible by stride {stride}")
    grid = x.transpose(1, 2).reshape(b, c, g, g)  # (B, C, g, g), row-major like patch_embed
    pooled = F.avg_pool2d(grid, kernel_size=stride, stride=stride)  # (B, C, g/s, g/s)
    return pooled.flatten(2).transpose(1, 2)  # (B, (g/s)^2, C)


# ----------------------------------------------------------------------------------------------
# EVA-CLIP
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResizeCrop:
    """How an image of some size reaches the EVA tower: resized to width x height, then the
    size x size square whose top-left corner is (left, top) is kept."""

    width: int
    height: int
    left: int
    top: int


def resize_crop_plan(width: int, height: int, size: int) -> ResizeCrop:
    """The original's torchvision `Resize(size, BICUBIC)` + `CenterCrop(size)` for a width x height image.

    The short side becomes `size` and the long side `int(size * long / short)`, truncated as torchvision
    computes it; the crop starts at `int(round((side - size) / 2))`, Python's round (half to even).
    640x427 -> resized 671x448, crop at (112, 0).
    """
    short, long = min(width, height), max(width, height)
    resized = int(size * long / short)
    w, h = (size, resized) if width <= height else (resized, size)
    return ResizeCrop(w, h, left=int(round((w - size) / 2)), top=int(round((h - size) / 2)))


def eva_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """BLIP3-o's EVA-CLIP preprocessing (eva_clip_processors.py), pixel for pixel, without torchvision:
    PIL images (any sizes) -> normalised pixels (B, 3, size, size), float32.

    Each image is `convert("RGB")`-ed (alpha dropped, as the original does; EXIF orientation not applied),
    resized with PIL's bicubic on the 8-bit image and cropped as `resize_crop_plan` says, then scaled by
    1/255 and normalised with the OpenAI-CLIP mean and std (torchvision's ToTensor and Normalize).
    """
    out = []
    for image in images:
        rgb = image.convert("RGB")
        plan = resize_crop_plan(rgb.width, rgb.height, size)
        if rgb.size != (plan.width, plan.height):
            rgb = rgb.resize((plan.width, plan.height), Image.BICUBIC)
        rgb = rgb.crop((plan.left, plan.top, plan.left + size, plan.top + size))
        out.append(torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1))  # (3, size, size)
    x = torch.stack(out).float().div(255)  # (B, 3, size, size) in [0, 1]
    return normalise(x, EVA_MEAN, EVA_STD)


@dataclass
class EvaClipConfig:
    kind: str = "eva"  # dispatch key for clip_encoder_config_from_dict
    image_size: int = 448  # input side; eva-clip-E-14-plus.json "image_size"
    patch_size: int = 14  # 448 / 14 = 32x32 patches
    width: int = 1792  # token width C
    depth: int = 64  # number of blocks
    num_heads: int = 16  # width / head_width (112)
    mlp_dim: int = 15360  # int(1792 * mlp_ratio 8.571428571428571), as the official Block computes it
    qkv_bias: bool = True  # one fused qkv Linear with a bias (official `qkv_bias: true`)
    norm_eps: float = 1e-6  # official create_norm_layer_factory(eps=1e-6)
    pool: int = 4  # avg-pool stride on the patch grid ("early_pool2d_4"): 32x32 -> 8x8

    def __post_init__(self) -> None:
        grid = self.image_size // self.patch_size
        if self.image_size % self.patch_size or grid != GRID_SIDE * self.pool:
            raise ValueError(
                f"image_size {self.image_size} / patch_size {self.patch_size} must give a "
                f"{GRID_SIDE * self.pool}x{GRID_SIDE * self.pool} grid so pool {self.pool} yields 8x8 tokens"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so bf16 towers keep stable statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class PatchEmbed(nn.Module):
    """(B, 3, S, S) -> (B, (S/p)^2, C); a module so the official name `patch_embed.proj` holds."""

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, g*g, C) row-major


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, width: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C); mask (N, N) bool, True where a token may attend (None: everywhere)."""
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale head_dim**-0.5, as official
        return self.proj(x.transpose(1, 2).reshape(b, n, c))  # (B, N, C)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, nn.GELU's default


class EvaBlock(nn.Module):
    """POST-norm block (EVA-CLIP-E `postnorm: true`): the norm sits on the branch output."""

    def __init__(self, config: EvaClipConfig):
        super().__init__()
        c = config
        self.norm1 = LayerNorm(c.width, eps=c.norm_eps)
        self.attn = Attention(c.width, c.num_heads, c.qkv_bias)
        self.norm2 = LayerNorm(c.width, eps=c.norm_eps)
        self.mlp = Mlp(c.width, c.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.norm1(self.attn(x))
        return x + self.norm2(self.mlp(x))


class EvaClipEncoder(ClipEncoderBase):
    """EVA-CLIP vision tower + BLIP3-o's 4x4 average pooling: pixels -> (B, 64, width)."""

    MEAN = EVA_MEAN
    STD = EVA_STD

    def __init__(self, config: EvaClipConfig):
        super().__init__()
        self.config = config
        self.width = config.width
        self.image_size = config.image_size
        num_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = PatchEmbed(config.patch_size, config.width)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.empty(1, num_patches + 1, config.width))
        self.blocks = nn.ModuleList([EvaBlock(config) for _ in range(config.depth)])
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Random init (real weights come from the checkpoint); works on the meta device."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def prepare(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (B, 3, H, W) -> normalised (B, 3, S, S), as `eva_pixels` makes them.

        S x S pixels are only normalised (differentiable); any other size is read as the 8-bit image it
        stands for and goes through `eva_pixels`, the original's resize and crop (no gradient).
        """
        check_pixels(pixels)
        ref = next(self.parameters())
        s = self.image_size
        if pixels.shape[-2:] == (s, s):
            return normalise(pixels.to(ref.device, torch.float32), self.MEAN, self.STD).to(ref.dtype)
        if pixels.requires_grad:
            raise ValueError(f"pixels of size {tuple(pixels.shape[-2:])} are resized as 8-bit images, which has no "
                             f"gradient: pass {s}x{s} pixels to differentiate through the encoder")
        return self.preprocess(tensor_to_pil(pixels)).to(ref.device, ref.dtype)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images -> normalised (B, 3, S, S) float32 on the CPU: `eva_pixels` at this tower's size."""
        return eva_pixels(check_images(images), self.image_size)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images (any sizes, any convertible mode; alpha dropped as the original does) -> (B, 64, width)."""
        ref = next(self.parameters())
        return self.tokens(self.preprocess(images).to(ref.device, ref.dtype))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised (B, 3, S, S) -> last-block output (B, 1 + N, C), cls first (unpooled)."""
        x = self.patch_embed(x)  # (B, N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, C)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, C)
        for block in self.blocks:
            x = block(x)
        return x

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.features(x)[:, 1:]  # drop cls, as EVAEncoderWrapper does: (B, N, C)
        return pool_patch_tokens(patches, self.config.pool)  # (B, 64, C)

