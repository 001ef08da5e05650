"""Output files written atomically: a reader, or a run interrupted at any moment, sees the whole file or
the one before it, never a part. And the one parse of JSON-lines input that commands and scorers share.

Each is written under a temporary name in its own folder (so the rename stays on one filesystem),
flushed to disk, then renamed into place; an error or Ctrl-C in between removes the temporary.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`; what the block writes there becomes `path` when the block ends
    without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_image(image: Image.Image, path: str | Path) -> Path:
    """`image.save(path)` atomically; the format follows the suffix as PIL's own save does."""
    path = Path(path)
    with atomic_file(path) as tmp:
        image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    return path


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A temporary folder beside `path`; when the block ends without an error it replaces `path` whole
    (an existing `path` is moved aside first and removed after). Otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def json_lines(text: str, path: str | Path, error: type[ValueError] = ValueError) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of JSON-lines `text` read from `path`; a line that is not
    valid JSON, or not an object, raises `error` naming the path and the line."""
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise error(f"{path}:{number}: each line must be a JSON object")
        records.append((number, record))
    return records
