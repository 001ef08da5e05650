"""Checkpoint folders: safetensors shards + JSON, written atomically, read shard by shard.

A folder is either whole or absent: everything is written into a sibling temporary folder
which is renamed into place only after every file is flushed. A reader never sees a partial
checkpoint, and an interrupted save leaves the previous one untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
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


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as asked; the message says what and where."""


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


def write_folder(directory: str | Path, fill: Callable[[Path], None]) -> Path:
    """Create `directory` atomically: `fill(tmp)` writes into a temporary sibling, then rename.

    An existing `directory` is replaced only after the new one is complete.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


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
    """The safetensors files of a folder, in shard order (native or HF-Trainer layout)."""
    directory = Path(directory)
    if (directory / INDEX_NAME).exists():
        index = json.loads((directory / INDEX_NAME).read_text())
        return [directory / f for f in dict.fromkeys(index["weight_map"].values())]
    if (directory / WEIGHTS_NAME).exists():
        return [directory / WEIGHTS_NAME]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {directory}")
    return files


def iter_tensors(directory: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one shard at a time, so at most one shard is in memory."""
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: is this a blip3o checkpoint folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


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
