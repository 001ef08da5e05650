"""DiT: the Lumina-Next cross-attention diffusion transformer that turns noise into CLIP tokens.

One forward pass, as the figure reads (B batch, N = 64 tokens on an 8x8 grid, L condition length):

    context = caption_projection(cond)                         # (B, L, H) -> (B, L, D)
              (+ source_projection(source tokens) + image index, appended: an editing DiT's `context` reader)
    c       = time_embed(1000 t) + caption_embed(mean(context)) # (B, T),  T = min(D, 1024)
    x       = patch_embedder(x_t)                              # (B, N, C) -> (B, N, D)
              (+ self_condition(x_0 estimate of the previous step) with `self_condition=True`)
              (+ source_embedder(first source's tokens): an editing DiT's aligned `input` reader)
    m, s    = Linear(silu(c)) per block, Linear(silu(c))       # adaLN modulations (before the loop when sampling)
    x       = block(x, m, context) for each of the layers      # RMSNorm-zero, self + gated cross attention
    v       = norm_out(x, s)                                   # AdaLN-continuous, final linear -> (B, N, C)
              (or x_0 = norm_out(x, s), v = (x_t - x_0) / t with `prediction="sample"`)

Time: every method takes t in [0, 1] (`blip3o.flow`'s convention); the x1000 of Lumina's timestep scale
lives in `timestep_features` alone.

Parameter names follow diffusers' `LuminaNextDiT2DModel` (plus BLIP3-o's `caption_projection`), so
official checkpoints and the parity test load without renaming. The module is written for one
device; dtype and sharding are applied from outside.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip3o.flow import PathSample, flow_matching_loss

MIN_T = 0.02  # sample prediction: v = (x_t - x_0) / t divides by at least this
SOURCE_MODES = ("none", "input", "context", "both")  # DiTConfig.source


@dataclass
class DiTConfig:
    in_channels: int = 1792  # width of a CLIP token (input and output of the DiT)
    grid_size: int = 8  # tokens are laid out row-major on a grid_size x grid_size grid (64 tokens)
    hidden_size: int = 1792  # D, transformer width
    num_layers: int = 24
    num_heads: int = 28
    num_kv_heads: int | None = None  # < num_heads for grouped-query attention; None = num_heads
    multiple_of: int = 256  # FFN width is rounded up to a multiple of this
    ffn_two_thirds: bool = True  # Lumina-Next (diffusers <= 0.32, official BLIP3-o): FFN = 2/3 * 4D -> 4864 for 1792
    norm_eps: float = 1e-5
    qk_norm: bool = True  # LayerNorm over all heads of q and k (Lumina's "layer_norm_across_heads")
    cond_size: int = 3584  # H, width of the backbone hidden states that condition the DiT
    rope_theta: float = 10000.0
    # official inference casts 1000*t to an integer; True reproduces that when sampling (training reads t as
    # drawn, as the original's training does: DiT.loss)
    quantize_timesteps: bool = False
    # initial value of the per-head cross-attention gates (tanh(gate) scales cross-attention). Lumina-Next
    # starts at 0, made for adding text to a pretrained model; from scratch an open gate lets the DiT use
    # its condition from the first steps (a shut gate and untrained cross-attention are a slow saddle).
    cross_gate_init: float = 0.0
    # What the network outputs: "velocity" (v = x_1 - x_0, official BLIP3-o) or "sample" (the clean tokens
    # x_0, read as v = (x_t - x_0) / t; tokens of a small world lie on a low-dimensional manifold, where
    # predicting the clean point is easier than predicting noise: Li & He 2025, "Back to Basics").
    prediction: str = "velocity"
    # Self-conditioning (Chen et al. 2023, "Analog Bits"): the network also reads its own clean estimate
    # from the previous sampling step (training: from a first, gradient-free pass on half of the batch),
    # which lets it refine near-discrete targets instead of re-deriving them. An extra zero-initialised
    # linear embedding; not in the official model (False).
    self_condition: bool = False
    # Editing (generation conditioned on source images as well as on the text): how the DiT reads the CLIP tokens
    # of the source image(s). "input": the first source's tokens, through a zero-initialised linear, added to the
    # patch embedding token by token (the grids align, so what stays in place is copied from where it is);
    # "context": every source's tokens, projected and tagged by their image's index, appended to the
    # cross-attention context (any number of sources, no alignment); "both"; "none": the DiT does not edit.
    # docs/editing.md gives the measurement that chose nano's.
    source: str = "none"
    max_sources: int = 4  # source images a "context" DiT tells apart

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim % 4 == 0, got head_dim {self.head_dim}")
        if self.prediction not in ("velocity", "sample"):
            raise ValueError(f"prediction must be 'velocity' or 'sample', got {self.prediction!r}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.kv_heads}")
        if self.source not in SOURCE_MODES:
            raise ValueError(f"source must be one of {', '.join(SOURCE_MODES)}, got {self.source!r}")

    @property
    def edits(self) -> bool:
        """Whether the DiT reads source images (`source` other than "none")."""
        return self.source != "none"

    @property
    def source_input(self) -> bool:
        return self.source in ("input", "both")

    @property
    def source_context(self) -> bool:
        return self.source in ("context", "both")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def time_dim(self) -> int:
        return min(self.hidden_size, 1024)

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def ffn_dim(self) -> int:
        inner = 4 * self.hidden_size
        if self.ffn_two_thirds:
            inner = int(2 * inner / 3)
        return self.multiple_of * math.ceil(inner / self.multiple_of)


DIT_PRESETS: dict[str, DiTConfig] = {
    # official BLIP3-o 8B / 4B: the condition is Qwen2.5-VL 7B (3584) / 3B (2048) hidden states
    "blip3o-8b": DiTConfig(),
    "blip3o-4b": DiTConfig(cond_size=2048),
    # small enough that the whole nano model ships in 25 MB (fp16); predicts clean tokens (see `prediction`);
    # 32-wide tokens: the nano encoder's object codes (presets.py)
    # self-conditioning: generation accuracy 0.270 against 0.213 at guidance 7 without it (docs/experiments.md)
    "nano": DiTConfig(in_channels=32, hidden_size=192, num_layers=4, num_heads=4, cond_size=256, multiple_of=64,
                      cross_gate_init=1.0, prediction="sample", self_condition=True),
    # reads sources both ways, so that the tiny model exercises every editing path
    "debug": DiTConfig(in_channels=32, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, cond_size=64,
                       multiple_of=32, source="both"),
}


# ---------------------------------------------------------------------------- positional and time


def rope_2d(grid_size: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Lumina's 2D RoPE as (cos, sin) of the rotation angles: (N, head_dim / 2, 2) fp32, N = grid_size**2.

    Rotation pair i turns with the row index if i is even and the column index if i is odd, at
    frequency theta ** (-2 (i // 2) / (head_dim / 2)). Real-valued (not complex) so that compilers
    and CUDA graphs handle it like any other tensor.
    """
    quarter = head_dim // 4
    freqs = 1.0 / theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float64) / (2 * quarter))  # (hd/4,)
    pos = torch.arange(grid_size, dtype=torch.float64)
    rows = torch.outer(pos, freqs)[:, None, :].expand(grid_size, grid_size, quarter)  # (G, G, hd/4)
    cols = torch.outer(pos, freqs)[None, :, :].expand(grid_size, grid_size, quarter)
    angles = torch.stack([rows, cols], dim=-1).reshape(grid_size * grid_size, 2 * quarter)  # (N, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs (x0, x1) of x (B, N, heads, hd) by the angles of table
    (N, hd/2, 2): (x0 cos - x1 sin, x0 sin + x1 cos), in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, N, heads, hd/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = table[:, None, :, 0], table[:, None, :, 1]  # (N, 1, hd/2)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).type_as(x)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features (B, dim) of 1000 t, cosines first (diffusers' flip_sin_to_cos=True)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = (1000.0 * t.float())[:, None] * freqs[None]  # the x1000 of the official 0..1000 scale lives here
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


