"""Which model a command runs, and how: the --model flags, loading, and this run's sampling settings."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from blip3o.cli.errors import BadInput
from blip3o.cli.numbers import count, number
from blip3o.cli.table import Flag, flag
from blip3o.cli.terminal import note

DTYPES = ("float32", "bfloat16", "float16")
DEVICE_TYPES = ("cpu", "cuda", "mps")  # where a model runs


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


def device_name(name: str) -> str:
    """argparse type of --device: cpu, or an accelerator torch reports available (cuda, cuda:1, mps)."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{name!r} is not a device: give cpu, cuda, cuda:N or mps") from e
    if device.type not in DEVICE_TYPES:
        raise argparse.ArgumentTypeError(f"{name!r}: a model runs on {', '.join(DEVICE_TYPES)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: no CUDA device is available here (use cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{name!r}: there are {torch.cuda.device_count()} CUDA devices, "
                                         f"numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: no MPS device is available here (use cpu)")
    return name


def model_flags() -> tuple[Flag, ...]:
    """--model, --device, --dtype: every command that runs a model takes them."""
    from blip3o import DEFAULT_MODEL

    return (
        flag("--model", type=model_name, default=DEFAULT_MODEL,
             help=f"preset name or local checkpoint folder (default: {DEFAULT_MODEL})"),
        flag("--device", type=device_name, default=None, help="cpu, cuda, cuda:1, ... (default: cpu)"),
        flag("--dtype", default=None, choices=DTYPES),
    )


SPEED_FLAGS = (
    flag("--offload", action="store_true", help="keep the model in CPU memory and move each part to --device "
                                                "only while it runs (big models, small GPUs)"),
    flag("--compile", action="store_true", help="GPU fast paths: the DiT loop and UNet step as CUDA graphs, "
                                                "torch.compile, static KV cache (slow first call)"),
)
SAMPLING_FLAGS = (
    count("--steps", high=1000, default=None, help="DiT sampling steps, 1 to 1000 (default: the model's)"),
    number("--guidance", low=0, high=100, default=None, help="DiT CFG scale, 0 to 100 (default: the model's)"),
    flag("--sampler", choices=["euler", "heun", "stochastic"], default=None,
         help="DiT sampler (default: the model's); stochastic = DDIM with --eta"),
    number("--eta", low=0, high=1, default=None, help="the stochastic sampler's noise, 0 (Euler) to 1 (DDPM)"),
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


def check_offload_device(args: argparse.Namespace) -> None:
    """--offload without --device moves the parts to cuda: BadInput where there is none."""
    import torch

    if getattr(args, "offload", False) and args.device is None and not torch.cuda.is_available():
        raise BadInput("--offload moves each part to --device, cuda by default, and no CUDA device is available "
                       "here: name a --device")


def load_for_command(args: argparse.Namespace):
    """The model of a command's --model/--device/--dtype, set up as its other flags ask: offload, this
    run's sampling settings (SAMPLING_FLAGS), compile; on a CPU the Shapes decoder runs channels-last."""
    from blip3o.decoder.shapes import ShapesDecoder

    check_offload_device(args)
    offload = getattr(args, "offload", False)
    note(f"loading model {args.model}...")
    model = load_model(args.model, None if offload else args.device, args.dtype)
    if offload:  # weights stay in CPU memory; each part visits the device only while it runs
        model.enable_offload(args.device or "cuda")
    overrides = {k: getattr(args, k) for k in ("sampler", "eta", "guidance", "steps")
                 if getattr(args, k, None) is not None}
    if "guidance" in overrides:  # --guidance sets the scale of generations and edits alike
        overrides["edit_guidance"] = overrides["guidance"]
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
    elif not offload and isinstance(getattr(model, "decoder", None), ShapesDecoder) and model.device.type == "cpu":
        # NHWC convolutions (oneDNN's fast layout): nano's generate makes 1.1x the images a second on a 2-core
        # CPU, the same images up to float rounding (docs/benchmarks.md)
        model.decoder.set_channels_last(True)
    return model
