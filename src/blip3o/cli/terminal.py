"""What commands tell people while they work: stderr, and only on a terminal (stdout carries results)."""

from __future__ import annotations

import sys


def note(message: str) -> None:
    """A line of progress chatter."""
    if sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)


def progress(iterable, **kwargs):
    """tqdm's bar over `iterable` (kwargs: tqdm's), drawn only on a terminal."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None, file=sys.stderr, **kwargs)  # disable=None: bars only on a terminal
