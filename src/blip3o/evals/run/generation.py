"""Generating a benchmark's images with the model's settings, a step of prompts at a time, resumably.

    run_generation(args, "geneval", prompts, write_geneval_folder, num_images=4, size={})

Every prompt is generated with the same seed (`--seed`), as GenEval's and the original's generation scripts
seed each prompt alike: a prompt's images are those of `model.generate([prompt], num_images=n, seed=seed)` (up
to floating-point rounding when a step's prompts share the model call, one seed each). The DiT's steps,
guidance and sampler and the decoder's steps, guidance and size are the model's own unless a flag sets them (30
Euler steps at CFG 3, then 50 decoder steps at CFG 3 and 1024 px for the official models); settings.json records
what they came to.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from blip3o.cli.errors import user_input
from blip3o.cli.models import load_for_command
from blip3o.evals.run.work import finish, join_world, my_steps, place_device, start_outputs, step_bar


@dataclass(frozen=True)
class Prompt:
    text: str
    target: Path  # the file or folder its images become; it exists once they are all written
    record: dict = field(default_factory=dict)  # what the benchmark keeps beside the images (GenEval's metadata)


Writer = Callable[[Prompt, list[Image.Image]], None]  # writes one prompt's images to its target, atomically


def generation_settings(benchmark: str, args: argparse.Namespace, model, *, prompts: int, num_images: int,
                        height: int, width: int) -> dict:
    """What made the images: the model, the seed and every sampling setting as this run resolved it."""
    cfg = model.config
    return {"benchmark": benchmark, "model": args.model, "prompts": prompts, "num_images": num_images,
            "seed": args.seed, "steps": cfg.steps, "guidance": cfg.guidance, "sampler": cfg.sampler,
            "eta": cfg.eta if cfg.sampler == "stochastic" else None, "time_shift": cfg.time_shift,
            "decoder_steps": model.decoder.default_steps, "decoder_guidance": model.decoder.default_guidance,
            "decoder_negative": cfg.decoder_negative, "height": height, "width": width,
            "dtype": str(model.queries.dtype).removeprefix("torch."), "device": str(model.device),
            "batch_size": args.batch_size}


def generate_all(model, prompts: Sequence[Prompt], write: Writer, world, *, seed: int, num_images: int,
                 batch_size: int, height: int, width: int, desc: str) -> None:
    """Generate and write this rank's prompts whose target does not exist yet; returns once every rank is done."""
    steps = my_steps(prompts, batch_size, world, lambda prompt: prompt.target.exists())
    with step_bar(world, steps, desc) as update:
        for step in steps:
            images = model.generate([p.text for p in step], num_images=num_images, seed=[seed] * len(step),
                                    height=height, width=width)  # grouped by prompt
            for j, prompt in enumerate(step):
                write(prompt, images[j * num_images:(j + 1) * num_images])
            update(len(step))
    finish(world)


def run_generation(args: argparse.Namespace, benchmark: str, prompts: Sequence[Prompt], write: Writer, *,
                   num_images: int, size: dict) -> bool:
    """Load the model of `args` on this rank's device, check the image size (`size`: {} for the decoder's own,
    else height and width), record the settings in OUT/settings.json and write every prompt's images. Returns
    whether this process is rank 0 (which reports)."""
    out = Path(args.out)
    world = join_world()
    args.device = place_device(args.device, world)
    model = load_for_command(args)
    height = size.get("height", model.decoder.default_size)
    width = size.get("width", model.decoder.default_size)
    with user_input(f"image size {width}x{height}"):
        model.decoder.check_size(height, width)
    settings = generation_settings(benchmark, args, model, prompts=len(prompts), num_images=num_images,
                                   height=height, width=width)
    start_outputs(out, settings, world)
    generate_all(model, prompts, write, world, seed=args.seed, num_images=num_images, batch_size=args.batch_size,
                 height=height, width=width, desc=benchmark)
    return world.is_main
