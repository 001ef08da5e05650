"""What every benchmark runner shares: which items this process runs, what is done already, and the settings file.

    world = join_world()                                    # torchrun's ranks (a plain run is a world of one)
    for step in my_steps(items, batch_size, world, done):   # step k (items k*B .. k*B+B-1) goes to rank k % N
        ...                                                 # each item's output written with item_file/item_folder
    finish(world)                                           # every rank's items are on disk: rank 0 goes on alone

A step holds the same items whatever the number of processes, so N processes compute what one process computes,
batch for batch, and write the same files. Outputs are written atomically (`blip3o.files`): a run killed at any
moment leaves complete items only, and a rerun does only what is missing. A killed write can leave a temporary
beside its item; the rank that writes the item next removes it first.

`settings.json` beside the outputs records how they were made. A rerun into the same folder with other settings
is refused, so one folder never mixes the outputs of two settings.
"""

from __future__ import annotations

import contextlib
import glob
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from blip3o.cli.errors import BadInput
from blip3o.cli.files import read_text
from blip3o.cli.terminal import progress
from blip3o.distributed import World, barrier, init_world, shutdown
from blip3o.files import atomic_file, atomic_folder, write_text

T = TypeVar("T")

SETTINGS_NAME = "settings.json"
# settings that change how fast the outputs are made, not what they are: a rerun may change them
RUN_ONLY = ("device", "batch_size")


def join_world() -> World:
    """The process group torchrun describes, over gloo whatever the device: the runners exchange no tensors, they
    only wait for each other, and gloo waits without a GPU."""
    return init_world(torch.device("cpu"))


def place_device(device: str | None, world: World) -> str | None:
    """The device of this process: under torchrun a bare `cuda` is the GPU of its local rank."""
    if device == "cuda" and world.size > 1:
        return f"cuda:{world.local_rank}"
    return device


def my_steps(items: Sequence[T], batch_size: int, world: World, done: Callable[[T], bool]) -> list[list[T]]:
    """This rank's steps: step k holds items k*batch_size .. (k+1)*batch_size - 1 and goes to rank k % world size;
    each keeps only its items not done yet (a step with none left is dropped)."""
    steps = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
    mine = [[item for item in step if not done(item)] for k, step in enumerate(steps) if k % world.size == world.rank]
    return [step for step in mine if step]


@contextlib.contextmanager
def step_bar(world: World, steps: list[list], desc: str) -> Iterator[Callable[[int], object]]:
    """A progress bar over this rank's items (drawn by rank 0 only, on a terminal); yields its `update`."""
    if not world.is_main:
        yield lambda n: None
        return
    with progress(None, total=sum(len(step) for step in steps), desc=desc, unit="item") as bar:
        yield bar.update


def finish(world: World) -> None:
    """Wait until every rank has written its items, then leave the process group: rank 0 goes on alone."""
    barrier(world)
    shutdown(world)


def clear_leftovers(path: Path) -> None:
    """Remove the temporaries a killed write of `path` left beside it (`blip3o.files` names them `.NAME.*`)."""
    for name in glob.glob(glob.escape(str(path.parent / f".{path.name}.")) + "*"):
        stale = Path(name)
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def item_file(path: Path) -> Iterator[Path]:
    """`atomic_file(path)`, after removing what a killed write of it left."""
    clear_leftovers(path)
    with atomic_file(path) as tmp:
        yield tmp


@contextlib.contextmanager
def item_folder(path: Path) -> Iterator[Path]:
    """`atomic_folder(path)`, after removing what a killed write of it left."""
    clear_leftovers(path)
    with atomic_folder(path) as tmp:
        yield tmp


def check_settings(out: Path, settings: dict) -> dict:
    """`settings` as JSON reads them back; BadInput if OUT/settings.json records other ones (RUN_ONLY aside)."""
    settings = json.loads(json.dumps(settings))
    path = out / SETTINGS_NAME
    if not path.is_file():
        return settings
    try:
        before = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path} is not valid JSON ({e}): remove it, and the outputs beside it, to start over") from e
    changed = [key for key in sorted(set(before) | set(settings))
               if key not in RUN_ONLY and before.get(key) != settings.get(key)]
    if changed:
        key = changed[0]
        raise BadInput(f"{out} holds outputs made with other settings ({key}: {before.get(key)!r} there, "
                       f"{settings.get(key)!r} now, per {path}): rerun with the same settings to finish them, or "
                       f"write to another --out")
    return settings


def write_settings(out: Path, settings: dict) -> Path:
    return write_text(out / SETTINGS_NAME, json.dumps(settings, indent=2) + "\n")


def start_outputs(out: Path, settings: dict, world: World) -> None:
    """Refuse a folder made with other settings (every rank checks, so each stops with the same message), then
    record these ones (rank 0) before any output is written."""
    settings = check_settings(out, settings)
    if world.is_main:
        write_settings(out, settings)
    barrier(world)


def read_json(path: Path, flag: str = "--data"):
    """A benchmark's JSON file; a missing or malformed one is bad input naming the file (and the line)."""
    try:
        return json.loads(read_text(path, f"{flag} {path}"))
    except json.JSONDecodeError as e:
        raise BadInput(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
