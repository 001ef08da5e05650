"""The generation objective: what the queries and the DiT learn, as one function (`generation_loss`).

In the original's terms (BLIP3-o's training forward in `blip3o_qwen.py`, its prompt and collator in `train.py`),
for a caption and its image, with the backbone and the EVA-CLIP encoder frozen:

    cond   = backbone(training sequence)[query slots]                 (B, 64, H), gradients reach the queries
             closed_turn: "...<|im_start|>assistant\\n<|im_end|>\\n[IMG]" + 64 query slots, right padded
    cond   = 0 for an item whose condition is dropped (probability 0.1 each): guidance's unconditional branch
    x_0    = EVA-CLIP tokens of the image: no class token, 4x4 average pooled, not normalised  (B, 64, C)
    sigma  = scheduler.sigmas[floor(1000 u)], u ~ U[0, 1)   (scheduler_grid: 1000 steps, shift 1; blip3o.flow)
    x_t    = (1 - sigma) x_0 + sigma noise,  noise ~ N(0, I)
    loss   = mean((dit(x_t, time embedding of 1000 sigma unrounded, cond) - (noise - x_0))^2), in float32

and no language-model loss. Our names: noise is x_1 and sigma is t (blip3o.flow's convention). A model's config
says which sequence and which times it trains with (`Blip3oConfig.train_layout`, `train_timesteps`): the official
presets and folders the original's above, the Shapes presets the generation prompt and continuous t. A DiT that
predicts clean tokens (`prediction="sample"`) or reads its own estimate (`self_condition`) trains its own target
and first pass (`DiT.loss`).

The randomness (noise, times, condition drops) is an argument; `draw_generation` draws it when not given.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from blip3o.dit import DiTConfig
from blip3o.flow import sample_path, sample_t
from blip3o.model import Blip3o

# (item k of the batch, stream name) -> the generator that draws it (blip3o.train.streams keys them by item)
Streams = Callable[[int, str], torch.Generator]


@dataclass
class GenerationDraws:
    """The randomness of one evaluation of the objective, one row per item."""

    x_1: torch.Tensor  # (B, N, C) the noise
    t: torch.Tensor  # (B,) the path's time: sigma
    keep: torch.Tensor  # (B,) bool; False: the item's condition is replaced by zeros
    self_condition: torch.Tensor  # (B,) bool; a self-conditioned DiT reads its first pass's estimate

    def to(self, device: torch.device | str) -> GenerationDraws:
        return GenerationDraws(self.x_1.to(device), self.t.to(device), self.keep.to(device),
                               self.self_condition.to(device))


def draw_generation(count: int, dit: DiTConfig, timesteps: str, *, condition_drop: float = 0.1,
                    self_condition_rate: float = 0.5,
                    generator: torch.Generator | Streams | None = None) -> GenerationDraws:
    """Each item's noise, time (`blip3o.flow.sample_t` of kind `timesteps`), condition drop and
    self-conditioning draw, on the CPU. `generator`: one generator for everything (item after item, None:
    torch's global one) or `Streams`, a generator per (item, stream) from the streams "noise", "time",
    "condition_drop" and "self_condition"."""
    stream = generator if callable(generator) else (lambda k, name: generator)
    x_1, t, keep, self_condition = [], [], [], []
    for k in range(count):
        x_1.append(torch.randn(dit.num_tokens, dit.in_channels, generator=stream(k, "noise")))
        t.append(sample_t(1, timesteps, generator=stream(k, "time"))[0])
        keep.append(torch.rand((), generator=stream(k, "condition_drop")) >= condition_drop)
        self_condition.append(torch.rand((), generator=stream(k, "self_condition")) < self_condition_rate)
    return GenerationDraws(torch.stack(x_1), torch.stack(t), torch.stack(keep), torch.stack(self_condition))


def training_condition(model: Blip3o, prompts: Sequence[str]) -> torch.Tensor:
    """The condition (B, Q, H) the objective reads: at the query slots of the model's `train_layout`."""
    if model.config.train_layout == "closed_turn":
        return model.backbone.training_condition(list(prompts), model.queries)
    return model.condition(prompts)


def generation_loss(model: Blip3o, prompts: Sequence[str], pixels: torch.Tensor,
                    draws: GenerationDraws | None = None, *,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """The generation objective (module docstring) for B captions and their images, pixels (B, 3, H, W) in
    [0, 1] -> a float32 scalar. `draws`: the items' noise, times and drops; None draws them from `generator`
    (`draw_generation` with the model's `train_timesteps` and the original's drop rate 0.1)."""
    return target_loss(model, prompts, model.clip_encoder.encode(pixels), draws, generator=generator)


def target_loss(model: Blip3o, prompts: Sequence[str], x_0: torch.Tensor, draws: GenerationDraws | None = None, *,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The generation objective for B captions and their images' encoder tokens x_0 (B, N, C): computed now
    (`generation_loss`) or read from a CLIP-target cache (`blip3o.data.targets`) -> a float32 scalar."""
    if draws is None:
        draws = draw_generation(len(prompts), model.config.dit, model.config.train_timesteps, generator=generator)
    x_0 = x_0.to(model.queries.device)
    draws = draws.to(x_0.device)
    cond = training_condition(model, prompts)  # (B, N, H)
    cond = cond * draws.keep.view(-1, 1, 1).to(cond.dtype)
    path = sample_path(x_0, draws.x_1.to(x_0.dtype), draws.t)
    return model.dit.loss(path, cond, draws.self_condition)
