"""The data commands; `register` adds them to the command table (blip3o/cli/table.py):

    blip3o data check SPEC     read a data set once and report good and bad samples, images and texts
"""

from __future__ import annotations

import argparse
import json

from blip3o.cli.errors import EXIT_OK, BadInput, user_input
from blip3o.cli.table import Command, CommandTable, flag

CHECK_EPILOG = """\
SPEC names the data as training reads it: shards (data/{00000..00127}.tar, a glob, a folder of *.tar), a JSONL
file of {"image", "caption"|"prompt"|"text"}, a folder of images with .txt captions, LLaVA conversations (.json
or .jsonl), a mixture (a.tar::0.7,b.jsonl::0.3) or a YAML/JSON spec file (docs/training.md, "Your own data").

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


def register(table: CommandTable) -> None:
    """Add `data check` to the `data` group."""
    table.add(check_command())
