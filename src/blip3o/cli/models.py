"""Which model a command runs, and how: the --model flags, loading, and this run's sampling settings."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from blip3o.cli.errors import BadInput
from blip3o.cli.table import Flag, flag
from blip3o.cli.terminal import note

DTYPES = ("float32", "bfloat16", "float16")


def model_name(name: str) -> str:
    """argparse type of --model: a preset or a local folder. Hub ids are refused: nothing is downloaded."""
    from blip3o.presets import PRESETS

    path = Path(name).expanduser()
    if path.is_dir() or name in PRESETS:
        return name
    if path.exists():
        raise argparse.ArgumentTypeError(f"{name!r} is a file; pass a preset ({', '.join(PRESETS)}) or a "
                                         f"checkpoint folder")
    hint = "pass a preset or the path of a checkpoint folder"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        hint = (f"it looks like a hub id, but blip3o downloads nothing: download the folder yourself (for example "
                f"`hf download {name} --local-dir DIR`) and pass --model DIR")
    raise argparse.ArgumentTypeError(f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor a local folder; "
                                     f"{hint}")


def model_flags() -> tuple[Flag, ...]:
    """--model, --device, --dtype: every command that runs a model takes them."""
    from blip3o import DEFAULT_MODEL

    return (
        flag("--model", type=model_name, default=DEFAULT_MODEL,
             help=f"preset name or local checkpoint folder (default: {DEFAULT_MODEL})"),
        flag("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)"),
        flag("--dtype", default=None, choices=DTYPES),
    )


SPEED_FLAGS = (
    flag("--offload", action="store_true", help="keep the model in CPU memory and move each part to --device "
                                                "only while it runs (big models, small GPUs)"),
    flag("--compile", action="store_true", help="GPU fast paths: the DiT loop and UNet step as CUDA graphs, "
                                                "torch.compile, static KV cache (slow first call)"),
)
SAMPLING_FLAGS = (
    flag("--steps", type=int, default=None, help="DiT sampling steps (default: the model's)"),
    flag("--guidance", type=float, default=None, help="DiT CFG scale (default: the model's)"),
    flag("--sampler", choices=["euler", "heun", "stochastic"], default=None,
         help="DiT sampler (default: the model's); stochastic = DDIM with --eta"),
    flag("--eta", type=float, default=None, help="the stochastic sampler's noise, 0 (Euler) to 1 (DDPM)"),
)


def load_model(name: str, device: str | None, dtype: str | None):
    """A preset name or a local checkpoint folder (checked by `model_name`) -> Blip3o."""
    import torch

    from blip3o import Blip3o

    torch_dtype = None if dtype is None else getattr(torch, dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        return Blip3o.from_pretrained(path, device=device, dtype=torch_dtype)
    return Blip3o.from_preset(name, device=device, dtype=torch_dtype)


def load_for_command(args: argparse.Namespace):
    """The model of a command's --model/--device/--dtype, set up as its other flags ask: offload, this
    run's sampling settings (SAMPLING_FLAGS), compile."""
    note(f"loading model {args.model}...")
    offload = getattr(args, "offload", False)
    model = load_model(args.model, None if offload else args.device, args.dtype)
    if offload:  # weights stay in CPU memory; each part visits the device only while it runs
        model.enable_offload(args.device or "cuda")
    overrides = {k: getattr(args, k) for k in ("sampler", "eta", "guidance", "steps")
                 if getattr(args, k, None) is not None}
    if overrides:  # sampling settings for this run (the saved model keeps its own)
        try:
            model.config = dataclasses.replace(model.config, **overrides)
        except ValueError as e:  # the config names its fields; the user typed flags
            raise BadInput(str(e).replace("inconsistent Blip3oConfig: ", "")) from e
        if "eta" in overrides and model.config.sampler != "stochastic":
            raise BadInput(f"--eta is the stochastic sampler's noise, and this run samples with "
                           f"{model.config.sampler}: add --sampler stochastic")
    if getattr(args, "compile", False):
        model.accelerate(compile=True)
    return model
