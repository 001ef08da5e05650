"""Checkpoint folders: safetensors shards + JSON, written atomically, read shard by shard.

A folder is either whole or absent: everything is written into a sibling temporary folder
which is swapped into place only after every file is flushed (`blip3o.checkpoints.atomic`). A reader
never sees a partial checkpoint, and an interrupted save leaves the previous one untouched.

Reading trusts nothing in the folder: every file read is a regular file (a FIFO or a device named
`model.safetensors` would block or never end), JSON files are size-capped objects, and a shard index
names files inside the folder only. Configs are checked against `blip3o.checkpoints.limits` before
anything is built.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

if TYPE_CHECKING:
    from blip3o.config import Blip3oConfig

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
DEFAULT_SHARD_BYTES = 4 * 1024**3
MAX_JSON_BYTES = 64 * 1024**2  # a config or shard index is kilobytes; larger files are refused unread
HUB_CACHE_SNAPSHOTS = "snapshots"  # the hub cache's HUB/snapshots/REV folders link their files to HUB/blobs


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as asked; the message says what and where."""


def unpickling_reason(error: Exception) -> str:
    """The line of an unpickling error that names what was refused (torch's weights_only errors end with it)."""
    text = str(error).strip()
    return text.splitlines()[-1] if text else type(error).__name__


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage (tied weights); safetensors refuses aliases."""
    seen: set[tuple] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.device.type, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
        if tensor.device.type != "meta" and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_weights(directory: Path, state: dict[str, torch.Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES):
    """Write `state` as one safetensors file, or shards plus an index when it is larger than a shard."""
    state = {k: v.detach().contiguous().cpu() for k, v in unique_tensors(state).items()}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (directory / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}, indent=2))


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a folder, in shard order (native or HF-Trainer layout); each a regular file
    inside the folder."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if os.path.lexists(index):
        return indexed_files(directory, read_json(index))
    if os.path.lexists(directory / WEIGHTS_NAME):
        return [file_in_folder(directory, WEIGHTS_NAME, where=str(directory))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {directory}")
    return [file_in_folder(directory, f.name, where=str(directory)) for f in files]


def indexed_files(directory: Path, index: dict) -> list[Path]:
    """The shard files a `model.safetensors.index.json` names, in order of first use; a malformed index, or one
    naming a file outside the folder, is refused."""
    where = str(directory / INDEX_NAME)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{where}: weight_map must be an object of tensor names to shard files, got "
                              f"{_shown(weight_map)}")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{where}: weight_map[{name!r}] is {_shown(shard)}; it must be a file name")
    return [file_in_folder(directory, shard, where=where) for shard in dict.fromkeys(weight_map.values())]


def file_in_folder(directory: Path, name: str, *, where: str) -> Path:
    """`directory / name` when it is a regular file inside `directory` (links followed; in a folder of the hub's
    cache, links into its blobs are inside); a CheckpointError otherwise."""
    if not name or os.path.isabs(name):
        raise CheckpointError(f"{where}: {name!r} is not a file name inside the folder")
    path = directory / name
    resolved, roots = path.resolve(), [directory.resolve()]
    if roots[0].parent.name == HUB_CACHE_SNAPSHOTS:
        roots.append(roots[0].parent.parent / "blobs")
    if not any(resolved.is_relative_to(root) for root in roots):
        raise CheckpointError(f"{where}: {name!r} resolves to {resolved}, outside the folder {directory}; a "
                              "checkpoint reads only its own files")
    return regular_file(path)


def regular_file(path: Path) -> Path:
    """`path` when it is a regular file (links followed); a CheckpointError for anything else: a FIFO, a socket
    or a device would block the reader or never end."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        broken = f" (a link to {os.readlink(path)})" if os.path.islink(path) else ""
        raise CheckpointError(f"{path} does not exist{broken}") from None
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise CheckpointError(f"{path} is {kind}; refusing to read it")
    return path


def check_entries(folder: Path) -> None:
    """Refuse a folder holding anything but regular files and folders (links followed): the libraries that
    read a tokenizer or a diffusers model open files by name and would block on a FIFO."""
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if not path.is_dir():
            regular_file(path)


def _shown(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def iter_tensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one shard at a time, so at most one shard is in memory."""
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def read_json(path: str | Path) -> dict:
    """A JSON object from a regular file of at most MAX_JSON_BYTES; a CheckpointError naming the file
    otherwise."""
    path = Path(path)
    if not os.path.lexists(path):
        raise CheckpointError(f"{path} does not exist: is this a blip3o checkpoint folder?")
    size = regular_file(path).stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path} is {size:,} bytes; a config or index is at most {MAX_JSON_BYTES:,}")
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def load_into(model: torch.nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], *, where: str,
              allow_missing: frozenset[str] = frozenset()) -> None:
    """Assign checkpoint tensors to a (meta-built) model, checking names and shapes first.

    Every mismatch is collected and reported at once; nothing is assigned for a checkpoint
    that does not fit (the model stays on meta, never half-loaded).
    """
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    persistent = set(model.state_dict().keys())
    expected = {k: v for k, v in expected.items() if k in persistent}
    found: dict[str, torch.Tensor] = {}
    wrong_shape: dict[str, str] = {}
    unexpected = []
    for name, tensor in tensors:
        if name not in expected:
            unexpected.append(name)
        elif tuple(tensor.shape) != tuple(expected[name].shape):
            wrong_shape[name] = f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}"
        else:
            found[name] = tensor
    missing = sorted(set(expected) - set(found) - set(wrong_shape) - allow_missing)
    problems = []
    if wrong_shape:
        shown = "; ".join(list(wrong_shape.values())[:10])
        problems.append(f"{len(wrong_shape)} tensors have the wrong shape: {shown}")
    if missing:
        problems.append(f"{len(missing)} tensors are missing: {', '.join(missing[:10])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: {', '.join(sorted(unexpected)[:10])}")
    if problems:
        raise CheckpointError(f"checkpoint {where} does not match the model config: " + " | ".join(problems))
    model.load_state_dict(found, strict=False, assign=True)


@dataclass
class ModelFolder:
    config: Blip3oConfig
    tokenizer_dir: Path | None  # None: the package's builtin tokenizer
    fill: Callable[[nn.Module], None]  # assigns the folder's weights to a model built from `config` on meta
    # the dtypes the folder loads in when the caller names none: None keeps the stored ones; `part_dtypes`
    # overrides `dtype` for the named parts
    dtype: torch.dtype | None = None
    part_dtypes: dict[str, torch.dtype] = field(default_factory=dict)
