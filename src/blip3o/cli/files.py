"""The files commands read (JSON lines, images) and write (images, grids); bad input names file and line."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from blip3o.cli.errors import BadInput, user_input
from blip3o.images import image_grid


def read_jsonl(path: str, required: dict[str, type]) -> list[dict]:
    """Objects of a JSON-lines file, each checked for the `required` keys and their types."""
    file = Path(path)
    if not file.is_file():
        raise BadInput(f"{path}: no such file")
    records = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise BadInput(f"{path}:{number}: each line must be a JSON object")
        for key, kind in required.items():
            if not isinstance(record.get(key), kind) or (kind is str and not record[key].strip()):
                raise BadInput(f"{path}:{number}: needs {key!r}, a non-empty {kind.__name__}")
        records.append(record)
    if not records:
        raise BadInput(f"{path} holds no records")
    return records


def open_image(path: Path, where: str) -> Image.Image:
    """A readable image file -> PIL image in its own mode (each reader converts it its own way); anything else is
    bad input naming `where`."""
    from PIL import UnidentifiedImageError

    from blip3o.images import check_images

    if not path.is_file():
        raise BadInput(f"{where}: no image file {path}")
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise BadInput(f"{where}: {path} is not an image this build can read ({e})") from e
    with user_input(where):  # too small, too big, a mode with no RGB reading
        return check_images([image], name=str(path))[0]


def save_samples(images: list[Image.Image], folder: Path, grid: Path | None = None) -> Path:
    """FOLDER/0000.png, 0001.png, ... and their grid (4 a row; default FOLDER/grid.png); returns the grid."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:04d}.png")
    grid = grid or folder / "grid.png"
    image_grid(images, columns=min(4, len(images))).save(grid)
    return grid
