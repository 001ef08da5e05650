"""Blip3o: the whole system, and the two data flows it serves.

    generate:   prompt -> backbone(prompt, [IMG], queries) -> condition (B, 64, H)
                       -> DiT flow sampling -> CLIP tokens (B, 64, C) -> decoder -> pixels
    edit:       source image(s) + instruction -> backbone(images, instruction, [IMG], queries) -> condition
                source image(s) -> clip_encoder -> source tokens (B, K, 64, C)
                       -> DiT flow sampling reading both -> CLIP tokens -> decoder -> pixels
    understand: image + question -> backbone -> answer

Parts are attributes named after the arrows: `backbone`, `queries`, `dit`, `clip_encoder`,
`decoder`. The CLIP encoder defines the token space the DiT generates in (it is only run for
training targets and `reconstruct`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from blip3o import checkpoints
from blip3o.backbone import Backbone, check_prompts
from blip3o.checkpoints.atomic import write_folder
from blip3o.checkpoints.folders import open_folder
from blip3o.checkpoints.limits import check_parameters
from blip3o.clip_encoder import build_clip_encoder
from blip3o.config import FORMAT_VERSION, Blip3oConfig
from blip3o.decoder import build_decoder
from blip3o.dit import DiT
from blip3o.flow import Generators
from blip3o.images import check_images, tensor_to_pil
from blip3o.presets import DEFAULT_MODEL, get_preset, preset_weights
from blip3o.sampling import DiTLoop, run_dit_loop, sample_tokens

__all__ = ["Blip3o", "Blip3oConfig", "CannotEdit", "seed_generators"]


class CannotEdit(ValueError):
    """The model's DiT reads no source image: it generates from text only (`DiTConfig.source` is "none")."""


def weights_key(*modules: nn.Module) -> tuple:
    """Which tensor each weight is and how often it was written in place: equal while no weight was replaced or
    changed (moving a part between devices, as offload does, keeps it)."""
    return tuple((id(p), p._version) for m in modules for p in m.parameters())


