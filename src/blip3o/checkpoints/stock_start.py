"""A stock Qwen2.5-VL folder as the start of the generation stage: the original's generation training from
scratch (`Qwen/Qwen2.5-VL-7B-Instruct` as it ships, fresh queries and DiT, BLIP3-o's EVA-CLIP tower and
diffusion decoder).

    backbone              the stock folder's weights, exactly; its tokenizer gains [IMG], [/IMG] and <image>
                          (ids 151665 to 151667, rows the folder's embedding already has), so it generates
    queries, dit          fresh, from FRESH_SEED (the same on every process), at `generation_from`'s size
    clip_encoder, decoder `generation_from`'s: a BLIP3-o model folder's weights (so the CLIP-target caches made
                          with that folder train this model), or a preset's architecture at random, recorded as
                          `clip_encoder_random` (on-the-fly targets are refused, and so is every cache)

`generation_from` empty: the BLIP3-o preset whose backbone has the folder's size (7B: blip3o-8b, 3B: blip3o-4b).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from blip3o.backbone import BackboneConfig
from blip3o.checkpoints import CONFIG_NAME, CheckpointError, read_json
from blip3o.checkpoints.folders import open_folder
from blip3o.checkpoints.limits import check_parameters
from blip3o.checkpoints.stock import FRESH_PARTS, fill_backbone, fill_fresh, is_stock_config
from blip3o.config import Blip3oConfig
from blip3o.model import Blip3o
from blip3o.presets import PRESETS, get_preset

FRESH_SEED = 0  # the fresh queries and DiT (and a preset's random tower and decoder)
SIZE_PRESETS = ("blip3o-4b", "blip3o-8b")  # the default generation_from: the one with the folder's backbone size


def is_stock_folder(path: str | Path) -> bool:
    """True for a folder whose config.json is a stock Qwen2.5-VL's."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return is_stock_config(read_json(config))
    except CheckpointError:
        return False


def stock_generation_start(stock_dir: str | Path, generation_from: str = "") -> Blip3o:
    """A whole Blip3o that generates, for the generation stage to train: the stock folder's backbone, fresh
    queries and DiT, the CLIP encoder and decoder of `generation_from` (a BLIP3-o model folder or a preset; empty:
    the preset of the folder's size). A value that names neither raises a ValueError naming generation_from."""
    stock = open_folder(stock_dir)
    source = generation_from or default_generation_from(stock.config.backbone)
    config, towers = _source(source)
    backbone = dataclasses.replace(stock.config.backbone, generates=True)
    config = dataclasses.replace(
        config, backbone=backbone, dit=dataclasses.replace(config.dit, cond_size=backbone.hidden_size),
        clip_encoder_random=towers is None or config.clip_encoder_random,
        extra={"converted_from": "stock Qwen2.5-VL", "generation_from": source})
    with torch.device("meta"):
        model = Blip3o(config, tokenizer_dir=stock.tokenizer_dir)
    check_parameters(model.num_parameters()["total"], where=str(stock_dir))  # before a weight is read
    fill_backbone(model, Path(stock_dir))
    if towers is None:
        fill_fresh(model, FRESH_PARTS, seed=FRESH_SEED)
    else:
        fill_fresh(model, ("queries", "dit"), seed=FRESH_SEED)
        model.clip_encoder, model.decoder = towers.clip_encoder, towers.decoder
    model.init_buffers()
    return model


def default_generation_from(backbone: BackboneConfig) -> str:
    """The BLIP3-o preset whose backbone has `backbone`'s width and depth; a ValueError asking for
    generation_from when none has."""
    for name in SIZE_PRESETS:
        theirs = get_preset(name).backbone
        if (theirs.hidden_size, theirs.num_layers) == (backbone.hidden_size, backbone.num_layers):
            return name
    sizes = ", ".join(f"{n}: hidden_size {get_preset(n).backbone.hidden_size}, {get_preset(n).backbone.num_layers} "
                      "layers" for n in SIZE_PRESETS)
    raise ValueError(f"generation_from is empty and no BLIP3-o preset has this Qwen2.5-VL's size (hidden_size "
                     f"{backbone.hidden_size}, {backbone.num_layers} layers; {sizes}): set generation_from to a "
                     "BLIP3-o model folder or a preset name")


def _source(generation_from: str) -> tuple[Blip3oConfig, Blip3o | None]:
    """(the config whose queries, DiT, encoder and decoder the start takes, the loaded model whose encoder and
    decoder it takes or None for a preset)."""
    if generation_from in PRESETS:
        return get_preset(generation_from), None
    if not Path(generation_from).is_dir():
        raise ValueError(f"generation_from {generation_from!r} is neither a BLIP3-o model folder nor a preset; "
                         f"presets: {', '.join(PRESETS)}")
    try:
        model = Blip3o.from_pretrained(generation_from)
    except CheckpointError as e:
        raise ValueError(f"generation_from {generation_from!r} is not a BLIP3-o model folder: {e}") from None
    if not model.config.backbone.generates:
        raise ValueError(f"generation_from {generation_from!r} is a stock Qwen2.5-VL folder, with no CLIP encoder "
                         "or decoder of BLIP3-o: name a BLIP3-o model folder (native or official) or a preset")
    return model.config, model
