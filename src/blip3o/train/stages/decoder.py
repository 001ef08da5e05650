"""The decoder stage: the decoder learns pixels from the frozen encoder's tokens (its own loss and noise).

    image -> clip_encoder (frozen) -> tokens (B, 64, C) + noise of std ~ U(0, token_noise)
          [a share `dit_tokens` of them: noised to t_0 and sampled back by the frozen DiT with the image's text]
          -> decoder.loss(tokens, pixels)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from blip3o.images import pil_to_tensor
from blip3o.sampling import run_dit_loop
from blip3o.train.options import StageOptions, count, nonnegative, share, time_range
from blip3o.train.stages.base import Stage
from blip3o.train.stages.texts import generation_text
from blip3o.train.streams import item_generator


@dataclass(frozen=True)
class DecoderOptions(StageOptions):
    # each item's tokens get Gaussian noise of a std drawn from U(0, token_noise) (noise-conditioning
    # augmentation, as in cascaded diffusion): the DiT's tokens are never exactly the encoder's, and a decoder
    # trained on exact tokens turns small errors (RMS 0.05) into broken shapes; nano: 0.3
    token_noise: float = nonnegative(0.0)
    # a share of the items is read through the frozen DiT instead (`DecoderStage.dit_redraw`): a fine-tune of a
    # decoder on the errors of a trained DiT, run after the generation stage
    dit_tokens: float = share(0.0)
    dit_from: tuple[float, float] = time_range((0.3, 0.7))  # the redraw's start time t_0, one a batch
    dit_steps: int = count(8, minimum=1)  # the redraw's Euler steps from t_0 to 0
    prompt_share: float | None = share(None)  # the redraw's texts, as the generation stage's option
    # (the redraw reads each item's generation text: stream "text")


class DecoderStage(Stage):
    """Everything but the decoder frozen. With `dit_tokens` the decoder learns to draw the real image from
    tokens with the DiT's kind of error (shapes between two codes, a wrong size), not only isotropic noise."""

    name, trains, Options = "decoder", ("decoder",), DecoderOptions
    options: DecoderOptions

    def collate(self, items, indices, seed, device):
        c, o = self.model.config.dit, self.options
        noise = []
        for i in indices:
            g = item_generator(seed, i, "token_noise")
            sigma = torch.rand((), generator=g) * o.token_noise
            noise.append(sigma * torch.randn(c.num_tokens, c.in_channels, generator=g))
        batch = {"pixels": pil_to_tensor([it["image"] for it in items]).to(device),  # (B, 3, H, W)
                 "token_noise": torch.stack(noise).to(device),  # (B, 64, C)
                 "generator": item_generator(seed, indices[0], "decoder_loss")}
        if o.dit_tokens > 0:
            batch.update(self.collate_redraw(items, indices, seed, device))
        return batch

    def collate_redraw(self, items: list[dict], indices: list[int], seed: int, device: torch.device) -> dict:
        c, o = self.model.config.dit, self.options
        use, x_1 = [], []
        for i in indices:
            g = item_generator(seed, i, "dit_tokens")
            use.append(bool(torch.rand((), generator=g) < o.dit_tokens))
            x_1.append(torch.randn(c.num_tokens, c.in_channels, generator=g))
        lo, hi = o.dit_from
        t_0 = lo + (hi - lo) * torch.rand((), generator=item_generator(seed, indices[0], "dit_from")).item()
        prompts = [generation_text(item, seed, i, o.prompt_share) for item, i in zip(items, indices, strict=True)]
        return {"dit": torch.tensor(use, device=device),  # (B,) bool: redrawn
                "dit_prompts": prompts, "dit_x_1": torch.stack(x_1).to(device), "dit_from": t_0}

    def loss(self, batch):
        tokens = self.model.clip_encoder.encode(batch["pixels"])  # (B, 64, C)
        noisy = tokens + batch["token_noise"].to(tokens.dtype)
        if "dit" in batch and batch["dit"].any():
            use = batch["dit"]
            prompts = [p for p, u in zip(batch["dit_prompts"], use.tolist(), strict=True) if u]
            redrawn = self.dit_redraw(tokens[use], prompts, batch["dit_x_1"][use], batch["dit_from"])
            noisy = noisy.clone()  # the frozen encoder's output: no graph to keep
            noisy[use] = redrawn.to(noisy.dtype)
        return self.model.decoder.loss(noisy, batch["pixels"], generator=batch["generator"])

    @torch.no_grad()
    def dit_redraw(self, tokens: torch.Tensor, prompts: list[str], x_1: torch.Tensor, t_0: float) -> torch.Tensor:
        """The frozen DiT's version of real tokens (SDEdit): tokens (b, 64, C) noised with x_1 (b, 64, C) to t_0,
        then sampled back to 0 with the texts, `dit_steps` Euler steps at the model's guidance -> (b, 64, C).
        What the decoder sees at generation time: tokens that say the scene, with the DiT's kind of error."""
        model, steps = self.model, self.options.dit_steps
        x_t = (1 - t_0) * tokens + t_0 * x_1.to(tokens.dtype)
        times = [t_0 * (1 - k / steps) for k in range(steps + 1)]
        return run_dit_loop(model.dit, model.condition(prompts), x_t, times, guidance=model.config.guidance,
                            method="euler", eta=1.0, fresh=None)
