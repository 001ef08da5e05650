"""Which kind of folder a checkpoint is, and how its weights fill a model built on the meta device.

    native     config.json with "format_version" (`Blip3o.save_pretrained`): weights as stored
    official   an official BLIP3-o folder (`BLIP3o/BLIP3o-Model-8B`, `-4B`): converted on load (official.py)
    stock      a stock Qwen2.5-VL folder (`Qwen/Qwen2.5-VL-7B-Instruct`): understanding only (stock.py)

`Blip3o.from_pretrained` builds the model from `ModelFolder.config` on meta, then calls `fill`.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from blip3o.checkpoints import (
    CONFIG_NAME,
    CheckpointError,
    ModelFolder,
    check_entries,
    iter_tensors,
    load_into,
    official,
    read_json,
    stock,
    unique_tensors,
)
from blip3o.config import FORMAT_VERSION, Blip3oConfig


def open_folder(directory: str | Path, *, clip_encoder_weights: str | Path | None = None) -> ModelFolder:
    """The folder's config and how to fill a model from it, for a native, an official BLIP3-o or a stock
    Qwen2.5-VL folder. Its config is checked (types and bounds) and every entry of the folder must be a
    regular file or a folder."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a folder")
    raw = read_json(directory / CONFIG_NAME)
    check_entries(directory)
    if "format_version" in raw:
        if clip_encoder_weights is not None:
            raise CheckpointError(f"{directory} is a blip3o folder: clip_encoder_weights applies to official ones")
        return native_folder(directory, raw)
    if official.is_official_config(raw):
        return official.official_folder(directory, raw, clip_encoder_weights=clip_encoder_weights)
    if stock.is_stock_config(raw):
        if clip_encoder_weights is not None:
            raise CheckpointError(f"{directory} is a stock Qwen2.5-VL folder: clip_encoder_weights applies to "
                                  "official BLIP3-o ones")
        return stock.stock_folder(directory, raw)
    raise CheckpointError(
        f"{directory} is neither a blip3o checkpoint (its config.json has no format_version), an official "
        f"BLIP3-o folder nor a stock Qwen2.5-VL one (model_type {raw.get('model_type')!r}, expected one of "
        f"{official.OFFICIAL_MODEL_TYPES + stock.STOCK_MODEL_TYPES})"
    )


def native_folder(directory: Path, raw: dict) -> ModelFolder:
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} has format_version {raw.get('format_version')!r}; this blip3o reads {FORMAT_VERSION}"
        )
    config = Blip3oConfig.from_dict(raw, where=str(directory / CONFIG_NAME))

    def fill(model: nn.Module) -> None:
        state = model.state_dict()
        tied = frozenset(set(state) - set(unique_tensors(state)))  # the tied lm_head is stored once
        load_into(model, iter_tensors(directory), where=str(directory), allow_missing=tied)
        model.backbone.model.tie_weights()

    # the builtin tokenizer (debug, nano) is part of the package; others travel with the weights
    tokenizer_dir = None if config.backbone.tokenizer == "builtin" else directory / "tokenizer"
    if tokenizer_dir is not None and tokenizer_dir.is_dir():
        check_entries(tokenizer_dir)
    return ModelFolder(config, tokenizer_dir, fill)
