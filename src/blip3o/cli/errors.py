"""Exit codes, and the one rule that sorts a failure into them.

    0    success
    1    failure: any exception the rule below does not call bad input (a bug, CUDA out of memory, a full disk)
    2    bad usage or bad input: argparse's own errors, `BadInput`, `CheckpointError`
    130  interrupted (Ctrl-C); a command that writes files says what it finished (`Interrupted`)

Bad input is what a check of the user's values raised, before the work it guards. The command line's
own checks raise `BadInput`; a library check that a command runs on the user's values runs inside
`user_input()`, which turns its ValueError or TypeError into `BadInput`; `CheckpointError` is the
library's error for a checkpoint folder that cannot be read as asked, and folders are what users
name. Every other exception is a failure, a ValueError raised in the middle of the work included:
exit 1 with a one-line message, and the traceback under BLIP3O_DEBUG=1.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class BadInput(ValueError):
    """The user's input (arguments, files) is wrong; the message says which and what to do. Exit code 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with what the command finished before it ("12 of 40 prompts written to out/; ..."). Exit code
    130."""


@contextmanager
def interrupted_after(finished: Callable[[], str]) -> Iterator[None]:
    """Ctrl-C inside the block becomes `Interrupted(finished())`: `finished` says, when it comes, what the
    command wrote so far and what it did not."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt as e:
        raise Interrupted(finished()) from e


@contextmanager
def user_input(where: str = "") -> Iterator[None]:
    """Run a library check of the user's values: its ValueError or TypeError becomes BadInput (prefixed
    with `where`, e.g. the flag or file the values came from)."""
    try:
        yield
    except BadInput:
        raise
    except (ValueError, TypeError) as e:
        raise BadInput(f"{where}: {e}" if where else str(e)) from e


def exit_code(error: BaseException) -> int:
    """The rule of this module's docstring."""
    from blip3o.checkpoints import CheckpointError

    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, (BadInput, CheckpointError)):
        return EXIT_BAD_INPUT
    return EXIT_FAILURE


def debugging() -> bool:
    """BLIP3O_DEBUG set (to anything but 0): failures print their traceback."""
    return os.environ.get("BLIP3O_DEBUG", "") not in ("", "0")


def report(command: str, error: BaseException) -> int:
    """Tell the user on stderr what stopped `blip3o COMMAND` (a failure in one line); returns the exit code."""
    code = exit_code(error)
    if debugging() and code != EXIT_INTERRUPTED:
        traceback.print_exception(error, file=sys.stderr)
    if code == EXIT_INTERRUPTED:
        line = f"interrupted: {error}" if str(error) else "interrupted"
    elif code == EXIT_BAD_INPUT:
        line = f"error: {error}"  # written for the user: said whole
    else:
        first_line = (str(error).strip().splitlines() or [""])[0]
        hint = "" if debugging() else " (BLIP3O_DEBUG=1 shows the traceback)"
        line = f"failed ({type(error).__name__}): {first_line}{hint}"
    print(f"blip3o {command}: {line}", file=sys.stderr, flush=True)
    return code
