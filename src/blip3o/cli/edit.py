"""`blip3o edit`: source images + an instruction -> edited image files, drawn and written as `generate` draws
prompts (generate.py): the same seeds, sizes and batches of at most --batch-size images, the same files.

An --edits-file run resumes: a rerun into the same --outdir keeps each folder a run finished for its line and
--num-images, and edits the others.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from blip3o.cli.errors import EXIT_OK, BadInput, user_input
from blip3o.cli.files import GRID_IMAGES, check_output_folder, open_image, read_numbered_jsonl
from blip3o.cli.generate import (
    MAX_BATCH,
    MAX_IMAGES,
    Batches,
    call_batches,
    folder_complete,
    parse_size,
    write_geneval_layout,
    write_samples,
)
from blip3o.cli.models import SAMPLING_FLAGS, SPEED_FLAGS, load_for_command, model_flags
from blip3o.cli.numbers import count, seed
from blip3o.cli.table import Command, Refusal, flag

EXAMPLE = 'blip3o edit scene.png "make the circle blue"'


@dataclass(frozen=True)
class Edit:
    """One instruction and the image files it edits."""

    sources: tuple[Path, ...]
    instruction: str
    where: str  # how messages name its sources: "IMAGE", or "edits.jsonl:3: 'image'"

    def images(self) -> list[Image.Image]:
        return [open_image(path, self.where) for path in self.sources]


def run_edit(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    out = Path(args.outdir)
    if args.edits_file:
        return edit_file(args, size, out)
    edit = command_line_edit(args.inputs)
    check_output_folder(out, "--outdir")
    batches = edit_batches(args, [edit], size)
    print("\n".join(map(str, write_samples(batches, out, args.num_images, desc="edit"))))
    return EXIT_OK


def edit_file(args: argparse.Namespace, size: dict[str, int], out: Path) -> int:
    """--edits-file: a GenEval folder per line, each line's folder left as it is if a run completed it."""
    from blip3o.evals.run.work import item_folder

    lines = edits_file_lines(args.edits_file)
    check_output_folder(out, "--outdir")
    todo = [(number, record) for number, (record, _) in enumerate(lines)
            if not folder_complete(out / f"{number:05d}", record, args.num_images)]
    if todo:
        batches = edit_batches(args, [lines[number][1] for number, _ in todo], size)
        write_geneval_layout(batches, todo, out, desc="edit", unit="edit", whole=item_folder)
    kept = len(lines) - len(todo)
    print(f"{len(lines)} edits x {args.num_images} images in {out}/ (GenEval layout)"
          + (f"; {kept} folders complete from an earlier run kept" if kept else ""))
    return EXIT_OK


def edit_batches(args: argparse.Namespace, edits: list[Edit], size: dict[str, int]) -> Batches:
    """Load the model, check that it makes these edits at this size, and return the edits' batches of images
    (`call_batches`: drawn as they are read)."""
    model = load_for_command(args)
    check_editor(model, edits, args.model)
    if size:
        with user_input(f"--size {args.size}"):
            model.decoder.check_size(size["height"], size["width"])
    return call_batches(edit_call(model), edits, num_images=args.num_images, batch_size=args.batch_size,
                        seed=args.seed, steps=args.steps, guidance=args.guidance, **size)


def command_line_edit(inputs: list[str]) -> Edit:
    """IMAGE [IMAGE ...] INSTRUCTION -> the Edit, its images checked (exist, decode) before any model loads."""
    if len(inputs) < 2:
        raise BadInput(f"give the source image(s), then the instruction, e.g. {EXAMPLE}, or --edits-file FILE")
    *paths, instruction = inputs
    if not instruction.strip():
        raise BadInput("INSTRUCTION (the last argument) is empty; say what to change, e.g. \"make the circle blue\"")
    if Path(instruction).expanduser().is_file():
        raise BadInput(f"INSTRUCTION (the last argument) is the file {instruction}: give the instruction after the "
                       f"image(s), e.g. {EXAMPLE}")
    edit = Edit(tuple(Path(p).expanduser() for p in paths), instruction, "IMAGE")
    edit.images()
    return edit


def edits_file_lines(path: str) -> list[tuple[dict, Edit]]:
    """Each line of an edits file (JSON lines, {"image": PATH or [PATH, ...], "instruction": TEXT}) as its record
    and its Edit; relative image paths are to the file's folder. A bad line is bad input naming the file, the
    line and the field, found before any model loads (every image is opened and checked)."""
    lines = []
    for number, record in read_numbered_jsonl(path):
        where = f"{path}:{number}"
        instruction = record.get("instruction")
        if not isinstance(instruction, str) or not instruction.strip():
            raise BadInput(f"{where}: needs 'instruction', a non-empty string")
        image = record.get("image")
        paths = [image] if isinstance(image, str) else image
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p.strip() for p in paths):
            raise BadInput(f"{where}: needs 'image', an image path or a non-empty list of image paths")
        sources = tuple(Path(path).parent / Path(p).expanduser() for p in paths)  # an absolute path stays itself
        edit = Edit(sources, instruction, f"{where}: 'image'")
        edit.images()
        lines.append((record, edit))
    return lines


