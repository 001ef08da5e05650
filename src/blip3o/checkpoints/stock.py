"""Stock Qwen2.5-VL folders (`Qwen/Qwen2.5-VL-7B-Instruct`, `-3B-Instruct` as downloaded) -> a `Blip3o` that
understands images and refuses to generate them.

BLIP3-o is compared with its own base model, and its generation stage starts from one, so such a folder
loads for `answer`, `chat`, `blip3o ask/chat/serve` and every understanding benchmark. Its backbone reads
the folder as transformers' `from_pretrained` does: the weights, the tokenizer (without BLIP3-o's added
tokens), `preprocessor_config.json`, the chat template and `generation_config.json`. The folder has no
queries, DiT, EVA tower or decoder: the model gets nano-sized random ones so that it is a whole `Blip3o`,
and `BackboneConfig.generates` False makes every generation call raise `CannotGenerate`.

Weight names: transformers 4.x wrote the LLM at `model.*` and the ViT at `visual.*` (as official BLIP3-o
folders do); transformers 5 may write `model.language_model.*` and `model.visual.*`. Both load.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from blip3o.checkpoints import CONFIG_NAME, CheckpointError, ModelFolder, iter_tensors, load_into
from blip3o.checkpoints.official import backbone_config, tensor_shapes
from blip3o.config import Blip3oConfig
from blip3o.presets import get_preset

STOCK_MODEL_TYPES = ("qwen2_5_vl",)
# stored prefix -> ours; the transformers 5 names first (they start with "model." too)
_PREFIXES = (
    ("model.language_model.", "backbone.model.model.language_model."),
    ("model.visual.", "backbone.model.model.visual."),
    ("model.", "backbone.model.model.language_model."),
    ("visual.", "backbone.model.model.visual."),
    ("lm_head.", "backbone.model.lm_head."),
)
PLACEHOLDER_SEED = 0  # the random stand-ins for the parts a stock folder lacks are the same at every load
FRESH_PARTS = ("queries", "dit", "clip_encoder", "decoder")  # the parts a stock folder lacks, in drawing order


def is_stock_config(raw: dict) -> bool:
    """True for the config.json of a stock Qwen2.5-VL folder."""
    architectures = raw.get("architectures") or []
    return raw.get("model_type") in STOCK_MODEL_TYPES or "Qwen2_5_VLForConditionalGeneration" in architectures


def stock_key(name: str) -> str | None:
    """A stock folder's tensor name -> ours; None for recomputed RoPE tables."""
    if name.endswith(".inv_freq"):
        return None
    for stored, ours in _PREFIXES:
        if name.startswith(stored):
            return ours + name[len(stored):]
    raise CheckpointError(f"{name!r} is not a tensor of a Qwen2.5-VL folder")


def stock_config(raw: dict, shapes: dict[str, tuple[int, ...]], where: str) -> Blip3oConfig:
    """The Qwen2.5-VL of the folder's config.json (the 7B preset's values where it is silent), with nano's
    queries, DiT, encoder and decoder as the placeholders of the parts it lacks."""
    embed = "backbone.model.model.language_model.embed_tokens.weight"
    if embed not in shapes:
        raise CheckpointError(f"Qwen2.5-VL folder {where} has no {embed.removeprefix('backbone.model.')}")
    backbone = backbone_config(raw, get_preset("blip3o-8b").backbone, shapes[embed][0], where=f"{where}/{CONFIG_NAME}")
    placeholder = get_preset("nano")
    try:
        return dataclasses.replace(
            placeholder, backbone=dataclasses.replace(backbone, generates=False),
            dit=dataclasses.replace(placeholder.dit, cond_size=backbone.hidden_size),
            extra={"converted_from": "stock Qwen2.5-VL", "model_type": raw.get("model_type")},
        )
    except ValueError as e:
        raise CheckpointError(f"Qwen2.5-VL folder {where}: {e}") from None


def stock_folder(directory: Path, raw: dict) -> ModelFolder:
    """A stock Qwen2.5-VL folder as a `ModelFolder`: its backbone as stored, random placeholders for the rest."""
    where = str(directory)
    shapes = {}
    for name, shape in tensor_shapes(directory).items():  # unknown names fail here, before any loading
        if (ours := stock_key(name)) is not None:
            shapes[ours] = shape
    config = stock_config(raw, shapes, where)

    def fill(model: nn.Module) -> None:
        fill_backbone(model, directory)
        fill_fresh(model, FRESH_PARTS, seed=PLACEHOLDER_SEED)

    return ModelFolder(config, directory, fill)


def fill_backbone(model: nn.Module, directory: Path) -> None:
    """The stock folder's backbone weights into a model built on meta with its backbone config; the other
    parts stay as they are."""
    state = model.state_dict()
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    tied = frozenset(set(state) - set(expected))  # a tied lm_head may be stored or not
    others = frozenset(k for k in state if not k.startswith("backbone."))
    tensors = ((ours, t) for name, t in iter_tensors(directory)
               if (ours := stock_key(name)) is not None and ours not in tied)
    load_into(model, tensors, where=str(directory), allow_missing=tied | others)
    model.backbone.model.tie_weights()


def fill_fresh(model: nn.Module, parts: tuple[str, ...], *, seed: int) -> None:
    """Random `parts` (of FRESH_PARTS, drawn in that order from `seed`: every load and every process gives the
    same), in place of the meta ones, built as `Blip3o.__init__` builds them."""
    from blip3o.clip_encoder import build_clip_encoder
    from blip3o.decoder import build_decoder
    from blip3o.dit import DiT

    c = model.config
    build = {"queries": lambda: nn.Parameter(torch.randn(1, c.num_queries, c.backbone.hidden_size) * c.query_init_std),
             "dit": lambda: DiT(c.dit), "clip_encoder": lambda: build_clip_encoder(c.clip_encoder),
             "decoder": lambda: build_decoder(c.decoder)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for part in FRESH_PARTS:
            if part in parts:
                setattr(model, part, build[part]())