# ---------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32: bf16 sums of squares over 1792 channels lose too much
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * self.weight.float()).to(x.dtype)


class Mlp2(nn.Module):
    """Linear -> activation -> Linear (names linear_1 / linear_2, as diffusers)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, act: nn.Module) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden)
        self.act = act
        self.linear_2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class TimeCaptionEmbed(nn.Module):
    """c = MLP(sinusoid(1000 t)) + Linear(LayerNorm(masked mean of the projected condition))."""

    def __init__(self, hidden_size: int, time_dim: int) -> None:
        super().__init__()
        self.timestep_embedder = Mlp2(256, time_dim, time_dim, nn.SiLU())
        self.caption_embedder = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, time_dim))

    def forward(self, t: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.time(t) + self.caption(context, mask)

    def time(self, t: torch.Tensor) -> torch.Tensor:
        """t (...,) in [0, 1] -> (..., T)."""
        return self.timestep_embedder(timestep_features(t.reshape(-1)).to(self.timestep_embedder.linear_1.weight.dtype)
                                      ).unflatten(0, t.shape)

    def caption(self, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Projected condition (B, L, D), mask (B, L) -> (B, T)."""
        if mask is None:
            pooled = context.float().mean(dim=1)  # (B, D)
        else:
            m = mask.float()[..., None]  # (B, L, 1)
            pooled = (context.float() * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return self.caption_embedder(pooled.to(context.dtype))


class Attention(nn.Module):
    """Projections of one Lumina attention (q/k/v without bias, LayerNorm over all heads of q and k)."""

    def __init__(self, cfg: DiTConfig, with_out: bool) -> None:
        super().__init__()
        d, kv = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
        self.to_q = nn.Linear(d, d, bias=False)
        self.to_k = nn.Linear(d, kv, bias=False)
        self.to_v = nn.Linear(d, kv, bias=False)
        self.norm_q = nn.LayerNorm(d, eps=1e-5) if cfg.qk_norm else nn.Identity()
        self.norm_k = nn.LayerNorm(kv, eps=1e-5) if cfg.qk_norm else nn.Identity()
        # Self and cross attention share one output projection (attn2.to_out.0); attn1 has none.
        self.to_out = nn.ModuleList([nn.Linear(d, d, bias=False)]) if with_out else None
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim

    def query(self, x: torch.Tensor, rope: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D) (or its projection q) -> rotated, normed queries (B, heads, N, hd)."""
        q = self.norm_q(self.to_q(x) if q is None else q).unflatten(-1, (self.heads, self.head_dim))
        return apply_rope(q, rope).transpose(1, 2)

    def key_value(self, x: torch.Tensor, rope: torch.Tensor | None,
                  kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, D) (or its projections) -> keys, values (B, kv_heads, L, hd); keys rotated only for
        self-attention."""
        k, v = (self.to_k(x), self.to_v(x)) if kv is None else kv
        k = self.norm_k(k).unflatten(-1, (self.kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.kv_heads, self.head_dim))
        if rope is not None:
            k = apply_rope(k, rope)
        return k.transpose(1, 2), v.transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA with grouped-query heads; q (B, h, N, hd), k/v (B, h_kv, L, hd), mask (B, L) -> (B, N, h, hd)."""
    attn_mask = None if mask is None else mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


def silu_fp32(x: torch.Tensor) -> torch.Tensor:
    """SiLU computed in float32 and rounded back once, as Lumina-Next's blocks compute it (in half precision a
    half-precision SiLU differs from the original's by a rounding on most activations)."""
    return F.silu(x.float()).to(x.dtype)


class FeedForward(nn.Module):
    """SwiGLU: linear_2(silu(linear_1 x) * linear_3 x), the SiLU in float32."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, hidden, bias=False)
        self.linear_2 = nn.Linear(hidden, dim, bias=False)
        self.linear_3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(silu_fp32(self.linear_1(x)) * self.linear_3(x))


class RMSNormZero(nn.Module):
    """Modulation m = Linear(silu(c)) = [scale_attn, gate_attn, scale_mlp, gate_mlp] (B, 4D), then
    (RMSNorm(x) * (1 + scale_attn), gate_attn, scale_mlp, gate_mlp)."""

    def __init__(self, dim: int, time_dim: int, eps: float) -> None:
        super().__init__()
        self.linear = nn.Linear(time_dim, 4 * dim)
        self.norm = RMSNorm(dim, eps)

    def modulation(self, c: torch.Tensor) -> torch.Tensor:
        """c (..., T) -> m (..., 4D)."""
        return self.linear(F.silu(c))

    def forward(self, x: torch.Tensor, m: torch.Tensor):
        scale_attn, gate_attn, scale_mlp, gate_mlp = m.chunk(4, dim=-1)  # (B, D) each
        return self.norm(x) * (1 + scale_attn[:, None]), gate_attn, scale_mlp, gate_mlp


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.gate = nn.Parameter(torch.zeros(cfg.num_heads))  # per-head tanh gate of cross-attention, 0 at init
        self.attn1 = Attention(cfg, with_out=False)
        self.attn2 = Attention(cfg, with_out=True)
        self.feed_forward = FeedForward(d, cfg.ffn_dim)
        self.norm1 = RMSNormZero(d, cfg.time_dim, cfg.norm_eps)
        self.ffn_norm1 = RMSNorm(d, cfg.norm_eps)
        self.norm2 = RMSNorm(d, cfg.norm_eps)
        self.ffn_norm2 = RMSNorm(d, cfg.norm_eps)
        self.norm1_context = RMSNorm(d, cfg.norm_eps)
        self._fused: tuple | None = None  # see DiT.fuse_projections

    def cross_key_value(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The condition's keys and values; they do not depend on x or t, so samplers compute them once."""
        return self.attn2.key_value(self.norm1_context(context), rope=None)

    @torch.compiler.disable  # a cache lookup keyed on ids and versions: traced, it recompiles per block
    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Concatenated [q1; k1; v1; q2] and [w1; w3] weights (inference only), rebuilt when a source
        weight changed (replaced or updated in place)."""
        if self._fused is None:
            return None
        sources = self._fusion_sources()
        key = tuple((id(w), w._version) for w in sources)
        if self._fused[0] != key:
            a1, a2, ff = self.attn1, self.attn2, self.feed_forward
            w_in = torch.cat([a1.to_q.weight, a1.to_k.weight, a1.to_v.weight, a2.to_q.weight])
            w_ffn = torch.cat([ff.linear_1.weight, ff.linear_3.weight])
            self._fused = (key, w_in, w_ffn)
        return self._fused[1], self._fused[2]

    def _fusion_sources(self) -> list[torch.Tensor]:
        a1, a2, ff = self.attn1, self.attn2, self.feed_forward
        return [a1.to_q.weight, a1.to_k.weight, a1.to_v.weight, a2.to_q.weight, ff.linear_1.weight,
                ff.linear_3.weight]

    def forward(self, x, m, rope, cross_kv, cross_mask):
        """m: norm1's modulation of this call (`RMSNormZero.modulation` of c)."""
        h, gate_attn, scale_mlp, gate_mlp = self.norm1(x, m)  # (B, N, D)
        fused = None if torch.is_grad_enabled() else self.fused_weights()
        if fused is None:
            k, v = self.attn1.key_value(h, rope)
            q_self, q_cross = self.attn1.query(h, rope), self.attn2.query(h, rope)
        else:  # one GEMM for the four input projections
            d, kv = self.attn1.to_q.out_features, self.attn1.to_k.out_features
            q1, k1, v1, q2 = F.linear(h, fused[0]).split([d, kv, kv, d], dim=-1)
            k, v = self.attn1.key_value(h, rope, (k1, v1))
            q_self, q_cross = self.attn1.query(h, rope, q1), self.attn2.query(h, rope, q2)
        self_out = attend(q_self, k, v, None)  # (B, N, heads, hd)
        cross_out = attend(q_cross, *cross_kv, cross_mask)  # RoPE on q only
        mixed = (self_out + cross_out * self.gate.tanh().view(1, 1, -1, 1)).flatten(-2)  # (B, N, D)
        x = x + gate_attn[:, None].tanh() * self.norm2(self.attn2.to_out[0](mixed))
        ffn_in = self.ffn_norm1(x) * (1 + scale_mlp[:, None])
        if fused is None:
            ffn_out = self.feed_forward(ffn_in)
        else:
            a, b = F.linear(ffn_in, fused[1]).chunk(2, dim=-1)
            ffn_out = self.feed_forward.linear_2(silu_fp32(a) * b)
        return x + gate_mlp[:, None].tanh() * self.ffn_norm2(ffn_out)


class NormOut(nn.Module):
    """AdaLN-continuous: LayerNorm(x) * (1 + Linear(silu(c))), then the final linear to token width."""

    def __init__(self, dim: int, time_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(time_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear_2 = nn.Linear(dim, out_dim)

    def scale(self, c: torch.Tensor) -> torch.Tensor:
        """c (..., T) -> (..., D)."""
        return self.linear_1(F.silu(c))

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """scale (B, D): `self.scale(c)`."""
        return self.linear_2(self.norm(x) * (1 + scale[:, None]))


# ---------------------------------------------------------------------------- the model


@dataclass
class Condition:
    """Everything of a condition that stays fixed over the sampling steps (computed once)."""

    context: torch.Tensor  # (B, L, D) projected text condition (what the caption embedding pools)
    mask: torch.Tensor | None  # (B, L) bool, None = all valid
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (B, kv_heads, L', hd) keys and values
    # an editing DiT's source: its first image's embedded tokens (B, N, D), added to the patch embedding
    source: torch.Tensor | None = None
    # (B, L') bool over the cross-attention keys when they hold more than the text (source tokens), else None
    cross_mask: torch.Tensor | None = None

    @property
    def attention_mask(self) -> torch.Tensor | None:
        """The mask of the cross-attention keys: `cross_mask` when the keys hold source tokens, else `mask`."""
        return self.mask if self.cross_mask is None else self.cross_mask

    def select(self, rows: torch.Tensor) -> Condition:
        """The condition of those batch rows (a batch-1 condition, broadcast to any batch, stays as is)."""
        if self.context.shape[0] == 1:
            return self

        def pick(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[rows]

        return Condition(self.context[rows], pick(self.mask), [(k[rows], v[rows]) for k, v in self.cross_kv],
                         pick(self.source), pick(self.cross_mask))


@dataclass
class Modulation:
    """The adaLN modulations of a sampling loop's calls, computed before the loop (`DiT.modulation`).

    They depend on the time and the condition only, both known before sampling starts, and their weights
    (a (T, 4D) linear per block: 15% of the 8B DiT's weights read at every step) serve only B rows: one GEMM
    over every call's rows reads those weights once per sample instead of once per step.
    """

    layers: list[torch.Tensor]  # per block (S, B, 4D): norm1's m at each of the S calls
    out: torch.Tensor  # (S, B, D): norm_out's scale

    def __len__(self) -> int:
        return self.out.shape[0]

    def at(self, i: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        return [m[i] for m in self.layers], self.out[i]


class DiT(nn.Module):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.caption_projection = Mlp2(config.cond_size, d, d, nn.GELU(approximate="tanh"))
        self.patch_embedder = nn.Module()
        self.patch_embedder.proj = nn.Linear(config.in_channels, d)
        # the previous clean estimate, embedded and added to the patch embedding (zero at init)
        self.self_condition = nn.Linear(config.in_channels, d) if config.self_condition else None
        # an editing DiT's readers of the source tokens (DiTConfig.source): aligned input (zero at init), and
        # context tokens with a learned embedding of their image's index
        self.source_embedder = nn.Linear(config.in_channels, d) if config.source_input else None
        if config.source_context:
            self.source_projection = nn.Linear(config.in_channels, d)
            self.source_index = nn.Parameter(torch.zeros(config.max_sources, d))
        else:
            self.source_projection, self.source_index = None, None
        self.time_caption_embed = TimeCaptionEmbed(d, config.time_dim)
        self.layers = nn.ModuleList([DiTBlock(config) for _ in range(config.num_layers)])
        self.norm_out = NormOut(d, config.time_dim, config.in_channels)
        # The RoPE table stays fp32 whatever the model's dtype, so it is a per-device cache, not a buffer
        # (Module.to(dtype) would cast a buffer; bf16 angles lose too much).
        self._rope: dict[torch.device, torch.Tensor] = {}
        self.initialize_weights()

    def add_source_readers(self, mode: str) -> DiT:
        """Make a text-to-image DiT an editing one (`DiTConfig.source` = mode), its new readers initialised as a
        fresh editing DiT's (the aligned input at zero: at first the DiT generates as before, source or not)."""
        if self.config.edits:
            raise ValueError(f"this DiT already reads source images (source {self.config.source!r})")
        if mode not in SOURCE_MODES[1:]:
            raise ValueError(f"source must be one of {', '.join(SOURCE_MODES[1:])}, got {mode!r}")
        weight = self.patch_embedder.proj.weight
        fresh = DiT(dataclasses.replace(self.config, source=mode, num_layers=0))
        for name in ("source_embedder", "source_projection", "source_index"):
            part = getattr(fresh, name)
            if isinstance(part, nn.Parameter):
                part = nn.Parameter(part.detach().to(weight.device, weight.dtype))
            elif part is not None:
                part = part.to(weight.device, weight.dtype)
            setattr(self, name, part)
        self.config.source = mode
        return self

    def source_readers(self) -> list[nn.Module | nn.Parameter]:
        """The parts that read an edit's source (none for a text-to-image DiT): what generation alone never uses."""
        return [part for part in (self.source_embedder, self.source_projection, self.source_index) if part is not None]

    def fuse_projections(self, enabled: bool = True) -> DiT:
        """Opt-in inference speed-up: run the four input projections of each block and the two SwiGLU
        input projections as one GEMM each, from concatenated copies of the weights (extra memory:
        about half the DiT). Only used without autograd; copies refresh when weights change."""
        for block in self.layers:
            block._fused = ((), None, None) if enabled else None
        return self

    def init_buffers(self) -> None:
        """Nothing to recompute: the RoPE table is built on first use on each device."""
        self._rope.clear()

    def rope(self, device: torch.device) -> torch.Tensor:
        """RoPE (cos, sin) table (N, head_dim / 2, 2) for `device`, computed once."""
        if device not in self._rope:
            table = rope_2d(self.config.grid_size, self.config.head_dim, self.config.rope_theta)
            self._rope[device] = table.to(device)
        return self._rope[device]

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT-style: xavier linears, zero biases; modulation and the output layer start at zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_caption_embed.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_caption_embed.timestep_embedder.linear_2.weight, std=0.02)
        for block in self.layers:
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
            block.gate.fill_(self.config.cross_gate_init)
        nn.init.zeros_(self.norm_out.linear_1.weight)
        nn.init.zeros_(self.norm_out.linear_2.weight)
        if self.self_condition is not None:
            nn.init.zeros_(self.self_condition.weight)
        if self.source_embedder is not None:
            nn.init.zeros_(self.source_embedder.weight)
        if self.source_index is not None:
            nn.init.normal_(self.source_index, std=0.02)

    def prepare_condition(self, cond: torch.Tensor, mask: torch.Tensor | None = None,
                          source: torch.Tensor | None = None) -> Condition:
        """cond (B, L, H) backbone hidden states, mask (B, L) -> the step-independent Condition.

        source (B, K, N, C): the CLIP tokens of K source images per row, for an editing DiT (`DiTConfig.source`);
        an all-zero image slot (a row with fewer sources, a generation row in a mixed batch) is read as absent.
        """
        if cond.ndim != 3 or cond.shape[-1] != self.config.cond_size:
            raise ValueError(f"cond must be (B, L, {self.config.cond_size}), got {tuple(cond.shape)}")
        if mask is not None:
            if mask.shape != cond.shape[:2]:
                raise ValueError(f"mask {tuple(mask.shape)} does not match cond {tuple(cond.shape[:2])}")
            mask = None if bool(mask.all()) else mask.bool()
        context = self.caption_projection(cond)  # (B, L, D)
        if source is None:
            return Condition(context, mask, [block.cross_key_value(context) for block in self.layers])
        self.check_source(source, cond.shape[0])
        present = source.flatten(2).ne(0).any(-1)  # (B, K) the image slots that hold a source
        embedded = self.source_embedder(source[:, 0]) * present[:, :1, None] if self.config.source_input else None
        if not self.config.source_context:
            return Condition(context, mask, [block.cross_key_value(context) for block in self.layers], embedded)
        k, n = source.shape[1:3]
        tagged = self.source_projection(source) + self.source_index[:k, None].to(context.dtype)  # (B, K, N, D)
        keys = torch.cat([context, tagged.flatten(1, 2)], dim=1)  # (B, L + K N, D)
        text_mask = torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device) if mask is None else mask
        cross_mask = torch.cat([text_mask, present.repeat_interleave(n, dim=1)], dim=1)
        return Condition(context, mask, [block.cross_key_value(keys) for block in self.layers], embedded, cross_mask)

    def check_source(self, source: torch.Tensor, batch: int) -> None:
        """A source batch (B, K, N, C) this DiT reads, or a ValueError saying what does not fit."""
        c = self.config
        if not c.edits:
            raise ValueError("this DiT does not read source images (its config's source is 'none')")
        if source.ndim != 4 or source.shape[0] != batch or tuple(source.shape[2:]) != (c.num_tokens, c.in_channels):
            raise ValueError(f"source must be (B={batch}, K, {c.num_tokens}, {c.in_channels}), "
                             f"got {tuple(source.shape)}")
        if c.source_context and not 1 <= source.shape[1] <= c.max_sources:
            raise ValueError(f"this DiT reads 1 to {c.max_sources} source images, got {source.shape[1]}")

    # `modulation` keeps the modulations of a whole sampling loop up to this size; beyond it (large batches,
    # whose per-step GEMMs are efficient anyway) each step computes its own
    modulation_budget_bytes: int = 256 * 2**20

    def modulation(self, times: list[float], cond: Condition) -> Modulation | None:
        """The modulations of calls at `times` (python floats, in call order) for a prepared condition of
        batch B, in one GEMM per block; None when they would exceed `modulation_budget_bytes`."""
        context, weight = cond.context, self.norm_out.linear_1.weight
        size = len(times) * context.shape[0] * self.config.hidden_size * (4 * len(self.layers) + 1)
        if not times or size * weight.element_size() > self.modulation_budget_bytes:
            return None
        # built from fills, not a host-to-device copy, so that a CUDA graph can capture it
        t = torch.cat([torch.full((1,), v, device=context.device, dtype=torch.float32) for v in times])  # (S,)
        embed = self.time_caption_embed
        c = embed.time(self.network_time(t))[:, None] + embed.caption(context, cond.mask)[None]  # (S, B, T)
        return Modulation(*self.modulations(c))

    def modulations(self, c: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """c (..., T) -> every block's norm1 modulation (..., 4D) and norm_out's scale (..., D)."""
        return [block.norm1.modulation(c) for block in self.layers], self.norm_out.scale(c)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the time embedding reads when sampling: t, or floor(1000 t) / 1000 with `quantize_timesteps`."""
        return torch.floor(t * 1000) / 1000 if self.config.quantize_timesteps else t

    def training_modulation(self, t: torch.Tensor, cond: Condition) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The modulations (`predict`'s `modulation`) at times t (B,) exactly as given: training's time."""
        return self.modulations(self.time_caption_embed(t, cond.context, cond.mask))

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition,
                 x_0_previous: torch.Tensor | None = None,
                 modulation: tuple[list[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """x_t (B, N, C), t (B,) in [0, 1], a prepared Condition -> v (B, N, C). x_0_previous: the clean
        estimate a self-conditioned DiT reads (None: zeros); modulation: this call's (`Modulation.at`)."""
        out = self.predict(x_t, t, cond, x_0_previous, modulation)
        if self.config.prediction == "velocity":
            return out
        return (x_t - out) / t.clamp_min(MIN_T).view(-1, 1, 1).to(out.dtype)

    def clean_estimate(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The network's raw output at (x_t, t) -> its estimate of the clean tokens x_0."""
        if self.config.prediction == "velocity":
            return x_t - t.view(-1, 1, 1).to(out.dtype) * out
        return out

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Condition, x_0_previous: torch.Tensor | None = None,
                modulation: tuple[list[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The network's raw output (B, N, C): v, or x_0 with `prediction="sample"`.
        x_0_previous (B, N, C): the clean estimate a self-conditioned DiT reads (None: zeros); ignored
        without self-conditioning. modulation: the blocks' and norm_out's modulations at t, computed
        beforehand (`Modulation.at`); None computes them here."""
        if modulation is None:
            modulation = self.modulations(self.time_caption_embed(self.network_time(t), cond.context, cond.mask))
        layer_mods, out_scale = modulation
        x = self.patch_embedder.proj(x_t)  # (B, N, D)
        if self.self_condition is not None:
            previous = torch.zeros_like(x_t) if x_0_previous is None else x_0_previous.to(x_t.dtype)
            x = x + self.self_condition(previous)
        if cond.source is not None:
            x = x + cond.source.to(x.dtype)
        rope = self.rope(x.device)
        for block, kv, m in zip(self.layers, cond.cross_kv, layer_mods, strict=True):
            x = block(x, m, rope, kv, cond.attention_mask)
        return self.norm_out(x, out_scale)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity v (B, N, C) for tokens x_t (B, N, C) at times t (B,) given cond (B, L, H)."""
        b, n, ch = x_t.shape
        if (n, ch) != (self.config.num_tokens, self.config.in_channels):
            raise ValueError(
                f"x_t must be (B, {self.config.num_tokens}, {self.config.in_channels}), got {tuple(x_t.shape)}"
            )
        if t.shape != (b,) or cond.shape[0] != b:
            raise ValueError(f"t {tuple(t.shape)} and cond batch {cond.shape[0]} must match x_t batch {b}")
        return self.velocity(x_t, t, self.prepare_condition(cond, cond_mask))

    def loss(self, path: PathSample, cond: torch.Tensor, self_condition: torch.Tensor | None = None,
             source: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss at a path sample, in fp32: the network's own output against its target (the
        velocity; x_0 with `prediction="sample"`). source (B, K, N, C): an editing DiT's source tokens.

        self_condition (B,) bool, for a self-conditioned DiT: the samples that read the clean estimate of a
        first, gradient-free pass (the others read zeros, as the first sampling step does). None: all zeros.

        The time embedding reads path.t, the time the noisy input used, never floored: `quantize_timesteps`
        reproduces the original's inference, while its training reads 1000 sigma unrounded.
        """
        prepared = self.prepare_condition(cond, source=source)
        previous = None
        if self.self_condition is not None and self_condition is not None and bool(self_condition.any()):
            previous = self.first_pass_estimate(path, prepared, self_condition)
        out = self.predict(path.x_t, path.t, prepared, previous, self.training_modulation(path.t, prepared))
        if self.config.prediction == "velocity":
            loss = flow_matching_loss(out, path)
        else:
            loss = torch.mean((out.float() - path.x_0.float()) ** 2)
        return loss

    @torch.no_grad()
    def first_pass_estimate(self, path: PathSample, prepared: Condition, rows: torch.Tensor) -> torch.Tensor:
        """Self-conditioning's gradient-free first pass, run only for the rows (B,) bool that read it (every row
        is independent); the other rows' estimate is zeros."""
        index = rows.nonzero()[:, 0]
        x_t, t, rows_condition = path.x_t[index], path.t[index], prepared.select(index)
        first = self.predict(x_t, t, rows_condition, modulation=self.training_modulation(t, rows_condition))
        previous = torch.zeros_like(path.x_t)
        previous[index] = self.clean_estimate(x_t, t, first).to(previous.dtype)
        return previous
