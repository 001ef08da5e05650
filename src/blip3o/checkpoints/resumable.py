"""Training checkpoints that survive a crash at any moment: a run is never left without its newest complete
checkpoint, and the next start finds it.

    OUT/checkpoint/            the checkpoint a run resumes from; complete whenever it exists
        trainer_state.pt       (what the trainer's `fill` writes)
        shards/                a sharded run's parameters, AdamW state and EMA (torch.distributed.checkpoint:
                               each process writes its own shards, `save_shards`; any number of processes
                               reads them back, `load_shards`)
        complete.json          {"step": N}, written last, once every other file is on disk
    OUT/.checkpoint.tmp-*      a checkpoint being written; after a swap, the one it replaced
    OUT/.checkpoint.old-*      the one replaced, where folders cannot be swapped in one step

`save` writes a temporary folder, syncs it, writes complete.json into it, swaps it in for checkpoint/
(`blip3o.checkpoints.atomic.swap_in`: one atomic exchange on Linux, else two renames) and removes the one it
replaced, complete.json first, so that a partly removed folder is never taken for a complete one. Whatever
a crash (kill -9, power loss) interrupts, a complete checkpoint of the newest step saved survives:

    while writing              the temporary has no complete.json; checkpoint/ is the previous one
    after complete.json        checkpoint/ is the previous one; the temporary holds the new one, complete
    between the two renames    no checkpoint/; the previous one is .checkpoint.old-*, the new one the temporary
    after the swap             checkpoint/ is the new one; the previous one lies beside it, complete or not

`recover`, which the trainer runs before it resumes, makes checkpoint/ the complete folder of the highest
step, promoting a temporary or a moved-aside one where that is it, and removes every other: the stale and
the incomplete. It returns one line for each thing it did, for the log.

`save_shared` is `save` for a checkpoint every process writes a part of: rank 0 makes the temporary folder,
every rank fills it, and rank 0 completes and swaps it in once all have written.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo

from blip3o.checkpoints import CheckpointError, read_json, unpickling_reason
from blip3o.checkpoints.atomic import remove, swap_in, sync_file, sync_folder, sync_tree
from blip3o.distributed import World, barrier, broadcast

NAME = "checkpoint"
MARKER = "complete.json"
LEFTOVERS = (f".{NAME}.tmp-", f".{NAME}.old-")  # prefixes of the folders a save leaves while it runs
SHARDS = "shards"  # the torch.distributed.checkpoint folder inside a checkpoint


def save(out_dir: str | Path, step: int, fill: Callable[[Path], None]) -> Path:
    """Write OUT/checkpoint/ for `step`: `fill(folder)` writes the state into a temporary folder, which becomes
    the checkpoint once complete (see the module docstring). An error in `fill` removes the temporary."""
    return save_shared(out_dir, step, fill, World())


def save_shared(out_dir: str | Path, step: int, fill: Callable[[Path], None], world: World) -> Path:
    """`save` for a checkpoint that every rank writes a part of: rank 0 makes the temporary folder, every rank
    runs `fill(folder)` (collectives inside it are fine: all ranks run it), and once all have written, rank 0
    completes it and swaps it in. Every rank returns when checkpoint/ is the new one."""
    out = Path(out_dir)
    tmp = Path(broadcast(str(make_temporary(out)) if world.is_main else None, world))
    try:
        fill(tmp)
        barrier(world)
    except BaseException:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if world.is_main:
        complete(out, tmp, step)
    barrier(world)
    return out / NAME


def make_temporary(out: Path) -> Path:
    """A fresh temporary checkpoint folder in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=LEFTOVERS[0], dir=out))


