"""Folders replaced whole: written beside their place, synced to disk, then swapped in.

`write_folder(path, fill)` is how model folders are saved (`Blip3o.save_pretrained`): a reader, or a crash
at any moment, sees the previous folder or the new one, never a mix. On Linux the new folder and the old
one trade places in one step (renameat2 with RENAME_EXCHANGE), so `path` always exists; where the platform
or filesystem cannot swap folders, the old one is first moved aside (`.NAME.old-*`) and the new one renamed
in, so a crash between the two renames leaves the old folder whole beside its place. The training
checkpoints (`blip3o.checkpoints.resumable`) build on `swap_in` and recover from either.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

AT_FDCWD = -100  # renameat2: paths relative to the working folder (<fcntl.h>)
RENAME_EXCHANGE = 2  # renameat2: swap the two paths (<linux/fs.h>)


def _renameat2() -> Callable | None:
    """glibc's renameat2, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap paths `a` and `b` in one atomic step: True when done, False where the platform or the filesystem
    cannot (the caller then renames twice)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def rename(source: Path, target: Path) -> None:
    """`os.replace`, then the parent folder synced so that the rename survives a power loss."""
    os.replace(source, target)
    sync_folder(target.parent)


def swap_in(new: Path, target: Path) -> Path | None:
    """Put folder `new` at `target` (same parent folder). Returns where the folder it replaced now lies, for
    the caller to remove, or None when there was none."""
    if not os.path.lexists(target):
        rename(new, target)
        return None
    if exchange(new, target):
        sync_folder(target.parent)
        return new
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    rename(target, old)  # a crash from here to the next rename leaves no `target`, and `old` whole
    rename(new, target)
    return old


def write_folder(directory: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create or replace `directory` whole: `fill(tmp)` writes into a temporary sibling, which is synced and
    swapped in; the folder it replaces is removed. An error in `fill` removes the temporary and leaves
    `directory` as it was."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        fill(tmp)
        sync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replaced = swap_in(tmp, directory)
    if replaced is not None:
        remove(replaced)
    return directory


def remove(path: Path) -> None:
    """Remove a folder (or a file or link standing where a folder was)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def sync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` (itself included) to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            sync_file(Path(root, name))
        sync_folder(Path(root))


def sync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def sync_folder(path: Path) -> None:
    """Flush a folder's entries (the names renamed or created in it) to disk; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
