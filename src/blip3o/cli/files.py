"""The files commands read (JSON lines, images) and write (images, grids); bad input names file and line.

Every file a command writes is written atomically (`blip3o.files`): an interrupted command leaves each
output whole or absent, never a part of one.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from blip3o.cli.errors import BadInput
from blip3o.files import json_lines, save_image
from blip3o.images import image_grid

GRID_IMAGES = 16  # a grid shows the first 16 images (4 rows of 4): a glance, whatever the count


def readable_file(path: str | Path, where: str) -> Path:
    """`path` if it is a regular file this process can open; else BadInput naming `where` (a FIFO or a device
    is refused unopened: reading one would block or never end)."""
    file = Path(path).expanduser()
    if not file.exists():
        raise BadInput(f"{where}: no such file")
    if not file.is_file():
        raise BadInput(f"{where}: not a regular file")
    try:
        with open(file, "rb"):
            pass
    except OSError as e:
        raise BadInput(f"{where}: cannot be read ({e.strerror or e})") from e
    return file


def read_text(path: str | Path, where: str | None = None) -> str:
    """The UTF-8 text of a regular file (`readable_file`, messages naming `where`, default the path); text that
    is not UTF-8 is bad input naming the path and the byte."""
    try:
        return readable_file(path, where or str(path)).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text (byte {e.start})") from e


def read_numbered_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for each record of a JSON-lines file; bad input if a line is not a JSON object or
    the file holds none."""
    records = json_lines(read_text(path), path, BadInput)
    if not records:
        raise BadInput(f"{path} holds no records")
    return records


def read_jsonl(path: str, required: dict[str, type]) -> list[dict]:
    """Objects of a JSON-lines file, each checked for the `required` keys and their types."""
    records = read_numbered_jsonl(path)
    for number, record in records:
        for key, kind in required.items():
            if not isinstance(record.get(key), kind) or (kind is str and not record[key].strip()):
                raise BadInput(f"{path}:{number}: needs {key!r}, a non-empty {kind.__name__}")
    return [record for _, record in records]


def open_image(path: Path, where: str) -> Image.Image:
    """An image file -> PIL image in its own mode (each reader converts it its own way), through
    `blip3o.images.admit_image` (regular files only, decompression bombs refused before they expand); anything
    else is bad input naming `where`."""
    from blip3o.images import ImageRejected, admit_image

    if not path.exists():
        raise BadInput(f"{where}: no image file {path}")
    try:
        return admit_image(path, name=f"{where} {path}")
    except ImageRejected as e:
        raise BadInput(str(e)) from e


def check_output_folder(path: Path, where: str) -> None:
    """BadInput unless `path` is a folder this process can write into, or one it can create: checked before
    the work, so that a bad output path never costs a model load or a run."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BadInput(f"{where} {path} is not a folder" if existing == path
                       else f"{where} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"{where} {path}: {existing} is not writable")


def check_output_file(path: Path, where: str) -> None:
    """BadInput unless a file can be written at `path` (not a folder; its folder writable or creatable)."""
    if path.is_dir():
        raise BadInput(f"{where} {path} is a folder; give a file name")
    check_output_folder(path.parent, where)


class SampleWriter:
    """FOLDER/0000.png, 0001.png, ... written as batches of images arrive (each file atomically), then a grid of
    the first GRID_IMAGES, 4 a row: memory holds one batch and the grid's images, whatever the count."""

    def __init__(self, folder: Path, grid: Path | None = None) -> None:
        self.folder, self.grid = folder, grid or folder / "grid.png"
        self.paths: list[Path] = []  # the images written so far
        self._shown: list[Image.Image] = []

    @property
    def written(self) -> int:
        return len(self.paths)

    def add(self, images: list[Image.Image]) -> None:
        for image in images:
            self.paths.append(save_image(image, self.folder / f"{self.written:04d}.png"))
        self._shown += images[:GRID_IMAGES - len(self._shown)]

    def finish(self) -> Path:
        """Write the grid; returns its path."""
        return save_image(image_grid(self._shown, columns=min(4, len(self._shown))), self.grid)
