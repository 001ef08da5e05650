"""`blip3o generate`: prompts -> image files, in model calls of at most --batch-size images, each call's images
written as it finishes, so that memory holds one batch whatever the count. `blip3o edit` (edit.py) draws its
instructions through the same batching and writes the same files.

What a seed reproduces: a prompt's images depend on its seed, --num-images and --batch-size only.

- A prompt whose images fit one call (--num-images at most --batch-size) gets the images of
  `Blip3o.generate([prompt], num_images=n, seed=S)`, whether it has the call alone or shares it with other
  prompts (one seed per prompt; shared calls match up to floating-point rounding between batch sizes).
- A prompt with more images is split into calls of --batch-size images that carry one generator, seeded S,
  from call to call: its first --batch-size images are those of `--num-images <batch size>`.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

from PIL import Image

from blip3o.cli.errors import EXIT_OK, BadInput, interrupted_after, user_input
from blip3o.cli.files import GRID_IMAGES, SampleWriter, check_output_folder, read_jsonl
from blip3o.cli.models import SAMPLING_FLAGS, SPEED_FLAGS, load_for_command, model_flags
from blip3o.cli.numbers import count, seed
from blip3o.cli.table import Command, Refusal, flag
from blip3o.cli.terminal import progress
from blip3o.files import atomic_folder

MAX_IMAGES = 10_000  # images per prompt: the file names run 0000.png .. 9999.png
MAX_BATCH = 1_024  # images per model call

T = TypeVar("T")


def run_generate(args: argparse.Namespace) -> int:
    records = prompt_records(args)
    size = parse_size(args.size)
    out = Path(args.outdir)
    check_output_folder(out, "--outdir")
    model = load_for_command(args)
    if size:
        with user_input(f"--size {args.size}"):
            model.decoder.check_size(size["height"], size["width"])
    batches = call_batches(model.generate, [r["prompt"] for r in records], num_images=args.num_images,
                           batch_size=args.batch_size, seed=args.seed, steps=args.steps, guidance=args.guidance,
                           **size)
    if args.prompt and len(args.prompt) == 1:
        print(write_samples(batches, out, args.num_images)[-1])
    else:
        write_geneval_layout(batches, list(enumerate(records)), out)
        print(f"{len(records)} prompts x {args.num_images} images in {args.outdir}/ (GenEval layout)")
    return EXIT_OK


def prompt_records(args: argparse.Namespace) -> list[dict]:
    """The prompts to draw: --prompts-file's records, or the command line's prompts as {"prompt": ...}."""
    if args.prompts_file:
        return read_jsonl(args.prompts_file, {"prompt": str})
    for number, prompt in enumerate(args.prompt, start=1):
        if not prompt.strip():
            raise BadInput(f"PROMPT {number} is empty; give it some text")
    if args.prompt:
        return [{"prompt": p} for p in args.prompt]
    raise BadInput("give a prompt, e.g. blip3o generate \"a red circle\", or --prompts-file FILE")


def parse_size(text: str | None) -> dict[str, int]:
    """--size N (an N x N square) or WxH (width x height, as OpenAI writes sizes) -> generate's height and
    width; {} when not given. The decoder checks the sides it makes once it is loaded."""
    from blip3o.images import MAX_PIXELS

    if text is None:
        return {}
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip().lower())
    if not match:
        raise BadInput(f"--size must be N (an N x N square) or WxH (width x height, e.g. 1344x768), got {text!r}")
    width = int(match[1])
    height = int(match[2] or width)
    if min(width, height) < 1 or width * height > MAX_PIXELS:
        raise BadInput(f"--size {text}: each side must be positive and the image at most {MAX_PIXELS:,} pixels")
    return {"height": height, "width": width}


Batches = Iterator[tuple[int, Iterator[list[Image.Image]]]]  # each item's index and its images, call by call


def call_batches(draw: Callable[..., list[Image.Image]], items: Sequence[T], *, num_images: int, batch_size: int,
                 seed: int, **settings) -> Batches:
    """Each item's index and its images, batch by batch, in calls `draw(items, num_images=..., seed=... or
    generator=..., **settings)` (`Blip3o.generate` on prompts, an edit on instructions) of at most `batch_size`
    images; the calls run as the batches are read. Items share a call while their images fit (each its own
    generator, seeded `seed`); an item with more is split, its calls carrying one generator (the module's
    docstring)."""
    import torch

    if num_images <= batch_size:
        per_call = batch_size // num_images
        for start in range(0, len(items), per_call):
            chunk = list(items[start:start + per_call])
            seeds = seed if len(chunk) == 1 else [seed] * len(chunk)
            images = draw(chunk, num_images=num_images, seed=seeds, **settings)
            for offset in range(len(chunk)):
                yield start + offset, iter([images[offset * num_images:(offset + 1) * num_images]])
        return
    for index, item in enumerate(items):
        generator = torch.Generator().manual_seed(seed)
        yield index, (draw([item], num_images=min(batch_size, num_images - start), generator=generator, **settings)
                      for start in range(0, num_images, batch_size))


def write_samples(batches: Batches, out: Path, num_images: int, desc: str = "generate") -> list[Path]:
    """One item's images as OUT/0000.png, 0001.png, ... as they come, then OUT/grid.png; returns their paths,
    the grid's last."""
    writer = SampleWriter(out)
    with interrupted_after(lambda: f"{writer.written} of {num_images} images written to {out}/; the rest and "
                                   f"grid.png are not written"), \
            progress(None, total=num_images, desc=desc, unit="image") as bar:
        for _, images in batches:
            for batch in images:
                writer.add(batch)
                bar.update(len(batch))
        return [*writer.paths, writer.finish()]


def write_geneval_layout(batches: Batches, folders: list[tuple[int, dict]], out: Path, *, desc: str = "generate",
                         unit: str = "prompt",
                         whole: Callable[[Path], AbstractContextManager[Path]] = atomic_folder) -> None:
    """GenEval's layout: OUT/00000/{metadata.jsonl, samples/0000.png, ..., grid.png}, a folder per item of
    `batches`, `folders` holding each one's number and record; each is written whole or not at all inside
    `whole(folder)` (default `atomic_folder`: a folder appears once its last file is written)."""
    done = 0
    with interrupted_after(lambda: f"{done} of {len(folders)} {unit}s written to {out}/; the rest is not written"), \
            progress(None, total=len(folders), desc=desc, unit=unit) as bar:
        for index, images in batches:
            number, record = folders[index]
            write_prompt_folder(whole(out / f"{number:05d}"), record, images)
            done += 1
            bar.update()


def folder_complete(folder: Path, record: dict, num_images: int) -> bool:
    """Whether `folder` is one of GenEval's layout that a run wrote whole for `record` and `num_images` images: its
    metadata.jsonl holds the record, samples/ holds 0000.png ... and grid.png is beside."""
    try:
        same = json.loads((folder / "metadata.jsonl").read_text()) == record
    except (OSError, ValueError):
        return False
    samples = sorted(p.name for p in (folder / "samples").glob("*.png"))
    return same and samples == [f"{i:04d}.png" for i in range(num_images)] and (folder / "grid.png").is_file()


def write_prompt_folder(whole: AbstractContextManager[Path], record: dict,
                        batches: Iterable[list[Image.Image]]) -> None:
    """One prompt's folder of GenEval's layout (metadata.jsonl, samples/0000.png ..., grid.png) inside `whole`, a
    context that yields a temporary folder and puts it in place complete (`blip3o.files.atomic_folder`)."""
    with whole as folder:
        writer = SampleWriter(folder / "samples", grid=folder / "grid.png")
        for batch in batches:
            writer.add(batch)
        writer.finish()
        (folder / "metadata.jsonl").write_text(json.dumps(record) + "\n")


def generate_command() -> Command:
    return Command(("generate",), "generate images from text prompts", run_generate, flags=(
        flag("prompt", nargs="*", help="one or more prompts"),
        flag("--prompts-file", help="JSON lines, one object with a `prompt` per line (GenEval's "
                                    "evaluation_metadata.jsonl); every field is kept in metadata.jsonl"),
        flag("--outdir", default="outputs"),
        count("--num-images", high=MAX_IMAGES, default=1, help=f"images per prompt, 1 to {MAX_IMAGES:,} (default 1)"),
        seed("--seed", default=0, help="random seed (default 0); same seed, same images"),
        flag("--size", default=None, metavar="N|WxH",
             help="image size in pixels: N for an N x N square, or WxH (width x height, e.g. 1344x768); each side "
                  "a multiple of the decoder's (32 for SDXL); default: the decoder's square"),
        count("--batch-size", high=MAX_BATCH, default=32,
              help="images per model call (default 32): prompts share a call while their images fit, and a "
                   "prompt with more is split into calls of this many"),
        *model_flags(), *SAMPLING_FLAGS, *SPEED_FLAGS,
    ), refusals=(
        Refusal(("prompt",), lambda a: bool(a.prompts_file),
                "cannot go with --prompts-file: give prompts on the command line or in the file, not both"),
    ), epilog=(
        f"one prompt writes DIR/0000.png, 0001.png, ... and DIR/grid.png (the first {GRID_IMAGES}); several prompts\n"
        "or --prompts-file write GenEval's layout: DIR/00000/metadata.jsonl, DIR/00000/samples/0000.png, ...,\n"
        "DIR/00000/grid.png. Each prompt is generated with the same --seed; images are written as each model\n"
        "call of --batch-size images finishes, and Ctrl-C leaves each file (each GenEval folder) whole or absent.\n"
        "A seed gives the same images for the same --num-images and --batch-size; up to --batch-size images a\n"
        "prompt, the batch size does not change them.\n\n"
        "examples:\n"
        '  blip3o generate "two red circles" --num-images 4 --seed 0 --outdir out/\n'
        '  blip3o generate "a lighthouse at dusk" --model my-blip3o --size 1344x768   # 1344 wide, 768 high\n'
        "  blip3o generate --prompts-file evaluation_metadata.jsonl --outdir geneval_out/ --num-images 4"))
