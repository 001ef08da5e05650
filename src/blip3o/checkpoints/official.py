"""Official BLIP3-o folders (`BLIP3o/BLIP3o-Model-8B`, `-4B` as downloaded) -> our `Blip3o`, on load.

An official folder is what BLIP3-o's training script saves (HF Trainer, transformers 4.51.3) and its
inference loads as `blip3oQwenForInferenceLM`:

    config.json                            Qwen2_5_VLConfig (text fields flat, `vision_config` nested)
                                           + BLIP3-o's `n_query`, `gen_vision_tower`, `gen_pooling`, ...
    model-0000X-of-0000N.safetensors       weights, with model.safetensors.index.json
    tokenizer files                        Qwen2.5's, with [IMG]=151665, [/IMG], <image> added
    diffusion-decoder/{unet,vae,scheduler} the SDXL-UNet decoder, read with diffusers' own classes

Official name -> ours (`map_key`); transformers 4.51 kept the LLM at `model.*` and the ViT at
`visual.*`, transformers 5 moved them under `model.language_model` / `model.visual`:

    model.embed_tokens|layers|norm.*            backbone.model.model.language_model.*
    visual.*                                    backbone.model.model.visual.*
    lm_head.weight                              backbone.model.lm_head.weight   (tied in 4B: dropped)
    model.latent_queries          (1, 64, H)    queries
    model.dit.model.*                           dit.*           (Lumina-Next names + caption_projection)
    model.gen_vision_tower.vision_tower.model.* clip_encoder.*  (EVA-CLIP-E, 772 tensors, may be absent)
    *.inv_freq                                  None: RoPE tables are recomputed

Time convention. Official training feeds the DiT `scheduler.timesteps[i]` of a 1000-step
FlowMatchEulerDiscreteScheduler, i.e. 1000 * sigma in float32 (blip3o_qwen.py: `timesteps[indices]`,
i = floor(1000 u); 990 of the 1000 are integers, ten are not, e.g. 510.99997), and inference passes
`t.to(torch.long)`, i.e. floor(1000 * sigma) (blip3o_qwen_inference.py `sample_images`). Sigma is
our t (t = 1 is noise: x_t = (1 - sigma) x_0 + sigma noise), and our `timestep_features` multiplies
t by 1000 inside the embedding, so the weights carry over unchanged; the converted config sets
`quantize_timesteps=True`, which floors 1000 t the same way when sampling, so official inference is
reproduced. Training reads t unfloored (`DiT.loss`), and the converted config trains as the original
does: `train_layout="closed_turn"` (its training sequence) and `train_timesteps="scheduler_grid"` (its
scheduler's sigmas, `blip3o.flow.grid_times`).

The EVA tower: official inference builds it with `delay_load=True` and never reads its weights, so
a released folder may lack it. It is then taken from `clip_encoder_weights` (safetensors whose names
are the tower's, with or without the official prefix, e.g. the `jiuhai/eva_clip_vision_tower`
download converted to safetensors), or left random with a loud warning: generation and
understanding do not use it, only `reconstruct`, `encode_images` and training do.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from blip3o.checkpoints import (
    CONFIG_NAME,
    CheckpointError,
    ModelFolder,
    check_entries,
    iter_tensors,
    load_into,
    read_json,
    weight_files,
)
from blip3o.checkpoints.limits import MAX_TIMESTEPS, MODEL_BOUNDS, Bound, check_value, type_hints
from blip3o.clip_encoder import CLIP_ENCODER_PRESETS, OFFICIAL_PREFIX, EvaClipConfig
from blip3o.config import Blip3oConfig
from blip3o.presets import get_preset

# `model_type` of the training (blip3o_qwen.py) and inference (blip3o_qwen_inference.py) configs.
OFFICIAL_MODEL_TYPES = ("blip3o_qwen", "blip3o_qwen_inference")
DECODER_FOLDER = "diffusion-decoder"
# What diffusers builds the decoder from, checked before it builds: each file's size fields, named as there,
# with the bounds of the SdxlUnetDecoderConfig field they become
DECODER_CONFIGS: dict[str, tuple[str, dict[str, str]]] = {
    "unet": ("config.json", {
        "cross_attention_dim": "token_width", "block_out_channels": "block_out_channels",
        "layers_per_block": "layers_per_block", "transformer_layers_per_block": "transformer_layers_per_block",
        "attention_head_dim": "attention_head_dim", "norm_num_groups": "norm_num_groups",
        "addition_time_embed_dim": "addition_time_embed_dim", "in_channels": "latent_channels",
        "out_channels": "latent_channels", "sample_size": "sample_size"}),
    "vae": ("config.json", {
        "block_out_channels": "vae_block_out_channels", "layers_per_block": "vae_layers_per_block",
        "norm_num_groups": "vae_norm_num_groups", "latent_channels": "latent_channels",
        "sample_size": "default_size"}),
}
SCHEDULER_CONFIG = "scheduler_config.json"
# Where a Qwen2.5-VL config.json holds each BackboneConfig field: the text fields (flat in transformers 4.x,
# under text_config in 5), vision_config, or the RoPE's rope_scaling / rope_parameters
QWEN_FIELDS: dict[str, tuple[str, str]] = {
    "hidden_size": ("text", "hidden_size"), "num_layers": ("text", "num_hidden_layers"),
    "num_heads": ("text", "num_attention_heads"), "num_kv_heads": ("text", "num_key_value_heads"),
    "intermediate_size": ("text", "intermediate_size"), "rms_norm_eps": ("text", "rms_norm_eps"),
    "max_position_embeddings": ("text", "max_position_embeddings"), "mrope_section": ("rope", "mrope_section"),
    "vision_depth": ("vision", "depth"), "vision_hidden_size": ("vision", "hidden_size"),
    "vision_num_heads": ("vision", "num_heads"), "vision_intermediate_size": ("vision", "intermediate_size"),
    "patch_size": ("vision", "patch_size"), "spatial_merge_size": ("vision", "spatial_merge_size"),
    "temporal_patch_size": ("vision", "temporal_patch_size"), "window_size": ("vision", "window_size"),
    "fullatt_block_indexes": ("vision", "fullatt_block_indexes"),
}
EVA_HEAD_WIDTH = 112  # eva-clip-E-14-plus.json: head_width; the tensors do not show the head count
EVA_ROOTS = ("patch_embed", "cls_token", "pos_embed", "blocks")

# Official prefix -> our prefix. Order matters: the DiT and EVA live under `model.` too.
_PREFIXES = (
    ("model.dit.model.", "dit."),
    (OFFICIAL_PREFIX, "clip_encoder."),
    ("model.embed_tokens.", "backbone.model.model.language_model.embed_tokens."),
    ("model.layers.", "backbone.model.model.language_model.layers."),
    ("model.norm.", "backbone.model.model.language_model.norm."),
    ("visual.", "backbone.model.model.visual."),
    ("lm_head.", "backbone.model.lm_head."),
)
_EXACT = {"model.latent_queries": "queries"}

# Our parameters with no official counterpart (decoder.* comes from diffusion-decoder/).
NATIVE_ONLY: frozenset[str] = frozenset()


def map_key(name: str) -> str | None:
    """Official state-dict name -> our state-dict name; None for buffers we recompute (RoPE inv_freq).

    Raises CheckpointError for a name that is not part of the official BLIP3-o layout.
    """
    if name.endswith(".inv_freq"):
        return None
    if name in _EXACT:
        return _EXACT[name]
    for official, ours in _PREFIXES:
        if name.startswith(official):
            return ours + name[len(official):]
    raise CheckpointError(f"{name!r} is not a tensor of the official BLIP3-o layout")


def is_official_config(raw: dict) -> bool:
    """True for the config.json of an official BLIP3-o (Qwen2.5-VL) folder."""
    architectures = raw.get("architectures") or []
    return raw.get("model_type") in OFFICIAL_MODEL_TYPES or any(str(a).startswith("blip3oQwen") for a in architectures)


# ---------------------------------------------------------------------------------------------- reading


def tensor_shapes(directory: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a folder, read from the safetensors headers (no weights)."""
    shapes = {}
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _renamed(shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, tuple[int, ...]]:
    """Our name -> shape for an official folder; every unknown or doubly mapped name reported at once."""
    ours, unknown, doubled = {}, [], []
    for name, shape in shapes.items():
        try:
            target = map_key(name)
        except CheckpointError:
            unknown.append(name)
            continue
        if target is None:
            continue
        if target in ours:
            doubled.append(target)
        ours[target] = shape
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} tensors are not in the official layout: {', '.join(sorted(unknown)[:10])}")
    if doubled:
        problems.append(f"several official tensors map onto {', '.join(doubled[:10])}")
    if problems:
        raise CheckpointError(f"official BLIP3-o folder {where}: " + " | ".join(problems))
    return ours


