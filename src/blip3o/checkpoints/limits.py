"""What a config may ask for: the type of every field and bounds on every size, layer and head count, step
count and pixel budget, checked before anything is built.

A config decides how much a model allocates, so a wrong or hostile number in a folder's config.json
(`num_layers: 1000000000`, `min_pixels: 1e12`, a width given as a string or NaN) is refused here, naming
the file and the field, instead of allocating without end or failing deep inside a later call:

    /models/x/config.json: dit.num_layers is 1000000000; at most 4096

The bounds are far above any released model (the official 8B: 28 + 32 + 24 + 64 layers, widths up to
18,944, 152k rows of vocabulary, 16.6 billion parameters in all), so they only stop numbers no real model
has. Per-field bounds keep every stack and width finite; `check_parameters` then caps the whole model,
counted on the meta device, before a weight is read.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

from blip3o.checkpoints import CheckpointError

MAX_LAYERS = 4096  # blocks of one stack: the language model, the ViT, the DiT, a CLIP tower
MAX_WIDTH = 131_072  # any width: hidden, feed-forward, channels, token width
MAX_HEADS = 1024  # attention heads of a layer
MAX_VOCAB = 4_194_304  # rows of an embedding
MAX_POSITIONS = 16_777_216  # the longest sequence a RoPE is configured for
MAX_SIDE = 16_384  # pixels of an image side
MAX_PIXELS = 67_108_864  # pixels of one image (the 7B Qwen2.5-VL's own budget is 12,845,056)
MAX_GRID = 64  # side of the DiT's token grid (64 x 64 tokens)
MAX_LEVELS = 8  # resolution levels of a UNet or VAE
MAX_BLOCKS_PER_LEVEL = 64  # resnets or transformer blocks of one UNet level
MAX_STEPS = 10_000  # sampling steps of the DiT or the decoder
MAX_TIMESTEPS = 100_000  # a diffusers scheduler's num_train_timesteps (it allocates one entry per timestep)
MAX_TRAIN_STEPS = 100_000_000  # optimiser steps of a training run
MAX_BATCH = 1_048_576  # items of a global training batch
MAX_PARAMETERS = 100_000_000_000  # the whole model, counted on the meta device before loading


@dataclass(frozen=True)
class Bound:
    """An inclusive range [lo, hi] (hi excluded when `open_hi`); for a list, each entry's, and at most
    `max_len` entries."""

    lo: float
    hi: float
    open_hi: bool = False
    max_len: int = MAX_LAYERS


LAYERS, WIDTH, HEADS, SIDE, PIXELS = (Bound(1, MAX_LAYERS), Bound(1, MAX_WIDTH), Bound(1, MAX_HEADS),
                                      Bound(1, MAX_SIDE), Bound(1, MAX_PIXELS))
STEPS, PER_LEVEL, EPS, SHARE = Bound(1, MAX_STEPS), Bound(1, MAX_BLOCKS_PER_LEVEL), Bound(1e-12, 1.0), Bound(0, 1)
LEVEL_WIDTHS = Bound(1, MAX_WIDTH, max_len=MAX_LEVELS)

# Bounds of the model configs' fields (Blip3oConfig and its parts), by field name: a name means one kind of
# number in every part. Fields not named here are checked for their type only.
MODEL_BOUNDS: dict[str, Bound] = {
    # widths
    "hidden_size": WIDTH, "intermediate_size": WIDTH, "vision_hidden_size": WIDTH, "vision_intermediate_size": WIDTH,
    "in_channels": WIDTH, "cond_size": WIDTH, "width": WIDTH, "mlp_dim": WIDTH, "embed_dim": WIDTH,
    "token_width": WIDTH, "head_dim": WIDTH, "addition_time_embed_dim": WIDTH, "multiple_of": WIDTH,
    "norm_num_groups": WIDTH, "vae_norm_num_groups": WIDTH, "norm_groups": WIDTH, "latent_channels": WIDTH,
    "token_dim": Bound(0, MAX_WIDTH),
    "block_out_channels": LEVEL_WIDTHS, "vae_block_out_channels": LEVEL_WIDTHS, "channels": LEVEL_WIDTHS,
    # layer and head counts
    "num_layers": LAYERS, "vision_depth": LAYERS, "depth": LAYERS,
    "fullatt_block_indexes": Bound(0, MAX_LAYERS - 1),
    "layers_per_block": PER_LEVEL, "vae_layers_per_block": PER_LEVEL,
    "transformer_layers_per_block": Bound(0, MAX_BLOCKS_PER_LEVEL, max_len=MAX_LEVELS),
    "attention_levels": Bound(0, MAX_LEVELS - 1, max_len=MAX_LEVELS),
    "num_heads": HEADS, "num_kv_heads": HEADS, "vision_num_heads": HEADS,
    "attention_head_dim": Bound(1, MAX_HEADS, max_len=MAX_LEVELS),
    # vocabulary, positions, tokens
    "vocab_size": Bound(1, MAX_VOCAB), "max_position_embeddings": Bound(1, MAX_POSITIONS),
    "mrope_section": Bound(0, MAX_WIDTH, max_len=3),
    "grid_size": Bound(1, MAX_GRID), "num_queries": Bound(1, MAX_GRID * MAX_GRID), "max_sources": Bound(1, 64),
    # images
    "image_size": SIDE, "default_size": SIDE, "sample_size": SIDE, "window_size": SIDE,
    "window": Bound(0, MAX_SIDE), "patch_size": Bound(1, 1024), "pool": Bound(1, 1024),
    "spatial_merge_size": Bound(1, 64), "temporal_patch_size": Bound(1, 64),
    "min_pixels": PIXELS, "max_pixels": PIXELS,
    # sampling
    "steps": STEPS, "default_steps": STEPS, "time_shift": Bound(1e-3, 1e3),
    "query_init_std": Bound(0, 1e3), "condition_drop": SHARE,
    # numerics
    "rope_theta": Bound(1.0, 1e12), "rms_norm_eps": EPS, "norm_eps": EPS, "vae_scaling_factor": Bound(1e-6, 1e6),
}

# Bounds inside the model configs' free-form objects: the decoder's diffusers scheduler config allocates one
# entry per training timestep.
NESTED_BOUNDS: dict[str, dict[str, tuple[type, Bound]]] = {
    "scheduler": {"num_train_timesteps": (int, Bound(1, MAX_TIMESTEPS))},
}

# Bounds of TrainConfig's fields.
TRAIN_BOUNDS: dict[str, Bound] = {
    "steps": Bound(1, MAX_TRAIN_STEPS), "warmup_steps": Bound(0, MAX_TRAIN_STEPS),
    "log_every": Bound(1, MAX_TRAIN_STEPS), "checkpoint_every": Bound(1, MAX_TRAIN_STEPS),
    "batch_size": Bound(1, MAX_BATCH), "lr": Bound(0, 1e3), "min_lr_ratio": SHARE, "weight_decay": Bound(0, 1e3),
    "betas": Bound(0, 1, open_hi=True, max_len=2), "grad_clip": Bound(1e-12, 1e12),
    "ema_decay": Bound(0, 1, open_hi=True), "seed": Bound(0, 2**63 - 1),
    "grad_accum": Bound(1, MAX_BATCH), "num_workers": Bound(0, 256),
}


def check_fields(cls: type, values: Mapping[str, Any], *, where: str = "", prefix: str = "",
                 bounds: Mapping[str, Bound] = MODEL_BOUNDS, error: type[ValueError] = CheckpointError) -> None:
    """Refuse `values` (field name -> value, from a saved JSON or a built config) for dataclass `cls`: a name
    that is not a field, a value that is not of the field's annotated type, or one outside `bounds`. The
    error says `{where}{prefix}{field} is {value}; ...`."""
    hints = type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise error(f"{where}{prefix}{unknown[0]} is not a field of {cls.__name__}; its fields: "
                    f"{', '.join(sorted(known))}")
    for name, value in values.items():
        check_value(f"{prefix}{name}", value, hints[name], bounds.get(name), where=where, error=error)
        for key, (hint, bound) in NESTED_BOUNDS.get(name, {}).items():
            if isinstance(value, dict) and key in value:
                check_value(f"{prefix}{name}.{key}", value[key], hint, bound, where=where, error=error)


def field_values(config: object, skip: Container[str] = ()) -> dict[str, Any]:
    """A dataclass's field values by name, without copying them (as dataclasses.asdict would)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in skip}


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """The annotations of a dataclass's fields, evaluated (once per class)."""
    return typing.get_type_hints(cls)


