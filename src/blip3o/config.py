"""Blip3oConfig: one config for the whole system, a dataclass per part.

A leaf of the package: the part configs and this one import no model code, so presets, checkpoint
loading and the model all read it without a cycle.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from blip3o.backbone import BackboneConfig
from blip3o.checkpoints import CheckpointError
from blip3o.checkpoints.limits import check_fields, field_values
from blip3o.clip_encoder import ClipEncoderConfig, clip_encoder_config_from_dict
from blip3o.decoder import DecoderConfig, decoder_config_from_dict
from blip3o.dit import DiTConfig
from blip3o.flow import SOLVERS

FORMAT_VERSION = 1  # of the native folder (config.json "format_version")
# DiT fields that older native folders hold and that no longer exist: read when they hold the value that meant
# "off" (what the model computes then is unchanged), refused otherwise
RETIRED_DIT_FIELDS = {"ffn_dim_multiplier": None, "token_whitening": 0.0, "absolute_position": False, "data_std": 1.0}
TRAIN_LAYOUTS = ("generation_prompt", "closed_turn")  # Blip3oConfig.train_layout
TRAIN_TIMESTEPS = ("uniform", "scheduler_grid")  # Blip3oConfig.train_timesteps
# Blip3oConfig's parts: field -> its config class, or the union of the kinds its "kind" picks from
PARTS: dict[str, Any] = {"backbone": BackboneConfig, "dit": DiTConfig, "clip_encoder": ClipEncoderConfig,
                         "decoder": DecoderConfig}


@dataclass
class Blip3oConfig:
    backbone: BackboneConfig
    dit: DiTConfig
    clip_encoder: object  # a ClipEncoderConfig (dataclass with `kind`)
    decoder: object  # a DecoderConfig (dataclass with `kind`)
    num_queries: int = 64  # learnable query tokens appended after [IMG]; one per CLIP token
    query_init_std: float = 1.0  # official: torch.randn
    steps: int = 30  # DiT sampling steps (official 30, Euler)
    guidance: float = 3.0  # DiT classifier-free guidance scale
    # the DiT's guidance for an edit (`Blip3o.edit`, when the call names none); None: `guidance`. An edit's
    # unconditional branch keeps the source, so a lower scale keeps more of it (docs/editing.md)
    edit_guidance: float | None = None
    sampler: str = "euler"  # "euler" | "heun" | "stochastic" (DDIM with eta: fresh noise at every step)
    eta: float = 1.0  # the stochastic sampler's noise: 0 = Euler, 1 = DDPM's ancestral sampler
    time_shift: float = 1.0  # SD3-style time shift of the sampling grid (1 = official linear grid)
    # the decoder's CFG negative: "empty_prompt" = tokens generated for " " (Emu2-Gen / official), or
    # "zeros" = the all-zero condition the decoder saw under condition dropout in training
    decoder_negative: str = "empty_prompt"
    # How the generation stage trains (blip3o.train.objective). train_layout: the sequence the queries are read
    # in, "generation_prompt" (the one generation reads: [IMG] and the queries after the open assistant turn)
    # or "closed_turn" (the original's training: the assistant turn emptied and closed, then [IMG] and the
    # queries). train_timesteps: "uniform" (continuous t) or "scheduler_grid" (the original's 1000-step
    # scheduler grid, blip3o.flow.grid_times). The official presets and folders name the original's; a
    # folder whose config.json names neither trains with the generation prompt and continuous t.
    train_layout: str = "generation_prompt"
    train_timesteps: str = "uniform"
    # the CLIP encoder holds random weights (an official folder loaded without its EVA tower): its tokens are
    # no target to train on or cache, so training the generation stage and `blip3o data clip-targets` refuse it
    clip_encoder_random: bool = False
    extra: dict = field(default_factory=dict)  # free-form metadata (training provenance, ...)

    def __post_init__(self) -> None:
        self._check_limits()
        width = getattr(self.clip_encoder, "token_width", getattr(self.clip_encoder, "width", None))
        problems = []
        if self.dit.cond_size != self.backbone.hidden_size:
            problems.append(f"dit.cond_size {self.dit.cond_size} != backbone.hidden_size {self.backbone.hidden_size}")
        if width is not None and self.dit.in_channels != width:
            problems.append(f"dit.in_channels {self.dit.in_channels} != clip_encoder.width {width}")
        token_width = getattr(self.decoder, "token_width", None)
        if token_width is not None and token_width != self.dit.in_channels:
            problems.append(f"decoder.token_width {token_width} != dit.in_channels {self.dit.in_channels}")
        if self.decoder_negative not in ("empty_prompt", "zeros"):
            problems.append(f"decoder_negative must be 'empty_prompt' or 'zeros', got {self.decoder_negative!r}")
        if self.num_queries != self.dit.num_tokens:
            problems.append(f"num_queries {self.num_queries} != DiT tokens {self.dit.num_tokens}")
        if self.train_layout not in TRAIN_LAYOUTS:
            problems.append(f"train_layout {self.train_layout!r} is not one of {', '.join(TRAIN_LAYOUTS)}")
        if self.train_timesteps not in TRAIN_TIMESTEPS:
            problems.append(f"train_timesteps {self.train_timesteps!r} is not one of {', '.join(TRAIN_TIMESTEPS)}")
        if self.sampler not in SOLVERS:
            problems.append(f"sampler {self.sampler!r} is not one of {', '.join(SOLVERS)}")
        if not 0.0 <= self.eta <= 1.0:
            problems.append(f"eta {self.eta} is not in [0, 1]")
        if problems:
            raise ValueError("inconsistent Blip3oConfig: " + "; ".join(problems))

    def _check_limits(self) -> None:
        """Refuse a field of the wrong type or outside its bounds (`blip3o.checkpoints.limits`), in this config
        or one of its parts, with a ValueError `{part}.{field} is ...`; loaders add the file's name."""
        check_fields(type(self), field_values(self, skip=PARTS), error=ValueError)
        for name in PARTS:
            part = getattr(self, name)
            if dataclasses.is_dataclass(part):
                check_fields(type(part), field_values(part), prefix=f"{name}.", error=ValueError)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def require_trained_clip_encoder(self, purpose: str) -> None:
        """Refuse (ValueError) to use the CLIP encoder's tokens for `purpose` when its weights are random."""
        if self.clip_encoder_random:
            raise ValueError(
                f"cannot {purpose}: this model's CLIP encoder holds random weights (clip_encoder_random: its folder "
                "had no EVA-CLIP tower), so its tokens are no target. Load the folder with "
                "clip_encoder_weights=<folder with the tower's safetensors> and save it again")

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "config") -> Blip3oConfig:
        """The config a saved JSON object describes. Every field is checked for its type and bounds before any
        part is built; anything that is not a blip3o config raises a CheckpointError naming `where` (the file)
        and the field."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{where}: a blip3o config is a JSON object, got {type(d).__name__}")
        d = dict(d)
        d.pop("format_version", None)
        for name in PARTS:
            if not isinstance(d.get(name), dict):
                raise CheckpointError(f"{where}: {name} must be an object of its fields, got {d.get(name)!r}")
        d["dit"] = without_retired(d["dit"], where=where)
        check_fields(cls, {k: v for k, v in d.items() if k not in PARTS}, where=f"{where}: ")
        for name, kinds in PARTS.items():
            part_class = _kind_class(kinds, d[name])
            if part_class is not None:
                check_fields(part_class, d[name], where=f"{where}: ", prefix=f"{name}.")
        try:
            return cls(
                backbone=BackboneConfig(**d.pop("backbone")),
                dit=DiTConfig(**d.pop("dit")),
                clip_encoder=clip_encoder_config_from_dict(d.pop("clip_encoder")),
                decoder=decoder_config_from_dict(d.pop("decoder")),
                **d,
            )
        except CheckpointError:
            raise
        except (TypeError, ValueError, ArithmeticError) as e:
            raise CheckpointError(f"{where}: not a blip3o config: {e}") from e


def _kind_class(kinds: Any, raw: dict) -> type | None:
    """The config class a part's dict describes: `kinds` itself, or the member of the union `kinds` whose
    `kind` default the dict names (None for an unknown kind, which the part's own parser refuses)."""
    members = typing.get_args(kinds) or (kinds,)
    for member in members:
        default = {f.name: f.default for f in dataclasses.fields(member)}.get("kind")
        if default is None or default == raw.get("kind"):
            return member
    return None


def without_retired(dit: dict, *, where: str = "config") -> dict:
    """A saved DiT config without the retired fields (see RETIRED_DIT_FIELDS)."""
    dit = dict(dit)
    for name, off in RETIRED_DIT_FIELDS.items():
        if name in dit and dit.pop(name) != off:
            raise CheckpointError(f"{where}: dit.{name} is not supported any more (only {off!r}, which is the "
                                  "default)")
    return dit