def _section(shapes: dict[str, tuple[int, ...]], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _count(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    """Number of numbered blocks `prefix{i}.` in `shapes`."""
    indices = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def _require(shapes: dict, name: str, where: str) -> tuple[int, ...]:
    if name not in shapes:
        raise CheckpointError(f"official BLIP3-o folder {where} has no tensor for {name!r}")
    return shapes[name]


# ---------------------------------------------------------------------------------------------- config


def backbone_config(raw: dict, base, vocab_size: int, *, where: str = CONFIG_NAME):
    """BackboneConfig from the official (transformers 4.51, flat) or newer (nested) Qwen2.5-VL fields of a
    config.json (`where` names it); every field is checked for its type and bounds before it is used."""
    sections = _qwen_sections(raw, where)
    found = {}
    for name, (section, key) in QWEN_FIELDS.items():
        shown = key if section == "text" else f"{_SECTION_NAMES[section]}.{key}"
        found[name] = (shown, sections[section].get(key))
    text, rope = sections["text"], sections["rope"]
    found["rope_theta"] = ("rope_theta", text.get("rope_theta", rope.get("rope_theta")))
    found["tie_word_embeddings"] = ("tie_word_embeddings", raw.get("tie_word_embeddings",
                                                                   text.get("tie_word_embeddings")))
    found["vocab_size"] = ("vocab_size (rows of embed_tokens)", vocab_size)
    hints = type_hints(type(base))
    for name, (shown, value) in found.items():
        if value is not None:
            check_value(shown, value, hints[name], MODEL_BOUNDS.get(name), where=f"{where}: ")
    fields = {name: value for name, (_, value) in found.items()}
    if fields["hidden_size"] is None or fields["num_layers"] is None:
        raise CheckpointError(f"{where} lacks the Qwen2.5-VL fields hidden_size / num_hidden_layers")
    out_hidden = sections["vision"].get("out_hidden_size", fields["hidden_size"])
    if out_hidden != fields["hidden_size"]:
        raise CheckpointError(f"{where}: vision_config.out_hidden_size {out_hidden!r} != hidden_size "
                              f"{fields['hidden_size']}")
    # Fields the config leaves out keep the preset's (Qwen2.5-VL) values.
    try:
        return dataclasses.replace(base, **{k: v for k, v in fields.items() if v is not None}, tokenizer="checkpoint")
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


_SECTION_NAMES = {"vision": "vision_config", "rope": "rope_scaling"}


def _qwen_sections(raw: dict, where: str) -> dict[str, dict]:
    """The text, vision and RoPE fields of a Qwen2.5-VL config.json, each section an object."""
    text_config = raw.get("text_config") or {}
    if not isinstance(text_config, dict):
        raise CheckpointError(f"{where}: text_config must be an object, got {text_config!r}")
    text = {**raw, **text_config}
    sections = {"text": text, "vision": raw.get("vision_config") or {},
                "rope": text.get("rope_scaling") or text.get("rope_parameters") or {}}
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise CheckpointError(f"{where}: {_SECTION_NAMES[name]} must be an object, got {section!r}")
    return sections


def _dit_config(dit: dict[str, tuple[int, ...]], base, grid_size: int, where: str):
    """DiTConfig from the shapes of `model.dit.model.*` (the official DiT config is not saved:
    `build_dit` makes NextDiTCrossAttnConfig(latent_embedding_size=hidden_size) with defaults)."""
    hidden, in_channels = _require(dit, "patch_embedder.proj.weight", where)
    if _require(dit, "norm_out.linear_2.weight", where)[0] != in_channels:
        raise CheckpointError(f"{where}: the DiT does not have patch_size 1 (in {in_channels} channels, out "
                              f"{dit['norm_out.linear_2.weight'][0]}); only BLIP3-o's 1x1 patches are supported")
    heads = _require(dit, "layers.0.gate", where)[0]
    kv_heads = _require(dit, "layers.0.attn1.to_k.weight", where)[0] // (hidden // heads)
    ffn = _require(dit, "layers.0.feed_forward.linear_1.weight", where)[0]
    fields = dict(
        in_channels=in_channels, grid_size=grid_size, hidden_size=hidden, num_layers=_count(dit, "layers."),
        num_heads=heads, num_kv_heads=None if kv_heads == heads else kv_heads,
        qk_norm="layers.0.attn1.norm_q.weight" in dit,
        cond_size=_require(dit, "caption_projection.linear_1.weight", where)[1],
        quantize_timesteps=True,  # official inference casts 1000 t to long: see the module docstring
    )
    for two_thirds in (True, False):  # Lumina-Next's 2/3 * 4D rounding (4864 for 1792), else plain 4D
        config = dataclasses.replace(base, **fields, ffn_two_thirds=two_thirds)
        if config.ffn_dim == ffn:
            return config
    raise CheckpointError(f"{where}: DiT feed-forward width {ffn} fits neither Lumina-Next rounding of "
                          f"hidden size {hidden} (multiple_of {base.multiple_of})")


def _eva_config(eva: dict[str, tuple[int, ...]], pool: int | None, where: str) -> EvaClipConfig:
    """EvaClipConfig from the tower's tensor shapes (names without prefix)."""
    width, _, patch, _ = _require(eva, "patch_embed.proj.weight", where)
    grid = math.isqrt(_require(eva, "pos_embed", where)[1] - 1)
    return EvaClipConfig(
        image_size=grid * patch, patch_size=patch, width=width, depth=_count(eva, "blocks."),
        num_heads=width // EVA_HEAD_WIDTH if width % EVA_HEAD_WIDTH == 0 else 1,
        mlp_dim=_require(eva, "blocks.0.mlp.fc1.weight", where)[0], qkv_bias="blocks.0.attn.qkv.bias" in eva,
        pool=pool or grid // 8,
    )


def _pool(raw: dict) -> int | None:
    """Stride of `gen_pooling` ("early_pool2d_4" -> 4), as `pool_img` parses it."""
    pooling = raw.get("gen_pooling")
    return int(pooling.split("_")[-1]) if isinstance(pooling, str) and pooling[-1:].isdigit() else None


def _eva_suffix(name: str) -> str | None:
    """A tower tensor's name without whatever prefix the file uses (official, wrapper, or none)."""
    for prefix in (OFFICIAL_PREFIX, "vision_tower.model.", "model.", ""):
        rest = name[len(prefix):] if name.startswith(prefix) else None
        if rest is not None and rest.split(".")[0] in EVA_ROOTS:
            return rest
    return None


def _config(raw: dict, shapes: dict, eva_shapes: dict | None, where: str) -> Blip3oConfig:
    """Our Blip3oConfig for an official folder: the 4B / 8B preset adjusted to the folder's numbers, every one
    checked. `eva_shapes` (tower names without prefix) describes the EVA tower when it comes from elsewhere.
    The decoder is the preset's at the DiT's width until `official_folder` puts the loaded one's config in its
    place: the rest is checked before diffusers reads anything."""
    config_json = f"{where}/{CONFIG_NAME}"
    hidden = _qwen_sections(raw, config_json)["text"].get("hidden_size")
    variant = {2048: "blip3o-4b", 3584: "blip3o-8b"}.get(hidden) if isinstance(hidden, int) else None
    base = get_preset(variant or "blip3o-8b")
    vocab = _require(shapes, "backbone.model.model.language_model.embed_tokens.weight", where)[0]
    backbone = backbone_config(raw, base.backbone, vocab, where=config_json)
    num_queries = _require(shapes, "queries", where)[1]
    grid = math.isqrt(num_queries)
    if grid * grid != num_queries:
        raise CheckpointError(f"{where}: model.latent_queries has {num_queries} queries, not a square grid")
    dit = _dit_config(_section(shapes, "dit."), base.dit, grid, where)
    eva = _section(shapes, "clip_encoder.") or eva_shapes
    clip = _eva_config(eva, _pool(raw), where) if eva else _random_eva_config(raw, dit.in_channels, where)
    return dataclasses.replace(
        base, backbone=backbone, dit=dit, clip_encoder=clip,
        decoder=dataclasses.replace(base.decoder, token_width=dit.in_channels), num_queries=num_queries,
        train_layout="closed_turn", train_timesteps="scheduler_grid", clip_encoder_random=not eva,
        extra={"converted_from": "official BLIP3-o", "official_variant": variant or "custom",
               "official_model_type": raw.get("model_type"), "gen_vision_tower": raw.get("gen_vision_tower")},
    )


@contextmanager
def _numbers_of(where: str) -> Iterator[None]:
    """The folder's numbers that a config refuses (a ValueError or ArithmeticError from its checks) raise a
    CheckpointError naming the folder."""
    try:
        yield
    except CheckpointError:
        raise
    except (ValueError, ArithmeticError) as e:
        raise CheckpointError(f"official BLIP3-o folder {where}: {e}") from None


def _random_eva_config(raw: dict, width: int, where: str) -> EvaClipConfig:
    tower = str(raw.get("gen_vision_tower", "eva-clip-E-14-plus"))
    config = CLIP_ENCODER_PRESETS["eva-clip-e"]
    if "eva" not in tower.lower() or config.width != width:
        raise CheckpointError(f"{where} has no EVA tower weights and its gen_vision_tower {tower!r} / DiT width "
                              f"{width} is not EVA-CLIP-E's; pass clip_encoder_weights=<safetensors of the tower>")
    return config


# ---------------------------------------------------------------------------------------------- loading


def _decoder(directory: Path):
    from blip3o.decoder.sdxl_unet import SdxlUnetDecoder

    folder = directory / DECODER_FOLDER
    if not (folder / "unet").is_dir():
        raise CheckpointError(f"official BLIP3-o folder {directory} has no {DECODER_FOLDER}/unet")
    check_decoder_configs(folder)
    # Released folders hold only `diffusion_pytorch_model.bf16.safetensors`: find the variant.
    variants = [p.name.split(".")[1] for p in (folder / "unet").glob("diffusion_pytorch_model.*.safetensors")]
    has_plain = (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    return SdxlUnetDecoder.from_diffusers_folder(folder, variant=None if has_plain or not variants else variants[0],
                                                 torch_dtype=None)


def check_decoder_configs(folder: Path) -> None:
    """Check a diffusers decoder folder before diffusers reads it: its subfolders hold regular files only, and
    the size fields of the UNet's and VAE's config.json and the scheduler's training timesteps are of the right
    type and within bounds (`blip3o.checkpoints.limits`)."""
    for part, (name, fields) in DECODER_CONFIGS.items():
        check_entries(folder / part)
        raw = read_json(folder / part / name)
        for key, ours in fields.items():
            if raw.get(key) is not None:
                check_value(key, raw[key], int | list[int], MODEL_BOUNDS[ours], where=f"{folder / part / name}: ")
    if (folder / "scheduler").is_dir():
        check_entries(folder / "scheduler")
        path = folder / "scheduler" / SCHEDULER_CONFIG
        steps = read_json(path).get("num_train_timesteps")
        if steps is not None:
            check_value("num_train_timesteps", steps, int, Bound(1, MAX_TIMESTEPS), where=f"{path}: ")


def _official_tensors(directory: Path, skip: frozenset[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in iter_tensors(directory):
        target = map_key(name)
        if target is not None and target not in skip:
            yield target, tensor


def _eva_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in iter_tensors(path):
        yield _eva_suffix(name) or name, tensor


# The original's inference dtypes: `blip3oQwenForInferenceLM.from_pretrained(..., torch_dtype=torch.float16)` for the
# backbone, queries, DiT and EVA tower, and the diffusion decoder's pipeline in bfloat16.
OFFICIAL_DTYPE = torch.float16
OFFICIAL_DECODER_DTYPE = torch.bfloat16


def official_folder(directory: Path, raw: dict, *, clip_encoder_weights: str | Path | None = None):
    """An official BLIP3-o folder as a `ModelFolder`: config from its numbers, weights renamed on load.

    `clip_encoder_weights`: a folder with the EVA tower's safetensors, for an official folder that lacks the
    tower (see the module docstring). Loads in the original's dtypes unless the caller names one.
    """
    where = str(directory)
    shapes = _renamed(tensor_shapes(directory), where)  # unknown names fail here, before any loading
    eva_path = Path(clip_encoder_weights) if clip_encoder_weights is not None else None
    eva_shapes = None if eva_path is None else {_eva_suffix(k) or k: v for k, v in tensor_shapes(eva_path).items()}
    with _numbers_of(where):
        config = _config(raw, shapes, eva_shapes, where)
    decoder = _decoder(directory)
    with _numbers_of(where):
        config = dataclasses.replace(config, decoder=decoder.config)
    eva_in_folder = any(k.startswith("clip_encoder.") for k in shapes)

    def fill(model: torch.nn.Module) -> None:
        model.decoder = decoder
        state = model.state_dict()
        expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        aliases = frozenset(set(state) - set(expected))  # 4B's lm_head: the official model ties it as well
        elsewhere = ("decoder.",) if eva_in_folder else ("decoder.", "clip_encoder.")
        load_into(model, _official_tensors(directory, aliases), where=where,
                  allow_missing=frozenset(k for k in state if k.startswith(elsewhere)))
        model.backbone.model.tie_weights()
        if not eva_in_folder:
            _fill_clip_encoder(model.clip_encoder, eva_path, model.queries.dtype, where)

    return ModelFolder(config, directory, fill, dtype=OFFICIAL_DTYPE, part_dtypes={"decoder": OFFICIAL_DECODER_DTYPE})


def _fill_clip_encoder(encoder: torch.nn.Module, eva_path: Path | None, dtype: torch.dtype, where: str) -> None:
    """The EVA tower from separate weights, or random (loudly) when there are none."""
    if eva_path is not None:
        load_into(encoder, _eva_tensors(eva_path), where=str(eva_path))
        return
    warnings.warn(
        f"{where} has no EVA-CLIP tower weights (official inference never loads them): the clip encoder is "
        "RANDOM. generate/answer are unaffected; reconstruct, encode_images and training are not meaningful. "
        "Pass clip_encoder_weights=<folder with the tower's safetensors> to load it.",
        UserWarning, stacklevel=4,
    )
    encoder.to(dtype).to_empty(device="cpu")
    for module in encoder.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    encoder.initialize_weights()