def check_value(name: str, value: Any, hint: Any, bound: Bound | None, *, where: str = "",
                error: type[ValueError] = CheckpointError) -> None:
    """Refuse one value that is not of type `hint` (int, float, bool, str, lists and tuples of them, unions
    with None) or lies outside `bound`."""
    if not _conforms(value, hint):
        raise error(f"{where}{name} is {value!r}; it must be {_describe(hint)}")
    if bound is None or value is None or isinstance(value, (bool, str, dict)):
        return
    if isinstance(value, (list, tuple)):
        if len(value) > bound.max_len:
            raise error(f"{where}{name} has {len(value)} entries; at most {bound.max_len}")
        for i, entry in enumerate(value):
            _check_bound(f"{name}[{i}]", entry, bound, where, error)
    else:
        _check_bound(name, value, bound, where, error)


def check_parameters(count: int, *, where: str) -> None:
    """Refuse a model of more than MAX_PARAMETERS parameters (counted on the meta device, so nothing is
    allocated yet)."""
    if count > MAX_PARAMETERS:
        raise CheckpointError(f"{where}: the config describes a model of {count:,} parameters; at most "
                              f"{MAX_PARAMETERS:,}")


def _check_bound(name: str, value: float, bound: Bound, where: str, error: type[ValueError]) -> None:
    if value < bound.lo:
        raise error(f"{where}{name} is {value!r}; at least {_number(bound.lo)}")
    if value > bound.hi or (bound.open_hi and value == bound.hi):
        raise error(f"{where}{name} is {value!r}; {'below' if bound.open_hi else 'at most'} {_number(bound.hi)}")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else str(x)


def _conforms(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arm) for arm in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_conforms(v, args[0]) for v in value)
    if hint is dict or origin is dict:
        return isinstance(value, dict)
    return True  # object, Any: the field's own checks


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arm is type(None) else _describe(arm) for arm in args)
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", dict: "an object"}
    if hint in names:
        return names[hint]
    if origin is dict:
        return "an object"
    if origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} entries, each {_describe(args[0])}"
        return f"a list, each entry {_describe(args[0])}" if args else "a list"
    return getattr(hint, "__name__", str(hint))
