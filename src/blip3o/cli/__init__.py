"""The `blip3o` command line: a table of commands, each declaring its flags, refusals and function.

| module        | what it owns                                                                   |
|---------------|--------------------------------------------------------------------------------|
| `entry.py`    | the entry point: the table from its modules, parse, run, exit code             |
| `table.py`    | `Command`, `Flag`, `Refusal`, `CommandTable` (argparse built from the table)   |
| `errors.py`   | exit codes and the rule that sorts failures: `BadInput`, `user_input`,         |
|               | `Interrupted` (Ctrl-C, saying what was written)                                |
| `commands.py` | the generic commands: ask, chat, reconstruct, serve, info, demo, convert,      |
|               | train STAGE (the Shapes world's are in blip3o/shapes/commands.py)              |
| `generate.py` | generate: prompts to image files, in bounded batches written as they finish    |
| `edit.py`     | edit: source images and instructions to image files, as generate writes them   |
| `models.py`   | --model/--device/--dtype, sampling and speed flags, loading                    |
| `numbers.py`  | numeric flags with a range, refused while parsing (NaN and infinities too)     |
| `files.py`    | JSON-lines and image files in; images and grids out, atomically; output checks |
| `terminal.py` | progress for people on stderr                                                  |
"""

from blip3o.cli.entry import main

__all__ = ["main"]
