"""`blip3o`'s entry point: build the command table, parse, run the command, turn its failure into an exit code."""

from __future__ import annotations

import importlib

from blip3o.cli.errors import EXIT_BAD_INPUT, report
from blip3o.cli.table import CommandTable

# Modules whose `register(table)` adds commands: the generic ones, then the Shapes world's data, recipe and
# evaluation (targets of the `data`, `train` and `eval` groups), and the benchmark scorers (`eval score`).
COMMAND_MODULES = ("blip3o.cli.commands", "blip3o.shapes.commands", "blip3o.evals.score.commands",
                   "blip3o.evals.run.commands",  # the benchmark runners (`eval geneval`, `eval mme`, ...)
                   "blip3o.data.commands")

DESCRIPTION = "BLIP3-o: understand and generate images."
EPILOG = """\
examples:
  blip3o generate "a red circle left of a blue square" --num-images 4 --seed 0 --outdir out/
  blip3o generate --prompts-file prompts.jsonl --outdir geneval_out/ --num-images 4 --seed 0
  blip3o edit out/0000.png "make the circle blue" --outdir edited/
  blip3o ask out/0000.png "how many circles are there?"
  blip3o ask --questions-file questions.jsonl --out answers.jsonl
  blip3o chat --image out/0000.png
  blip3o serve --port 8000                 # then open http://127.0.0.1:8000/
  blip3o info --model blip3o-8b --meta

models:
  --model takes a preset (debug, nano, blip3o-4b, blip3o-8b) or a local checkpoint folder; the default is
  nano, the Shapes-world model whose weights ship in the package. Nothing is ever downloaded: for a hub
  model, download its folder first and pass the path.

exit codes:
  0 success, 1 failure, 2 bad usage or bad input, 130 interrupted
  (set BLIP3O_DEBUG=1 to see the traceback of a failure)

Run `blip3o COMMAND --help` for a command's options."""


def command_table() -> CommandTable:
    """Every command of COMMAND_MODULES."""
    table = CommandTable(DESCRIPTION, EPILOG)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(table)
    return table


def main(argv: list[str] | None = None) -> int:
    """Run `blip3o ARGV...`; returns the exit code (errors.py)."""
    try:
        args = command_table().parse(argv)
    except SystemExit as e:  # --help (0) or bad usage (2): returned, so callers and tests see the code
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    from blip3o.allocator import keep_freed_memory

    keep_freed_memory()  # CPU work reuses its freed activations instead of faulting in fresh pages (allocator.py)
    try:
        return args.command.run(args)
    except (Exception, KeyboardInterrupt) as error:
        return report(args.command.name, error)
