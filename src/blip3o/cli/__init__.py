"""The `blip3o` command line: a table of commands, each declaring its flags, refusals and function.

| module        | what it owns                                                                   |
|---------------|--------------------------------------------------------------------------------|
| `entry.py`    | the entry point: the table from its modules, parse, run, exit code             |
| `table.py`    | `Command`, `Flag`, `Refusal`, `CommandTable` (argparse built from the table)   |
| `errors.py`   | exit codes and the rule that sorts failures: `BadInput`, `user_input`          |
| `commands.py` | the generic commands: generate, ask, chat, reconstruct, serve, info, demo,     |
|               | convert, train STAGE (the Shapes world's are in blip3o/shapes/commands.py)     |
| `models.py`   | --model/--device/--dtype, sampling and speed flags, loading                    |
| `files.py`    | JSON-lines and image files in, images and grids out                            |
| `terminal.py` | progress for people on stderr                                                  |
"""

from blip3o.cli.entry import main

__all__ = ["main"]
