"""The Shapes-world decoder: a small pixel-space flow-matching UNet conditioned on 64 CLIP tokens.

Shapes images are 64 x 64 flat colours, so there is no VAE: the network denoises pixels
directly, in model space x = 2 p - 1 (p in [0, 1]). Flow matching as in `blip3o.flow`, sampled
by the loop of `blip3o.sampling`: x_t = (1 - t) x_0 + t x_1, t = 1 is noise, the network predicts v = x_1 - x_0.

The tokens come from an 8 x 8 grid of patches (raster order), so they reach the network three
ways: as an 8 x 8 feature map added at the bottleneck (where each token belongs), through
cross-attention at the 16 x 16 and 8 x 8 levels (what is where, in detail), and their mean
added to the time embedding (what the whole image is).

    x_t (B, 3, 64, 64) -> conv -> [res] 64 -> [res] 32 -> [res, attn] 16 -> (+ token map) [res, attn] 8
                           -> mid [res, attn, res] -> up path mirrored, with skips -> conv -> v
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip3o.decoder.base import Decoder, drop_mask
from blip3o.flow import Generators, draw_noise, flow_matching_loss, sample_path, sample_t, time_grid
from blip3o.sampling import denoise

IMAGE_SIZE = 64  # the Shapes world's images are 64 x 64; the decoder makes no other size
TOKEN_GRID = 8  # the 64 tokens are an 8 x 8 grid of patches, raster order
# Model space: x = PIXEL_SCALE * p + PIXEL_SHIFT maps pixels p in [0, 1] to [-1, 1].
PIXEL_SCALE = 2.0
PIXEL_SHIFT = -1.0
TIME_SCALE = 1000.0  # t in [0, 1] is scaled inside the sinusoidal embedding only


@dataclass(frozen=True)
class ShapesDecoderConfig:
    kind: str = "shapes"
    token_width: int = 128  # C of the tokens (the shapes CLIP encoder's width)
    channels: tuple[int, ...] = (32, 64, 96, 128)  # UNet channels at 64, 32, 16, 8 px
    attention_levels: tuple[int, ...] = (2, 3)  # levels with self- and cross-attention (16 and 8 px)
    head_dim: int = 32  # attention head width
    embed_dim: int = 128  # width of the time (+ pooled tokens) embedding
    norm_groups: int = 8  # GroupNorm groups
    condition_drop: float = 0.1  # training: probability of zeroing a sample's tokens (for CFG)
    default_steps: int = 20  # Euler steps
    default_guidance: float = 3.0  # CFG scale (real tokens decode to 0.82 of GenEval-style checks at 3, 0.60 at 1.5)

    def __post_init__(self) -> None:
        if self.kind != "shapes":
            raise ValueError(f"ShapesDecoderConfig.kind must be 'shapes', got {self.kind!r}")
        if IMAGE_SIZE >> (len(self.channels) - 1) != TOKEN_GRID:
            raise ValueError(f"channels needs 4 levels (64, 32, 16, 8 px), got {len(self.channels)}")
        if len(self.channels) - 1 not in self.attention_levels:
            raise ValueError("the 8 px level must have attention: the token map is added there")
        for i, c in enumerate(self.channels):
            if c % self.norm_groups or (i in self.attention_levels and c % self.head_dim):
                raise ValueError(
                    f"channels[{i}] = {c} must divide by norm_groups (and by head_dim with attention)"
                )


def to_model_space(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> model space [-1, 1]."""
    return pixels * PIXEL_SCALE + PIXEL_SHIFT