def check_editor(model, edits: list[Edit], name: str) -> None:
    """Bad input unless the model edits, and takes as many source images as each edit gives."""
    with user_input(f"--model {name}"):
        model.require_editing()  # CannotEdit, a ValueError, says why and what to do
    dit = model.config.dit
    most = dit.max_sources if dit.source_context else 1
    for edit in edits:
        if len(edit.sources) > most:
            takes = "one source image" if most == 1 else f"at most {most} source images"
            raise BadInput(f"{edit.where}: {len(edit.sources)} images, and --model {name} takes {takes} (its DiT "
                           f"reads the source as config dit.source {dit.source!r} says)")


def edit_call(model):
    """`draw(edits, **settings)` for `call_batches`: `Blip3o.edit` on the edits' images and instructions; what
    the model refuses of the images (an aspect ratio past its processor's) is bad input naming them."""
    def draw(edits: list[Edit], **settings) -> list[Image.Image]:
        where = edits[0].where if len(edits) == 1 else f"{edits[0].where} .. {edits[-1].where}"
        images = [edit.images() for edit in edits]
        with user_input(where):
            return model.edit(images, [edit.instruction for edit in edits], **settings)

    return draw


def edit_command() -> Command:
    return Command(("edit",), "edit images by an instruction", run_edit, flags=(
        flag("inputs", nargs="*", metavar="IMAGE ... INSTRUCTION",
             help="the source image file(s), then the instruction (the last argument); several images only for a "
                  "model whose DiT reads several (config dit.source \"context\" or \"both\": up to dit.max_sources)"),
        flag("--edits-file", metavar="FILE",
             help='JSON lines, one {"image": PATH, "instruction": TEXT} per line; "image" may be a list of paths '
                  "(several sources); a relative path is to the file's folder; every field is kept in "
                  "metadata.jsonl"),
        flag("--outdir", default="outputs", metavar="DIR", help="where the images go (default: outputs)"),
        count("--num-images", high=MAX_IMAGES, default=1,
              help=f"edited images per instruction, 1 to {MAX_IMAGES:,} (default 1)"),
        seed("--seed", default=0, help="random seed (default 0); same seed, same images"),
        flag("--size", default=None, metavar="N|WxH",
             help="edited image size in pixels: N for an N x N square, or WxH (width x height, e.g. 1344x768); "
                  "each side a multiple of the decoder's (32 for SDXL); default: the decoder's square"),
        count("--batch-size", high=MAX_BATCH, default=32,
              help="images per model call (default 32): instructions share a call while their images fit, and "
                   "one with more is split into calls of this many"),
        *model_flags(), *SAMPLING_FLAGS, *SPEED_FLAGS,
    ), refusals=(
        Refusal(("inputs",), lambda a: bool(a.edits_file),
                "cannot go with --edits-file: give IMAGE ... INSTRUCTION or --edits-file, not both"),
    ), usage="%(prog)s [options] IMAGE [IMAGE ...] INSTRUCTION\n       %(prog)s [options] --edits-file FILE",
        epilog=(
        f"IMAGE ... INSTRUCTION writes DIR/0000.png, 0001.png, ... and DIR/grid.png (the first {GRID_IMAGES}) and\n"
        "prints their paths. --edits-file writes GenEval's layout, a folder per line in order:\n"
        "DIR/00000/metadata.jsonl (the line's object), DIR/00000/samples/0000.png, ..., DIR/00000/grid.png.\n"
        "Each instruction is edited with the same --seed; a seed gives the same images for the same\n"
        "--num-images and --batch-size, as in `blip3o generate`. Every file (every folder) is written whole or\n"
        "not at all. Bad input stops the command before any file is written: a missing or unreadable image, an\n"
        "empty instruction, a bad line, a model that cannot edit, more images than the model reads.\n"
        "A rerun of --edits-file into the same DIR keeps each folder already complete (its metadata.jsonl equal\n"
        "to the line, --num-images samples) and edits the rest; it does not compare the other flags: give a new\n"
        "DIR to edit with other settings.\n\n"
        "examples:\n"
        f"  {EXAMPLE} --num-images 4 --seed 0 --outdir out/\n"
        '  blip3o edit shape.png colour.png "draw the first image\'s shape in the second\'s colour"\n'
        "  blip3o edit --edits-file edits.jsonl --outdir edits_out/ --num-images 4\n\n"
        "an edits file:\n"
        '  {"image": "scenes/0.png", "instruction": "make the circle blue"}\n'
        '  {"image": ["a.png", "b.png"], "instruction": "put the square of the first in the second"}'))