def complete(out: Path, tmp: Path, step: int) -> Path:
    """Sync the filled temporary folder, mark it complete and swap it in for checkpoint/."""
    try:
        sync_tree(tmp)
        write_marker(tmp, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replaced = swap_in(tmp, out / NAME)
    if replaced is not None:
        discard(replaced)
    return out / NAME


def recover(out_dir: str | Path) -> list[str]:
    """Make OUT/checkpoint/ the newest complete checkpoint a crash left, and remove the other leftovers of
    `save`; returns what it did, one line each (nothing when there was nothing to do)."""
    out, notes = Path(out_dir), []
    if not out.is_dir():
        return notes
    target = out / NAME
    leftovers = sorted(p for p in out.iterdir() if p.name.startswith(LEFTOVERS))
    complete = {p: step for p in leftovers if (step := read_marker(p)) is not None}
    newest = max(complete, key=complete.__getitem__, default=None)
    # checkpoint/ is complete whenever it exists (one without complete.json counts as older than any leftover)
    current = read_marker(target) if target.is_dir() else None
    current_step = -1 if current is None else current
    if newest is not None and (not os.path.lexists(target) or complete[newest] > current_step):
        replaced = swap_in(newest, target)
        notes.append(f"{out}: resuming from {newest.name} (step {complete[newest]}), a complete checkpoint that a "
                     f"crash left before it became {NAME}/")
        leftovers = [p for p in leftovers if p != newest] + ([replaced] if replaced is not None else [])
    for path in leftovers:
        if os.path.lexists(path):
            step = read_marker(path)
            discard(path)
            what = "incomplete" if step is None else f"superseded, step {step}"
            notes.append(f"{out}: removed {path.name} ({what}), a leftover of an interrupted checkpoint save")
    return notes


def write_marker(folder: Path, step: int) -> None:
    """complete.json: the folder's files are all on disk and hold the state after `step` steps."""
    path = folder / MARKER
    path.write_text(json.dumps({"step": step}))
    sync_file(path)
    sync_folder(folder)


def read_marker(folder: Path) -> int | None:
    """The step a folder's complete.json names; None for a folder without a valid one (incomplete)."""
    try:
        step = read_json(folder / MARKER).get("step")
    except CheckpointError:
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def discard(folder: Path) -> None:
    """Remove a checkpoint folder, complete.json first: a removal cut short leaves an incomplete folder."""
    if (folder / MARKER).is_file():
        (folder / MARKER).unlink()
        sync_folder(folder)
    remove(folder)


# ------------------------------------------------------------------ sharded state (torch.distributed.checkpoint)

# What a checkpoint's shards/.metadata may name: torch.distributed.checkpoint's own metadata records, tensor
# sizes, dtypes and layouts, and paths. torch's reader unpickles the file with no restriction (a crafted one
# could run any code); `load_shards` reads it with these alone.
METADATA_GLOBALS = {
    **{("torch.distributed.checkpoint.metadata", n): getattr(dcp_metadata, n)
       for n in ("Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
                 "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    **{("pathlib", n): getattr(pathlib, n) for n in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")},
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint .metadata, refusing any global outside `METADATA_GLOBALS` (and
    torch's dtypes)."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in METADATA_GLOBALS:
            return METADATA_GLOBALS[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")


class SafeReader(dcp.FileSystemReader):
    """torch's file reader with the metadata read by `MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        metadata = read_metadata(path)
        if metadata.storage_meta is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """torch's load planner with the non-tensor entries (numbers, strings: the optimizer's hyper-parameters)
    read by torch.load(weights_only=True), not unrestricted unpickling."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"entry {read_item.dest_index.fqn} holds objects a checkpoint never holds (only "
                                  f"tensors, numbers, strings, lists and dicts are read): {unpickling_reason(e)}"
                                  ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def read_metadata(path: Path) -> dcp_metadata.Metadata:
    """A shards folder's .metadata, read by `MetadataUnpickler`; anything else in it is refused with a
    CheckpointError (nothing in it runs)."""
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"refusing to load {path}: it holds objects checkpoint metadata never holds "
                              f"({e}). Delete the checkpoint or use another out_dir") from None
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"refusing to load {path}: it is not checkpoint metadata "
                              f"(a {type(metadata).__name__}). Delete the checkpoint or use another out_dir")
    return metadata


@contextmanager
def single_process_quiet() -> Iterator[None]:
    """Without torch's warning that a single process saves or loads: one process is a run this module expects."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_shards(state: dict, folder: Path) -> None:
    """Write `state` (nested dicts of tensors, DTensors and numbers) to `folder` with torch.distributed.checkpoint:
    every rank its own shards, rank 0 the metadata. All ranks call it."""
    with single_process_quiet():
        dcp.save(state, checkpoint_id=folder, no_dist=not dist.is_initialized())


def load_shards(state: dict, folder: Path) -> None:
    """Fill `state` (the structure `save_shards` wrote, its tensors sharded as this run shards them: DCP
    reshards) in place from `folder`, reading nothing that could run code (refused metadata raises a
    CheckpointError). All ranks call it."""
    read_metadata(folder / ".metadata")  # refused here, named; torch's loader would wrap the error
    try:
        with single_process_quiet():
            dcp.load(state, storage_reader=SafeReader(folder), planner=SafeLoadPlanner(),
                     no_dist=not dist.is_initialized())
    except CheckpointException as e:
        refused = [exc for exc, _ in e.failures.values() if isinstance(exc, CheckpointError)]
        if refused:
            raise CheckpointError(f"refusing to load {folder}: {refused[0]}. Delete the checkpoint or use another "
                                  "out_dir") from None
        raise