def from_model_space(x: torch.Tensor) -> torch.Tensor:
    """Model space -> pixels, clamped to [0, 1]."""
    return ((x - PIXEL_SHIFT) / PIXEL_SCALE).clamp(0.0, 1.0)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of times t (B,) in [0, 1], computed in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = TIME_SCALE * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ResBlock(nn.Module):
    """Conv residual block; the embedding sets the scale and shift of its second norm (adaptive GroupNorm)."""

    def __init__(self, c_in: int, c_out: int, embed_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.ada = nn.Linear(embed_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(groups, c_out, affine=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.ada(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, c, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class AttentionBlock(nn.Module):
    """Self-attention over the feature map, then cross-attention from it to the tokens."""

    def __init__(self, c: int, token_width: int, head_dim: int, groups: int) -> None:
        super().__init__()
        self.heads = c // head_dim
        self.norm = nn.GroupNorm(groups, c)
        self.qkv = nn.Linear(c, 3 * c)
        self.out = nn.Linear(c, c)
        self.norm_cross = nn.LayerNorm(c)
        self.q = nn.Linear(c, c)
        self.kv = nn.Linear(token_width, 2 * c)
        self.out_cross = nn.Linear(c, c)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # (B, heads, N, head_dim)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = x.shape
        return x.transpose(1, 2).reshape(b, n, -1)  # (B, N, c)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.norm(x).flatten(2).transpose(1, 2)  # (B, h*w, c)
        q, k, v = (self.split_heads(u) for u in self.qkv(seq).chunk(3, dim=-1))
        attended = self.merge_heads(F.scaled_dot_product_attention(q, k, v))
        seq = x.flatten(2).transpose(1, 2) + self.out(attended)
        q = self.split_heads(self.q(self.norm_cross(seq)))
        k, v = (self.split_heads(u) for u in self.kv(tokens).chunk(2, dim=-1))  # (B, heads, 64, head_dim)
        seq = seq + self.out_cross(self.merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return seq.transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    """One resolution of the UNet: a residual block, with attention to the tokens at coarse levels."""

    def __init__(self, c_in: int, c_out: int, config: ShapesDecoderConfig, attention: bool) -> None:
        super().__init__()
        self.res = ResBlock(c_in, c_out, config.embed_dim, config.norm_groups)
        self.attn = None
        if attention:
            self.attn = AttentionBlock(c_out, config.token_width, config.head_dim, config.norm_groups)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x, tokens)


class ShapesDecoder(Decoder):
    """Pixel-space flow-matching UNet: v = self(x_t (B, 3, 64, 64), t (B,), tokens (B, 64, C))."""

    step_noise = False  # Euler from the starting noise: nothing else is drawn

    def __init__(self, config: ShapesDecoderConfig) -> None:
        super().__init__(config)
        ch, n = config.channels, len(config.channels)
        self.token_norm = nn.LayerNorm(config.token_width)
        self.token_map = nn.Linear(config.token_width, ch[-2])  # width of h entering the 8 px level
        self.time_mlp = nn.Sequential(
            nn.Linear(ch[0], config.embed_dim), nn.SiLU(), nn.Linear(config.embed_dim, config.embed_dim)
        )
        self.pooled = nn.Linear(config.token_width, config.embed_dim)
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], config, i in config.attention_levels) for i in range(n)
        )
        self.downsample = nn.ModuleList(nn.Conv2d(ch[i], ch[i], 3, stride=2, padding=1) for i in range(n - 1))
        self.mid = Level(ch[-1], ch[-1], config, attention=True)
        self.mid_res = ResBlock(ch[-1], ch[-1], config.embed_dim, config.norm_groups)
        # Up level i reads the level below (the mid block at the bottom) concatenated with its skip.
        self.up = nn.ModuleList(
            Level(ch[min(i + 1, n - 1)] + ch[i], ch[i], config, i in config.attention_levels)
            for i in range(n)
        )
        self.upsample = nn.ModuleList(nn.Conv2d(ch[i + 1], ch[i + 1], 3, padding=1) for i in range(n - 1))
        self.norm_out = nn.GroupNorm(config.norm_groups, ch[0])
        self.conv_out = nn.Conv2d(ch[0], 3, 3, padding=1)
        self.channels_last = False  # set_channels_last
        self.initialize_weights()

    def set_channels_last(self, enabled: bool = True) -> ShapesDecoder:
        """Keep the conv weights and activations in NHWC (channels-last), cuDNN's fast layout (`accelerate`
        turns it on, and the CLI on a CPU); the same results up to floating-point summation order. Saved weights
        are written contiguous either way. On a CPU, sampling gains (nano's generate: 1.1x the images a second
        on 2 threads) and training does not: a step at batch 32 on 2 threads takes 1.25 s in either layout
        with `blip3o.allocator.keep_freed_memory` (without it, 2.02 s against 1.48 s contiguous)."""
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.channels_last = enabled
        return self

    def initialize_weights(self) -> None:
        """Zero the last layer of every residual branch and the output: the network starts as identity + 0."""
        for module in self.modules():
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.conv2.weight)
                nn.init.zeros_(module.conv2.bias)
            elif isinstance(module, AttentionBlock):
                for layer in (module.out, module.out_cross):
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def default_size(self) -> int:
        return IMAGE_SIZE

    def check_size(self, height: int, width: int) -> None:
        # The token map is added where the UNet is 8 x 8: only a 64 x 64 input gets there.
        if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"the shapes decoder makes {IMAGE_SIZE}x{IMAGE_SIZE} images only (its 8 x 8 token "
                             f"map meets the UNet at 8 px), got {width}x{height} (width x height)")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Velocity v (B, 3, 64, 64) at x_t (B, 3, 64, 64), times t (B,) in [0, 1], tokens (B, 64, C)."""
        tokens = self.token_norm(tokens)
        emb = self.time_mlp(timestep_embedding(t, self.config.channels[0]).to(x_t.dtype))
        emb = emb + self.pooled(tokens.mean(dim=1))  # (B, embed_dim)
        grid = self.token_map(tokens).transpose(1, 2)  # (B, c, 64)
        grid = grid.reshape(grid.shape[0], -1, TOKEN_GRID, TOKEN_GRID)  # (B, c, 8, 8): token i at row i // 8
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x_t)
        skips = []
        for i, level in enumerate(self.down):
            if i == len(self.down) - 1:
                h = h + grid
            h = level(h, emb, tokens)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid_res(self.mid(h, emb, tokens), emb)
        for i in reversed(range(len(self.up))):
            h = self.up[i](torch.cat([h, skips[i]], dim=1), emb, tokens)
            if i > 0:
                h = self.upsample[i - 1](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))

    @torch.no_grad()
    def decode(
        self,
        tokens: torch.Tensor,
        *,
        negative: torch.Tensor | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        size: int | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: Generators = None,
    ) -> torch.Tensor:
        """tokens (B, 64, C) -> pixels (B, 3, 64, 64) float32 in [0, 1]: Euler from t = 1 to 0, with CFG.
        64 x 64 is the only size (`check_size`); see `Decoder.decode`."""
        negative, steps, guidance, _, _ = self.sampling_settings(tokens, negative, steps, guidance, size, height,
                                                                 width)
        dtype = next(self.parameters()).dtype
        tokens = tokens.to(dtype)
        # With CFG both branches run in one batch: [negative; tokens] (2B, 64, C).
        cond = tokens if negative is None else torch.cat([negative.to(dtype), tokens])

        def velocity(x: torch.Tensor, t: torch.Tensor, call: int, x_0_previous: torch.Tensor | None) -> torch.Tensor:
            return self(x, t, cond)  # not self-conditioned: the call index and previous estimate go unused

        x_1 = draw_noise((tokens.shape[0], 3, IMAGE_SIZE, IMAGE_SIZE), generator, tokens.device, dtype)
        x_0 = denoise(velocity, x_1, time_grid(steps), guidance=guidance)
        return from_model_space(x_0.float())

    def loss(
        self, tokens: torch.Tensor, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Flow-matching loss for pixels (B, 3, 64, 64) in [0, 1]; tokens dropped with p = condition_drop."""
        self.check_tokens(tokens)
        self.check_pixels(pixels, tokens.shape[0])
        batch, device = tokens.shape[0], tokens.device
        dtype = next(self.parameters()).dtype
        x_0 = to_model_space(pixels.to(dtype))
        x_1 = draw_noise(x_0.shape, generator, device, dtype)
        where = generator.device if generator is not None else None  # draw where the generator lives
        t = sample_t(batch, generator=generator, device=where).to(device)  # (B,)
        keep = drop_mask(batch, self.config.condition_drop, generator, device)  # (B, 1, 1)
        cond = tokens.to(dtype) * keep.to(dtype)
        path = sample_path(x_0, x_1, t)
        return flow_matching_loss(self(path.x_t, t, cond), path)