class Blip3o(nn.Module):
    def __init__(self, config: Blip3oConfig, tokenizer_dir: str | Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config.backbone, tokenizer_dir=tokenizer_dir)
        self.queries = nn.Parameter(torch.randn(1, config.num_queries, config.backbone.hidden_size)
                                    * config.query_init_std)
        self.dit = DiT(config.dit)
        self.clip_encoder = build_clip_encoder(config.clip_encoder)
        self.decoder = build_decoder(config.decoder)
        self.backbone.freeze()
        # How the DiT's sampling loop runs: `sampling.run_dit_loop`, or a faster runner of the same loop
        # (compiled, CUDA-graphed) that `accelerate()` puts here.
        self.dit_loop: DiTLoop = run_dit_loop
        self._negative: tuple[tuple, torch.Tensor] | None = None  # (what it depends on, the decoder's negative)
        self._offload = None  # a blip3o.offload.Offload once `enable_offload()` ran

    # ------------------------------------------------------------------ construction and persistence

    @classmethod
    def from_preset(cls, name: str | None = None, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, *, pretrained: bool = True) -> Blip3o:
        """Build a preset (`debug`, `nano`, `blip3o-4b`, `blip3o-8b`; None: the default, `nano`);
        `device="meta"` allocates nothing.

        Presets that ship trained weights (`nano`, see `blip3o.presets`) load them unless `pretrained` is
        False (the recipe starts from random weights); the others start random.
        """
        name = DEFAULT_MODEL if name is None else name
        config = get_preset(name)
        weights = preset_weights(name) if pretrained else None
        if weights is not None and str(device) != "meta":
            # shipped weights are stored in fp16 to stay small; compute in fp32 unless asked otherwise
            return cls.from_pretrained(weights, device=device, dtype=dtype or torch.float32)
        if str(device) == "meta":
            with torch.device("meta"):
                return cls(config)
        model = cls(config)
        return model.to(device=device, dtype=dtype) if (device or dtype) else model

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, *, clip_encoder_weights: str | Path | None = None) -> Blip3o:
        """Load a folder written by `save_pretrained`, or an official BLIP3-o folder (BLIP3o/BLIP3o-Model-8B,
        -4B, converted on load: `blip3o.checkpoints.official`), or a stock Qwen2.5-VL folder (understanding only:
        `blip3o.checkpoints.stock`): built on meta, then filled shard by shard.

        `dtype` None keeps a native folder's stored dtypes and gives an official folder the original's
        (float16, the decoder bfloat16); a dtype casts every part. `clip_encoder_weights`: the EVA tower's
        safetensors for an official folder that lacks it.

        Nothing in the folder is trusted: its configs are checked for types and bounds before anything is
        built, the model's parameter count before a weight is read, and its files are read only when they
        are regular files inside it (`blip3o.checkpoints`); a folder that fails raises a CheckpointError
        naming the file and the field.
        """
        folder = open_folder(directory, clip_encoder_weights=clip_encoder_weights)  # configs checked: limits.py
        with torch.device("meta"):
            model = cls(folder.config, tokenizer_dir=folder.tokenizer_dir)
        check_parameters(model.num_parameters()["total"], where=str(directory))  # before a weight is read
        folder.fill(model)
        if dtype is None and folder.dtype is not None:  # before init_buffers: RoPE tables stay float32
            model.to(folder.dtype)
            for part, part_dtype in folder.part_dtypes.items():
                getattr(model, part).to(part_dtype)
        model.init_buffers()
        return model.to(device=device, dtype=dtype) if (device or dtype) else model

    def save_pretrained(self, directory: str | Path, max_shard_bytes: int = checkpoints.DEFAULT_SHARD_BYTES) -> Path:
        """Write config.json, safetensors weights and the tokenizer, atomically: into a temporary sibling that
        replaces `directory` whole once every file is on disk (`blip3o.checkpoints.atomic`), so an existing
        folder is never left half-replaced, whatever interrupts the save."""
        state = self.state_dict()
        meta = [k for k, v in state.items() if v.device.type == "meta"]
        if meta:
            raise ValueError(f"cannot save a model with unloaded (meta) tensors, e.g. {meta[:3]}")

        def fill(tmp: Path) -> None:
            config = {"format_version": FORMAT_VERSION, **self.config.to_dict()}
            (tmp / checkpoints.CONFIG_NAME).write_text(json.dumps(config, indent=2))
            checkpoints.save_weights(tmp, state, max_shard_bytes)
            self.backbone.save_tokenizer(tmp / "tokenizer")

        return write_folder(directory, fill)

    def init_buffers(self) -> None:
        for part in (self.backbone, self.dit, self.clip_encoder, self.decoder):
            part.init_buffers()

    @property
    def device(self) -> torch.device:
        return self.queries.device

    # ------------------------------------------------------------------ speed and memory (opt-in)

    def accelerate(self, **options) -> Blip3o:
        """Turn on the GPU fast paths (`blip3o.accel.AccelOptions`): the DiT loop as one CUDA graph, fused
        projections, a channels-last and CUDA-graphed UNet step, a static KV cache, and with
        `compile=True` torch.compile. Same results as the eager code; graphs apply on CUDA devices only."""
        from blip3o import accel

        return accel.accelerate(self, **options)

    def enable_offload(self, device: str | torch.device = "cuda", *, pin_memory: bool = False) -> Blip3o:
        """Keep every part in CPU memory and move each to `device` only while it runs (`blip3o.offload`):
        peak device memory becomes that of the largest part, at the cost of one host-to-device copy a stage."""
        from blip3o.offload import Offload

        self.disable_offload()
        self._offload = Offload(self, device, pin_memory=pin_memory)
        return self

    def disable_offload(self) -> Blip3o:
        """Undo `enable_offload`: every part stays on the offload device."""
        if self._offload is not None:
            self._offload.remove()
            self._offload = None
        return self

    def _on_device(self, *parts: str):
        """Context in which `parts` are on the compute device (a no-op without offload)."""
        return self._offload.use(*parts) if self._offload is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ generation

    def condition(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> backbone hidden states at the query positions (B, 64, H)."""
        return self.backbone.condition(check_prompts(prompts), self.queries)

    @torch.no_grad()
    def sample_tokens(self, cond: torch.Tensor, *, steps: int | None = None, guidance: float | None = None,
                      generator: Generators = None, sampler: str | None = None,
                      time_shift: float | None = None, source: torch.Tensor | None = None) -> torch.Tensor:
        """cond (B, 64, H) -> CLIP tokens (B, 64, C) by flow sampling from noise, with CFG (`blip3o.sampling`).

        The unconditional branch is an all-zero condition (as trained with condition dropout); both
        branches run in one batch and the condition's cross-attention K/V are computed once. source
        (B, K, 64, C): an edit's source tokens, read by both branches.
        """
        cfg = self.config
        return sample_tokens(self.dit, cond, steps=steps or cfg.steps, guidance=cfg.guidance if guidance is None
                             else guidance, method=sampler or cfg.sampler, eta=cfg.eta,
                             time_shift=time_shift or cfg.time_shift, generator=generator, loop=self.dit_loop,
                             source=source)

    def negative_tokens(self, steps: int | None, guidance: float | None) -> torch.Tensor:
        """The decoder's negative condition (Emu2-Gen style): the tokens generated for the original's empty
        negative prompt " ", seed 0. Kept until a setting it depends on or a weight it reads changes."""
        cfg = self.config
        key = (steps, guidance, cfg.steps, cfg.guidance, cfg.sampler, cfg.eta, cfg.time_shift, str(self.device),
               self.queries.dtype, weights_key(self.backbone, self.dit), id(self.queries), self.queries._version)
        if self._negative is None or self._negative[0] != key:
            with torch.no_grad(), self._on_device("backbone"):
                cond = self.backbone.negative_condition(self.queries)
            generator = torch.Generator().manual_seed(0)
            with self._on_device("dit"):
                self._negative = (key, self.sample_tokens(cond, steps=steps, guidance=guidance, generator=generator))
        return self._negative[1]

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, num_images: int = 1, steps: int | None = None,
                 guidance: float | None = None, seed: int | Sequence[int] | None = None,
                 decoder_steps: int | None = None, decoder_guidance: float | None = None, size: int | None = None,
                 height: int | None = None, width: int | None = None,
                 generator: Generators = None) -> list[Image.Image]:
        """Generate `num_images` images per prompt; returns len(prompts) * num_images PIL images,
        grouped by prompt. `seed` (or an explicit CPU `generator`) makes the result reproducible.

        `size` asks for square images of that side, `height` and `width` for any shape the decoder makes
        (multiples of `decoder.size_multiple` for the SDXL decoder; a side left out is the default side);
        neither: the decoder's default square. `decoder_guidance` at or below 1 runs the decoder's
        conditional branch alone.

        `seed` may also be one seed per prompt (or `generator` one generator per prompt): each prompt's
        images are then those of `generate([prompt], num_images=n, seed=its_seed)` alone (up to
        floating-point rounding, which differs slightly between batch sizes), so seeded requests can
        share a batch.
        """
        prompts = check_prompts(prompts)
        if self.config.extra.get("world") == "shapes":
            warn_unknown_shapes_words(prompts)
        generator = request_generators(num_images, seed, generator, len(prompts), "prompts")
        with self._on_device("backbone"):
            cond = self.condition(prompts).repeat_interleave(num_images, dim=0)  # (B * n, 64, H)
        with self._on_device("dit"):
            tokens = self.sample_tokens(cond, steps=steps, guidance=guidance, generator=generator)
        return self.draw(tokens, steps=steps, guidance=guidance, decoder_steps=decoder_steps,
                         decoder_guidance=decoder_guidance, size=size, height=height, width=width, generator=generator)

    def draw(self, tokens: torch.Tensor, *, steps: int | None, guidance: float | None, decoder_steps: int | None,
             decoder_guidance: float | None, size: int | None, height: int | None, width: int | None,
             generator: Generators) -> list[Image.Image]:
        """Generated CLIP tokens (B, 64, C) -> B images through the decoder, with the model's decoder negative
        (`steps` and `guidance`: the DiT's settings that made the tokens, which the empty-prompt negative reads)."""
        negative = self.negative_tokens(steps, guidance) if self.config.decoder_negative == "empty_prompt" else None
        with self._on_device("decoder"):
            pixels = self.decoder.decode(tokens, negative=negative, steps=decoder_steps, guidance=decoder_guidance,
                                         size=size, height=height, width=width, generator=generator)
        return tensor_to_pil(pixels)

    # ------------------------------------------------------------------ editing

    @property
    def can_edit(self) -> bool:
        """Whether the model edits images: its DiT reads source images (`DiTConfig.source`) and its backbone
        conditions generation."""
        return self.config.dit.edits and self.config.backbone.generates

    def require_editing(self) -> None:
        if not self.config.backbone.generates:
            self.backbone._require_generation()
        if not self.config.dit.edits:
            raise CannotEdit("this model generates from text only: its DiT reads no source image (config "
                             "dit.source is 'none'); train the edit stage (`blip3o train edit`) to make it edit")

    def edit_condition(self, sources: Sequence[Sequence[Image.Image]], instructions: Sequence[str]) -> torch.Tensor:
        """Source images (a list per instruction) + instructions -> the backbone's hidden states at the queries
        (B, 64, H) (`Backbone.edit_condition`)."""
        return self.backbone.edit_condition([list(s) for s in sources], list(instructions), self.queries)

    @torch.no_grad()
    def source_tokens(self, sources: Sequence[Sequence[Image.Image]]) -> torch.Tensor:
        """Source images, a list per row -> their CLIP tokens (B, K, 64, C), K the most images of a row (at least
        1); a row with fewer images (none: a text-to-image row of a training batch) has all-zero slots after its
        own, which the DiT reads as absent."""
        c = self.config.dit
        out = self.queries.new_zeros(len(sources), max([1, *map(len, sources)]), c.num_tokens, c.in_channels)
        flat = [image for row in sources for image in row]
        if not flat:
            return out
        tokens = self.encode_images(flat).to(self.device, self.queries.dtype)  # (sum K_b, 64, C)
        start = 0
        for b, row in enumerate(sources):
            out[b, :len(row)] = tokens[start:start + len(row)]
            start += len(row)
        return out

    @torch.no_grad()
    def edit(self, images: Sequence[Image.Image | Sequence[Image.Image]], instructions: Sequence[str], *,
             num_images: int = 1, steps: int | None = None, guidance: float | None = None,
             seed: int | Sequence[int] | None = None, decoder_steps: int | None = None,
             decoder_guidance: float | None = None, size: int | None = None, height: int | None = None,
             width: int | None = None, generator: Generators = None) -> list[Image.Image]:
        """Edit images by instructions; returns len(instructions) * num_images PIL images, grouped by instruction.

        `images[i]` is the source of instruction i: one PIL image, or a list of several ("put the shape of the
        first image in the colour of the second"). The backbone reads the images and the instruction, the DiT the
        queries' condition and the images' CLIP tokens. Seeds, sizes and guidance as in `generate` (guidance
        pulls from the source towards the instruction: both branches read the source; None: the config's
        `edit_guidance`, else its `guidance`). A model whose DiT reads
        no source raises `CannotEdit`.
        """
        instructions = check_prompts(instructions, name="instructions")
        sources = check_sources(images, len(instructions), self.config.dit.max_sources
                                if self.config.dit.source_context else 1)
        self.require_editing()
        generator = request_generators(num_images, seed, generator, len(instructions), "instructions")
        with self._on_device("backbone"):
            cond = self.edit_condition(sources, instructions).repeat_interleave(num_images, dim=0)  # (B * n, 64, H)
        source = self.source_tokens(sources).repeat_interleave(num_images, dim=0)  # (B * n, K, 64, C)
        if guidance is None:
            guidance = self.config.edit_guidance
        with self._on_device("dit"):
            tokens = self.sample_tokens(cond, steps=steps, guidance=guidance, generator=generator, source=source)
        return self.draw(tokens, steps=steps, guidance=guidance, decoder_steps=decoder_steps,
                         decoder_guidance=decoder_guidance, size=size, height=height, width=width, generator=generator)

    # ------------------------------------------------------------------ understanding and reconstruction

    def answer(self, images: Sequence[Image.Image | None], questions: Sequence[str], **kwargs) -> list[str]:
        """One answer per (image, question) pair; `images[i]` may be None for a text-only question.
        Keyword arguments (max_new_tokens, do_sample, temperature, top_p, top_k, seed, min_pixels, max_pixels,
        stop_tokens) go to `Backbone.answer`; sampling settings left out come from the folder's generation config."""
        with self._on_device("backbone"):
            return self.backbone.answer(images, questions, **kwargs)

    def chat(self, conversations: list[list[dict]], **kwargs) -> list[str]:
        """Next assistant reply for each multi-turn conversation (see `Backbone.chat`)."""
        with self._on_device("backbone"):
            return self.backbone.chat(conversations, **kwargs)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images -> the CLIP tokens (B, 64, C) the DiT learns to generate."""
        with self._on_device("clip_encoder"):
            return self.clip_encoder.encode_images(check_images(images))

    @torch.no_grad()
    def reconstruct(self, images: Sequence[Image.Image], *, seed: int | None = 0, steps: int | None = None,
                    guidance: float | None = None, size: int | None = None, height: int | None = None,
                    width: int | None = None) -> list[Image.Image]:
        """encode -> decode: shows what the token space keeps of an image. Sizes and guidance as in `generate`;
        the decoder's negative is `image_negative_tokens`, as in the original pipeline for an image alone."""
        tokens = self.encode_images(images).to(self.device, self.queries.dtype)
        unguided = isinstance(guidance, int | float) and guidance <= 1  # the decoder would not read a negative
        negative = None if unguided else self.image_negative_tokens()
        generator = seed_generators(seed, len(images))
        with self._on_device("decoder"):
            pixels = self.decoder.decode(tokens, negative=negative, steps=steps, guidance=guidance, size=size,
                                         height=height, width=width, generator=generator)
        return tensor_to_pil(pixels)

    @torch.no_grad()
    def image_negative_tokens(self) -> torch.Tensor:
        """The decoder's negative for an image alone (1, 64, C), as the original pipeline makes it
        (`encode_image(zeros_like(pixels))`): the CLIP encoder's tokens of an all-zero *normalised* image
        (every pixel at the encoder's mean colour) through the tower and the pooling."""
        with self._on_device("clip_encoder"):
            weight = next(self.clip_encoder.parameters())
            side = self.clip_encoder.image_size
            zeros = torch.zeros(1, 3, side, side, device=weight.device, dtype=weight.dtype)
            return self.clip_encoder.tokens(zeros).to(self.device, self.queries.dtype)

    def num_parameters(self) -> dict[str, int]:
        parts = {name: sum(p.numel() for p in getattr(self, name).parameters())
                 for name in ("backbone", "dit", "clip_encoder", "decoder")}
        return {**parts, "queries": self.queries.numel(), "total": sum(parts.values()) + self.queries.numel()}


def request_generators(num_images: int, seed: int | Sequence[int] | None, generator: Generators, rows: int,
                       what: str) -> Generators:
    """The generators of a request of `rows` texts (`what`: "prompts"): `generator` checked, else from `seed`."""
    if not isinstance(num_images, int) or isinstance(num_images, bool) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if generator is None:
        return seed_generators(seed, rows)
    if not isinstance(generator, torch.Generator) and len(generator) != rows:
        raise ValueError(f"got {len(generator)} generators for {rows} {what}: give one per {what[:-1]}")
    return generator


def check_sources(images, rows: int, most: int) -> list[list[Image.Image]]:
    """An edit's source images: one PIL image or a non-empty list of at most `most` per instruction ->
    a list of lists; a ValueError names the entry that is wrong."""
    if not isinstance(images, Sequence) or isinstance(images, str) or len(images) != rows:
        got = len(images) if isinstance(images, Sequence) and not isinstance(images, str) else type(images).__name__
        raise ValueError(f"images must hold one source (a PIL image or a list of them) per instruction; got {got} "
                         f"for {rows} instructions")
    sources = []
    for i, entry in enumerate(images):
        row = [entry] if isinstance(entry, Image.Image) else entry
        if not isinstance(row, Sequence) or isinstance(row, str) or not 1 <= len(row) <= most:
            raise ValueError(f"images[{i}] must be a PIL image or a list of 1 to {most} PIL images")
        sources.append(check_images(list(row), name=f"images[{i}]"))
    return sources


def seed_generators(seed: int | Sequence[int] | None, num_prompts: int) -> Generators:
    """A CPU generator from `seed` (fresh randomness if None), or one per prompt from a list of seeds."""
    if seed is None:
        return torch.Generator().manual_seed(torch.seed() % 2**63)
    if isinstance(seed, int) and not isinstance(seed, bool):
        return torch.Generator().manual_seed(seed)
    if not isinstance(seed, Sequence) or isinstance(seed, str) or len(seed) != num_prompts:
        raise ValueError(f"seed must be an int or one int per prompt ({num_prompts}), got {seed!r}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seed):
        raise ValueError(f"seeds must be integers, got {list(seed)!r}")
    return [torch.Generator().manual_seed(s) for s in seed]


def warn_unknown_shapes_words(prompts: Sequence[str]) -> None:
    """A Shapes-world model still draws a prompt with words outside the world's grammar, but says so."""
    from blip3o.shapes import parse_description

    for prompt in prompts:
        unknown = parse_description(prompt, warn=False).unknown_words
        if unknown:
            warnings.warn(f"the Shapes world has no words {list(unknown)} (in {prompt!r}); they are ignored by "
                          "the model's training and the image may not show them", UserWarning, stacklevel=3)
