"""The server's memory budget, and giving freed memory back to the operating system.

The queue bounds how many requests wait; the budget bounds what they hold. Each request reserves,
before anything is decoded, the bytes it will hold at its largest (its images, encoded and decoded,
`ServerConfig.memory_budget_bytes`), and gives them back when it ends. A request that does not fit
beside the others gets 429; one larger than the whole budget could never fit and gets 413.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
import threading

RETURN_AFTER_BYTES = 64 * 1024 * 1024  # freeing this much at once is worth a malloc_trim (a few ms)


class BudgetFull(Exception):
    """The request would fit the budget, but not beside what other requests hold now: come back later."""


class LargerThanBudget(Exception):
    """The request alone needs more than the whole budget."""


class MemoryBudget:
    """Bytes held by queued and running requests, at most `capacity`; thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    def reserve(self, nbytes: int) -> Reservation:
        """Hold `nbytes` until the returned reservation is released. Raises LargerThanBudget or BudgetFull."""
        if nbytes > self.capacity:
            raise LargerThanBudget(f"it needs {nbytes:,} bytes; this server's whole memory budget is "
                                   f"{self.capacity:,}")
        with self._lock:
            if self._held + nbytes > self.capacity:
                raise BudgetFull(f"requests hold {self._held:,} of {self.capacity:,} bytes of memory; this one "
                                 f"needs {nbytes:,}")
            self._held += nbytes
        return Reservation(self, nbytes)

    def _give_back(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes


class Reservation:
    """Bytes a request holds in a `MemoryBudget`; `release` gives them back (once, however often called)."""

    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self.nbytes = nbytes
        self._budget: MemoryBudget | None = budget
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.nbytes)


def return_freed_memory(nbytes: int) -> None:
    """After `nbytes` were freed: hand the allocator's free pages back to the system (glibc's malloc_trim)
    when that is much. glibc keeps freed blocks for reuse, all of them when `blip3o.allocator` tunes it,
    so a server that once decoded large images would otherwise stay that large while idle."""
    trim = _malloc_trim()
    if trim is not None and nbytes >= RETURN_AFTER_BYTES:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None off glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and others have none
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim
