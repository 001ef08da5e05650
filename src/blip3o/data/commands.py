"""The data commands; `register` adds them to the command table (blip3o/cli/table.py):

    blip3o data check SPEC     read a data set once and report good and bad samples, images and texts
    blip3o data clip-targets   compute every sample's CLIP target tokens once, for the generation stage
"""

from __future__ import annotations

import argparse
import json

from blip3o.cli.errors import EXIT_OK, BadInput, user_input
from blip3o.cli.numbers import count
from blip3o.cli.table import Command, CommandTable, flag

CHECK_EPILOG = """\
SPEC names the data as training reads it: shards (data/{00000..00127}.tar, a glob, a folder of *.tar), a JSONL
file of {"image", "caption"|"prompt"|"text"}, a folder of images with .txt captions, LLaVA conversations (.json
or .jsonl), edit triplets (shards of src.*, tgt.*, txt members, or JSONL of {"source", "instruction", "target"}),
a mixture (a.tar::0.7,b.jsonl::0.3) or a YAML/JSON spec file (docs/training.md, "Your own data").

exit codes:
  0  the data set was read (bad samples are reported and skipped, as training skips them)
  2  the spec cannot be read (a missing file, an empty pattern, a bad weight), no sample is good,
     or --strict and some sample is bad

examples:
  blip3o data check "data/{00000..00009}.tar"
  blip3o data check llava_v1_5_mix665k.json --image-root /data/llava --limit 2000
  blip3o data check "shards/*.tar::0.7,captions.jsonl::0.3" --strict --json"""


def run_data_check(args: argparse.Namespace) -> int:
    from .check import check_dataset

    if args.limit is not None and args.limit < 1:
        raise BadInput(f"--limit must be positive, got {args.limit}")
    with user_input():
        report = check_dataset(args.spec, image_root=args.image_root, limit=args.limit)
    print(json.dumps(report.to_dict(), indent=2) if args.json else "\n".join(report.lines()), flush=True)
    total = report.total
    if not total.good:
        raise BadInput(f"no good sample in {args.spec}")
    if args.strict and total.bad_total:
        raise BadInput(f"{total.bad_total} bad samples (--strict)")
    return EXIT_OK


def check_command() -> Command:
    return Command(("data", "check"), "read a data set once: good and bad samples, images, texts",
                   run_data_check, epilog=CHECK_EPILOG, flags=(
        flag("spec", metavar="SPEC", help="the data, as training names it (see below)"),
        flag("--image-root", metavar="DIR",
             help="where image paths of JSONL and LLaVA files resolve (default: each file's folder)"),
        flag("--limit", type=int, default=None, metavar="N", help="read only the first N records of each source"),
        flag("--json", action="store_true", help="print the report as one JSON object"),
        flag("--strict", action="store_true", help="exit 2 when any sample is bad"),
    ))


TARGETS_EPILOG = """\
Writes OUT/manifest.json (the encoder's config and a fingerprint of its weights, the dtype, the spec, the count)
and one safetensors shard of tokens and texts per piece of the data (a tar shard, 1000 JSONL lines or folder
images). Under torchrun rank r computes pieces r, r+N, ...; a rerun computes only the shards not on disk.
Train from OUT by naming it as the generation stage's data (docs/training.md, "CLIP-target cache").

exit codes:
  0  every shard is on disk and the manifest is complete
  2  the spec cannot be read, a source is not image-text, the model's CLIP encoder is random, or OUT holds
     a cache of another encoder, dtype or spec

examples:
  blip3o data clip-targets --model nano --data "data/{00000..00009}.tar" --out targets/
  torchrun --nproc_per_node 8 -m blip3o.cli data clip-targets --model BLIP3o-Model-8B --data photos.jsonl \\
      --out targets/ --batch-size 128 --dtype bf16 --device cuda"""


def run_clip_targets(args: argparse.Namespace) -> int:
    import torch

    from blip3o.cli.models import load_model
    from blip3o.distributed import init_world, local_device, shutdown

    from .targets import build_cache

    with user_input("--device"):
        if args.device != "auto":
            torch.device(args.device)  # a name torch cannot read is refused here, before any process group
    gpu = args.device != "cpu" and torch.cuda.is_available()
    world = init_world(torch.device("cuda" if gpu else "cpu"))
    device = local_device(args.device, world)
    with user_input("--model"):
        model = load_model(args.model, str(device), None)
    with user_input():
        report = build_cache(model, args.data, args.out, batch_size=args.batch_size, dtype=args.dtype, world=world,
                             image_root=args.image_root)
    print(f"rank {world.rank}: {report.line()}", flush=True)
    shutdown(world)
    return EXIT_OK


def clip_targets_command() -> Command:
    from blip3o import DEFAULT_MODEL
    from blip3o.cli.models import model_name

    from .targets import DTYPES

    return Command(("data", "clip-targets"), "compute every sample's CLIP target tokens once (a cache that the "
                   "generation stage trains from)", run_clip_targets, epilog=TARGETS_EPILOG, flags=(
        flag("--model", type=model_name, default=DEFAULT_MODEL, help="preset or model folder whose CLIP encoder "
                                                                     f"makes the targets (default: {DEFAULT_MODEL})"),
        flag("--data", required=True, metavar="SPEC", help="the image-text data, as `data check` names it"),
        flag("--out", required=True, metavar="DIR", help="the cache folder (new, or one this command started)"),
        count("--batch-size", high=65536, default=64, help="images encoded at once (default: 64)"),
        flag("--dtype", choices=list(DTYPES), default="bf16", help="the stored tokens' dtype (default: bf16)"),
        flag("--device", default="auto", help="auto (cuda:LOCAL_RANK where CUDA is available), cpu, cuda, cuda:N"),
        flag("--image-root", metavar="DIR", help="where image paths of JSONL files resolve (default: each file's "
                                                 "folder)"),
    ))


def register(table: CommandTable) -> None:
    """Add `data check` and `data clip-targets` to the `data` group."""
    table.add(check_command())
    table.add(clip_targets_command())
