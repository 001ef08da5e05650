"""The Emu2-Gen style decoder of the official BLIP3-o: an SDXL UNet that reads 64 CLIP tokens.

The UNet has SDXL's shape, but its cross-attention reads the tokens (B, 64, C) instead of text
and its pooled "text" embedding is their mean. Sampling is the original's pipeline (the Emu2-Gen
`EmuVisualGenerationPipeline` that BLIP3-o's `diffusion-decoder/` folder runs as `pipeline_llava_gen`),
step for step, by default:

    encoder_hidden_states = tokens                          (B, 64, C)
    text_embeds           = tokens.mean(1)                  (B, C)
    time_ids              = [1024, 1024, 0, 0, H, W]        original size, crop top-left, target size
    noise schedule        = EulerDiscreteScheduler, SDXL's training betas, epsilon prediction
    guidance              = eps_u + g (eps_c - eps_u) when g > 1; at or below 1 the conditional branch alone
    negative (eps_u)      = the tokens generated for the prompt " " (`Blip3o.negative_tokens`); for an image
                            alone the CLIP encoder's tokens of an all-zero normalised image
                            (`Blip3o.image_negative_tokens`, used by `reconstruct`)
    pixels                = VAE(latents * (1 / scaling_factor)), then (x / 2 + 0.5).clamp(0, 1) in the
                            VAE's dtype, then float32

The original passes `original_size` 1024 x 1024 and crop (0, 0) whatever the output size, so only the
target size follows the image (at 64 or 128 px conditioning on the output size instead changes every
step: final latents by 1-2 %, the image by up to 5 levels of 255). Computing the last formula in the
VAE's dtype keeps the original's bfloat16 rounding (converting to float first moves a third of the
uint8 values by a level); multiplying by 1 / scaling_factor rather than dividing keeps its last bit.
Any height and width that are multiples of `size_multiple` (32 for SDXL), up to `max_pixels`, are
made. Pixels reach the UNet through SDXL's VAE; latents are scaled by its `scaling_factor` (0.13025).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import diffusers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from blip3o.decoder.base import Decoder, drop_mask
from blip3o.flow import Generators, draw_noise, per_row

# BAAI/Emu2-Gen scheduler/scheduler_config.json (the schedule BLIP3-o's decoder was trained with),
# keeping the keys an EulerDiscreteScheduler reads; it is SDXL's training schedule.
EMU2_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "use_karras_sigmas": False,
}

# The size conditioning the original pipeline passes whatever the output size: the UNet reads
# [*ORIGINAL_SIZE, *CROP_TOP_LEFT, height, width] as its time_ids.
ORIGINAL_SIZE = (1024, 1024)
CROP_TOP_LEFT = (0, 0)


@dataclass(frozen=True)
class SdxlUnetDecoderConfig:
    kind: str = "sdxl-unet"
    token_width: int = 1792  # C of the tokens (EVA-CLIP-E): cross-attention and text_embeds width
    block_out_channels: tuple[int, ...] = (320, 640, 1280)  # UNet channels per level; no attention at level 0
    layers_per_block: int = 2  # resnets per down level (up levels have one more, as in diffusers)
    transformer_layers_per_block: tuple[int, ...] = (1, 2, 10)  # transformer blocks per attention, per level
    attention_head_dim: tuple[int, ...] = (5, 10, 20)  # diffusers' name for the number of heads per level
    norm_num_groups: int = 32  # GroupNorm groups in the UNet
    addition_time_embed_dim: int = 256  # sinusoidal width of each of the 6 time_ids
    latent_channels: int = 4  # VAE latent channels = UNet in/out channels
    sample_size: int = 128  # latent side the UNet is trained at (default_size / VAE downscale)
    vae_block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # VAE channels; downscale 2**(len - 1)
    vae_layers_per_block: int = 2  # resnets per VAE level
    vae_norm_num_groups: int = 32  # GroupNorm groups in the VAE
    vae_scaling_factor: float = 0.13025  # SDXL latents are multiplied by this to have about unit variance
    # the noise schedule: a diffusers scheduler config (its _class_name picks the class)
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(EMU2_SCHEDULER))
    condition_drop: float = 0.1  # training: probability of zeroing a sample's tokens (for CFG)
    default_steps: int = 50  # sampling steps of the Emu2-Gen pipeline
    default_guidance: float = 3.0  # CFG scale BLIP3-o's inference and GenEval scripts use
    default_size: int = 1024  # output side in pixels (height and width when a call names neither)
    # largest height * width a call may ask for: 4x the 1024 x 1024 area the UNet was trained at
    max_pixels: int = 2048 * 2048

    def __post_init__(self) -> None:
        if self.kind != "sdxl-unet":
            raise ValueError(f"SdxlUnetDecoderConfig.kind must be 'sdxl-unet', got {self.kind!r}")
        levels = len(self.block_out_channels)
        for name in ("transformer_layers_per_block", "attention_head_dim"):
            if len(getattr(self, name)) != levels:
                raise ValueError(f"{name} needs one entry per UNet level ({levels}): {getattr(self, name)}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if "_class_name" not in self.scheduler:
            raise ValueError("scheduler must be a diffusers scheduler config with a '_class_name'")


def unet_kwargs(config: SdxlUnetDecoderConfig) -> dict[str, Any]:
    """UNet2DConditionModel arguments: SDXL's layout at the config's sizes, widths tied to the tokens."""
    attention_levels = len(config.block_out_channels) - 1
    return {
        "sample_size": config.sample_size,
        "in_channels": config.latent_channels,
        "out_channels": config.latent_channels,
        "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * attention_levels,
        "up_block_types": ("CrossAttnUpBlock2D",) * attention_levels + ("UpBlock2D",),
        "block_out_channels": config.block_out_channels,
        "layers_per_block": config.layers_per_block,
        "transformer_layers_per_block": config.transformer_layers_per_block,
        "attention_head_dim": config.attention_head_dim,
        "norm_num_groups": config.norm_num_groups,
        "use_linear_projection": True,
        "cross_attention_dim": config.token_width,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": config.addition_time_embed_dim,
        # text_embeds (C) and the 6 embedded time_ids are concatenated before the projection.
        "projection_class_embeddings_input_dim": config.token_width + 6 * config.addition_time_embed_dim,
    }


def vae_kwargs(config: SdxlUnetDecoderConfig) -> dict[str, Any]:
    """AutoencoderKL arguments: SDXL's VAE layout at the config's sizes."""
    levels = len(config.vae_block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": config.vae_block_out_channels,
        "layers_per_block": config.vae_layers_per_block,
        "latent_channels": config.latent_channels,
        "norm_num_groups": config.vae_norm_num_groups,
        "sample_size": config.default_size,
        "scaling_factor": config.vae_scaling_factor,
    }


# schedulers whose `step` adds no noise (Euler's s_churn and DDIM's eta default to 0); the
# DPM-Solver family too unless its algorithm is an SDE one
DETERMINISTIC_SCHEDULERS = frozenset({"EulerDiscreteScheduler", "DDIMScheduler", "LMSDiscreteScheduler",
                                      "HeunDiscreteScheduler", "PNDMScheduler", "FlowMatchEulerDiscreteScheduler",
                                      "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                                      "UniPCMultistepScheduler", "DEISMultistepScheduler"})


# One UNet call of sampling: latents x (N, 4, h, w) scaled for the scheduler, timestep t, cond (N, 64, C) -> the
# UNet's output (N, 4, h, w); N = B, or 2B with both CFG branches in one batch. The output size, which the
# UNet is conditioned on, is the latents' size times the VAE's downscale.
UNetCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# The UNet call at step i of the loop, its conditioning bound: (x (N, 4, h, w), timestep t, i) -> (N, 4, h, w).
UNetStep = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class SamplingLoop(Protocol):
    """How `decode` runs its loop: `SdxlUnetDecoder.denoise`, or a faster runner of that same loop."""

    def __call__(self, latents: torch.Tensor, cond: torch.Tensor, scheduler: SchedulerMixin, guidance: float,
                 **step_kwargs: Any) -> torch.Tensor: ...


def make_scheduler(scheduler_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh diffusers scheduler from its config (its `_class_name` picks the class)."""
    name = scheduler_config["_class_name"]
    scheduler_class = getattr(diffusers, name, None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise ValueError(f"scheduler _class_name {name!r} is not a diffusers scheduler class")
    return scheduler_class.from_config(scheduler_config)


def scheduler_step_kwargs(scheduler: SchedulerMixin, generator: Generators, batch: int) -> dict[str, Any]:
    """`scheduler.step`'s generator argument (one generator per row) for the schedulers whose step takes one."""
    if "generator" not in inspect.signature(scheduler.step).parameters:
        return {}
    return {"generator": per_row(generator, batch)}


class SdxlUnetDecoder(Decoder):
    """SDXL UNet + VAE decoding 64 CLIP tokens, sampled with a diffusers scheduler and CFG.

    Attributes: `unet` (UNet2DConditionModel), `vae` (AutoencoderKL, frozen), `scheduler_config`, and how
    `decode` samples: `unet_call` (a `UNetCall`, by default `unet_output`) and `sampling_loop` (a
    `SamplingLoop`, by default `denoise`). Faster versions of both (CUDA graphs, `blip3o.accel.decoder`)
    compute the same thing; `loss` always calls the UNet eagerly, with autograd.
    """

    def __init__(
        self,
        config: SdxlUnetDecoderConfig,
        *,
        unet: UNet2DConditionModel | None = None,
        vae: AutoencoderKL | None = None,
    ) -> None:
        super().__init__(config)
        self.unet = unet if unet is not None else UNet2DConditionModel(**unet_kwargs(config))
        self.vae = vae if vae is not None else AutoencoderKL(**vae_kwargs(config))
        # The VAE is frozen: training the decoder trains the UNet only.
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.scheduler_config = dict(config.scheduler)
        self.channels_last = False  # set_channels_last
        # How `decode` calls the UNet and runs its loop; `blip3o.accel.accelerate` puts CUDA graphs here.
        self.unet_call: UNetCall = self.unet_output
        self.sampling_loop: SamplingLoop = self.denoise

    @property
    def step_noise(self) -> bool:
        """Whether the scheduler draws noise at its steps (ancestral, DDPM, SDE samplers)."""
        c = self.scheduler_config
        sde = str(c.get("algorithm_type", "")).startswith("sde")
        return c["_class_name"] not in DETERMINISTIC_SCHEDULERS or sde

    @classmethod
    def from_diffusers_folder(
        cls,
        path: str | Path,
        *,
        variant: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **defaults: Any,
    ) -> SdxlUnetDecoder:
        """Load `unet/`, `vae/` and `scheduler/` of a diffusers folder (e.g. BLIP3-o's `diffusion-decoder/`).

        Only diffusers' own classes are used, never the folder's custom pipeline file. `variant`
        picks weight files such as `diffusion_pytorch_model.bf16.safetensors` (the official
        folder has only those: pass variant="bf16"). `defaults` sets default_steps,
        default_guidance, default_size or max_pixels.
        """
        kwargs: dict[str, Any] = {"variant": variant}
        if torch_dtype is not None:
            kwargs["torch_dtype"] = torch_dtype
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
        # Any scheduler class reads scheduler_config.json; its _class_name says which one to build.
        scheduler_config = dict(diffusers.EulerDiscreteScheduler.load_config(path, subfolder="scheduler"))
        # Keep the schedule's own keys; drop diffusers' bookkeeping (version, which keys were defaulted).
        scheduler_config = {k: v for k, v in scheduler_config.items() if k == "_class_name" or k[0] != "_"}
        config = config_from_diffusers(unet.config, vae.config, scheduler_config, **defaults)
        return cls(config, unet=unet, vae=vae)

    @property
    def vae_downscale(self) -> int:
        return 2 ** (len(self.config.vae_block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """What height and width must be multiples of: the latent halves exactly at each UNet downsampling,
        so VAE downscale * 2**(UNet levels - 1), 8 * 4 = 32 for SDXL."""
        return self.vae_downscale * 2 ** (len(self.config.block_out_channels) - 1)

    def check_size(self, height: int, width: int) -> None:
        multiple = self.size_multiple
        for name, side in (("height", height), ("width", width)):
            if side < multiple or side % multiple != 0:
                raise ValueError(f"{name} {side} is not a positive multiple of {multiple}, which this decoder needs")
        if height * width > self.config.max_pixels:
            raise ValueError(f"{width}x{height} (width x height) is {height * width:,} pixels, more than this "
                             f"decoder's max_pixels {self.config.max_pixels:,}")

    def output_size(self, latents: torch.Tensor) -> tuple[int, int]:
        """(height, width) in pixels of the image that latents (N, 4, h, w) decode to."""
        return latents.shape[-2] * self.vae_downscale, latents.shape[-1] * self.vae_downscale

    def unet_conditioning(self, tokens: torch.Tensor, height: int, width: int) -> dict[str, Any]:
        """UNet conditioning for tokens (B, 64, C) at an output of height x width pixels, as the original
        pipeline builds it: time_ids [1024, 1024, 0, 0, height, width] whatever the output size."""
        batch = tokens.shape[0]
        time_ids = torch.tensor([*ORIGINAL_SIZE, *CROP_TOP_LEFT, height, width], dtype=torch.float32,
                                device=tokens.device)
        return {
            "encoder_hidden_states": tokens,
            "added_cond_kwargs": {
                "text_embeds": tokens.mean(dim=1),  # (B, C)
                "time_ids": time_ids.expand(batch, 6),  # (B, 6)
            },
        }

    def set_channels_last(self, enabled: bool = True) -> SdxlUnetDecoder:
        """Keep the UNet's conv weights and its input latents in NHWC (channels-last), the layout cuDNN's
        fastest bf16 convolutions use; results are the same up to floating-point summation order."""
        self.unet.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.channels_last = enabled
        return self

    def unet_layout(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (N, 4, h, w) in the memory format of the UNet's weights (channels-last after
        `set_channels_last`)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def unet_output(self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The eager UNet call: its output (noise for epsilon prediction) (N, 4, h, w) for latents x
        (N, 4, h, w) at scheduler timestep(s) t, conditioned on tokens (N, 64, C) and the output size."""
        conditioning = self.unet_conditioning(tokens, *self.output_size(x))
        return self.unet(self.unet_layout(x), t, **conditioning, return_dict=False)[0]

    def latents_to_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> pixels (B, 3, H, W) float32 in [0, 1], rounded as the original's
        `decode_latents`: times 1 / scaling_factor, the VAE, `from_vae_space` in the VAE's dtype, then float."""
        vae_dtype = next(self.vae.parameters()).dtype
        latents = latents.to(vae_dtype) * (1 / self.vae.config.scaling_factor)
        if getattr(self.vae.config, "shift_factor", None) is not None:
            latents = latents + self.vae.config.shift_factor
        return from_vae_space(self.vae.decode(latents, return_dict=False)[0]).float()

    def pixels_to_latents(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [0, 1] -> scaled latents (B, 4, H/8, W/8), a sample of the VAE posterior."""
        vae_dtype = next(self.vae.parameters()).dtype
        x = to_vae_space(pixels).to(vae_dtype)
        with torch.no_grad():
            posterior = self.vae.encode(x).latent_dist
        noise = draw_noise(posterior.mean.shape, generator, x.device, x.dtype)
        latents = posterior.mean + posterior.std * noise
        if getattr(self.vae.config, "shift_factor", None) is not None:
            latents = latents - self.vae.config.shift_factor
        return latents * self.vae.config.scaling_factor

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
        """tokens (B, 64, C) -> pixels (B, 3, height, width) float32 in [0, 1]; see `Decoder.decode`."""
        settings = self.sampling_settings(tokens, negative, steps, guidance, size, height, width)
        unet_dtype = next(self.unet.parameters()).dtype
        device = tokens.device
        tokens = tokens.to(unet_dtype)
        # Both CFG branches in one batch: [unconditional, conditional].
        negative = settings.negative
        cond = tokens if negative is None else torch.cat([negative.to(unet_dtype), tokens])
        scheduler = make_scheduler(self.scheduler_config)
        scheduler.set_timesteps(settings.steps, device=device)
        ds = self.vae_downscale
        shape = (tokens.shape[0], self.config.latent_channels, settings.height // ds, settings.width // ds)
        latents = draw_noise(shape, generator, device, unet_dtype) * scheduler.init_noise_sigma
        step_kwargs = scheduler_step_kwargs(scheduler, generator, tokens.shape[0])
        return self.latents_to_pixels(self.sampling_loop(latents, cond, scheduler, settings.guidance, **step_kwargs))

    def denoise(self, latents: torch.Tensor, cond: torch.Tensor, scheduler: SchedulerMixin, guidance: float,
                unet_step: UNetStep | None = None, **step_kwargs: Any) -> torch.Tensor:
        """The sampling loop: latents (B, 4, h, w) at the scheduler's first timestep -> its last latents.

        cond is the tokens (B, 64, C), or [negative; tokens] (2B, 64, C) for CFG at `guidance` (both branches
        in one batch). Step i calls `unet_step(x, t, i)`, by default `self.unet_call(x, t, cond)` (the
        whole-loop graph of `blip3o.accel` passes the UNet on conditioning it holds in static buffers);
        `step_kwargs` go to `scheduler.step`.
        """
        unet_step = unet_step or (lambda x, t, i: self.unet_call(x, t, cond))
        guided = cond.shape[0] != latents.shape[0]
        for i, t in enumerate(scheduler.timesteps):
            x = scheduler.scale_model_input(torch.cat([latents, latents]) if guided else latents, t)
            eps = unet_step(x, t, i)
            if guided:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents, return_dict=False, **step_kwargs)[0]
        return latents

    def loss(
        self, tokens: torch.Tensor, pixels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """DDPM loss: MSE between the UNet output and its target (noise, or v) at a random training timestep.

        x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps with a_t the scheduler's alphas_cumprod; tokens are
        zeroed with probability `condition_drop` so the UNet also learns the unconditional branch.
        """
        self.check_tokens(tokens)
        self.check_pixels(pixels, tokens.shape[0])
        unet_dtype = next(self.unet.parameters()).dtype
        scheduler = make_scheduler(self.scheduler_config)
        batch, device = tokens.shape[0], tokens.device
        x_0 = self.pixels_to_latents(pixels, generator).to(unet_dtype)  # (B, 4, h, w)
        where = generator.device if generator is not None else torch.device("cpu")
        t = torch.randint(scheduler.config.num_train_timesteps, (batch,), generator=generator, device=where)
        a = scheduler.alphas_cumprod[t.cpu()].to(device=device, dtype=torch.float32).view(-1, 1, 1, 1)
        eps = draw_noise(x_0.shape, generator, device, torch.float32)
        x_t = a.sqrt() * x_0.float() + (1 - a).sqrt() * eps
        keep = drop_mask(batch, self.config.condition_drop, generator, device)  # (B, 1, 1)
        cond = tokens.to(unet_dtype) * keep.to(unet_dtype)
        pred = self.unet_output(x_t.to(unet_dtype), t.to(device), cond)
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            target = eps
        elif kind == "v_prediction":
            target = a.sqrt() * eps - (1 - a).sqrt() * x_0.float()
        else:
            raise ValueError(f"loss supports epsilon or v_prediction schedules, not {kind!r}")
        return F.mse_loss(pred.float(), target)


def to_vae_space(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> the VAE's [-1, 1]."""
    return pixels * 2 - 1


def from_vae_space(x: torch.Tensor) -> torch.Tensor:
    """The VAE's output in [-1, 1] -> pixels in [0, 1], clamped, in x's dtype: the original's formula, whose
    rounding in half precision this keeps."""
    return (x / 2 + 0.5).clamp(0, 1)


def config_from_diffusers(
    unet_config: Any, vae_config: Any, scheduler_config: dict[str, Any], **defaults: Any
) -> SdxlUnetDecoderConfig:
    """Our config for loaded diffusers components; raises if they are not the layout we build."""
    levels = len(unet_config.block_out_channels)

    def per_level(value: Any) -> tuple[int, ...]:
        return tuple(value) if isinstance(value, list | tuple) else (value,) * levels

    config = SdxlUnetDecoderConfig(
        token_width=unet_config.cross_attention_dim,
        block_out_channels=tuple(unet_config.block_out_channels),
        layers_per_block=unet_config.layers_per_block,
        transformer_layers_per_block=per_level(unet_config.transformer_layers_per_block),
        attention_head_dim=per_level(unet_config.attention_head_dim),
        norm_num_groups=unet_config.norm_num_groups,
        addition_time_embed_dim=unet_config.addition_time_embed_dim,
        latent_channels=unet_config.in_channels,
        sample_size=unet_config.sample_size,
        vae_block_out_channels=tuple(vae_config.block_out_channels),
        vae_layers_per_block=vae_config.layers_per_block,
        vae_norm_num_groups=vae_config.norm_num_groups,
        vae_scaling_factor=vae_config.scaling_factor,
        scheduler=scheduler_config,
        **defaults,
    )
    # A config that rebuilds a different network would make saved configs lie: refuse it.
    for name, value in unet_kwargs(config).items():
        found = unet_config.get(name) if hasattr(unet_config, "get") else getattr(unet_config, name)
        if name in ("transformer_layers_per_block", "attention_head_dim"):
            found = per_level(found)
        if _normalise(found) != _normalise(value):
            raise ValueError(f"unet config has {name}={found!r}; this decoder builds {name}={value!r}")
    if vae_config.latent_channels != unet_config.in_channels:
        raise ValueError(
            f"vae latent_channels {vae_config.latent_channels} != unet in_channels {unet_config.in_channels}"
        )
    return config


def _normalise(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_normalise(v) for v in value)
    return value
