"""Official BLIP3-o folders load through `Blip3o.from_pretrained` and match independent implementations.

A tiny folder is fabricated in exactly the official layout: the official tensor names (transformers
4.51 Qwen2.5-VL names, `model.latent_queries`, `model.dit.model.*`, the EVA tower), three shards with
an index, a config.json with the fields transformers 4.51.3 + BLIP3-o's train.py write, a tokenizer
in Qwen2.5's layout and a `diffusion-decoder/` saved by diffusers. References: diffusers'
`LuminaNextDiT2DModel` for the DiT, transformers' own loading of the old names for the backbone.
The full 8B / 4B key lists are generated from the reference architectures on the meta device.
"""

import dataclasses
import json
import os
import re
import shutil
import types

import pytest
import torch
from diffusers import LuminaNextDiT2DModel
from diffusers.models.embeddings import PixArtAlphaTextProjection, get_2d_rotary_pos_embed_lumina
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from blip3o import Blip3o, get_preset
from blip3o.backbone import GENERATION_PROMPT
from blip3o.checkpoints import INDEX_NAME, CheckpointError, official
from blip3o.cli import main as cli_main
from blip3o.clip_encoder import CLIP_ENCODER_PRESETS, OFFICIAL_PREFIX, EvaClipConfig, build_clip_encoder
from blip3o.decoder import DECODER_PRESETS
from blip3o.decoder.sdxl_unet import SdxlUnetDecoder, make_scheduler

H, C, D = 32, 32, 64  # LLM width, CLIP token width (DiT in/out), DiT width
VOCAB = 151668  # Qwen2.5's 151,665 tokens + [IMG], [/IMG], <image>
QWEN_CONTROLS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                 "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                 "<|repo_name|>", "<|file_sep|>"]
LLM = dict(hidden_size=H, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096)
VISION = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=H, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
MROPE = [1, 1, 2]  # sums to head_dim / 2 = 4
# The official DiT: NextDiTCrossAttnConfig defaults (nextdit_crossattn.py) at tiny widths.
DIT = dict(sample_size=8, patch_size=1, in_channels=C, hidden_size=D, num_layers=2, num_attention_heads=4,
           num_kv_heads=4, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5, learn_sigma=False,
           qk_norm=True, cross_attention_dim=D)
EVA = EvaClipConfig(image_size=64, patch_size=2, width=C, depth=2, num_heads=1, mlp_dim=64)


def official_config_json(llm: dict, vision: dict, mrope: list, vocab: int, tied: bool, width: int) -> dict:
    """config.json as transformers 4.51.3 saves a blip3oQwenConfig (Qwen2_5_VLConfig: text fields flat,
    vision_config nested) after BLIP3-o's train.py set its fields."""
    return {
        "architectures": ["blip3oQwenForCausalLM"], "model_type": "blip3o_qwen", **llm, "vocab_size": vocab,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope}, "tie_word_embeddings": tied,
        "hidden_act": "silu", "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 28, "torch_dtype": "float32",
        "bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643, "image_token_id": 151655,
        "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_config": {**vision, "hidden_act": "silu", "in_chans": 3, "tokens_per_second": 2,
                          "model_type": "qwen2_5_vl"},
        "gen_vision_tower": "eva-clip-E-14-plus", "gen_pooling": "early_pool2d_4", "n_query": 64,
        "gen_hidden_size": width, "vision_tower_pretrained": "", "mm_use_im_start_end": False,
        "mm_patch_merge_type": "flat", "tokenizer_padding_side": "right", "transformers_version": "4.51.3",
    }


def reference_qwen_config(llm: dict, vision: dict, mrope: list, vocab: int, tied: bool) -> Qwen2_5_VLConfig:
    text = dict(llm, vocab_size=vocab, tie_word_embeddings=tied,
                rope_parameters={"rope_type": "default", "rope_theta": llm["rope_theta"], "mrope_section": mrope})
    text.pop("rope_theta")
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied)


def legacy_name(name: str) -> str:
    """transformers 5 Qwen2.5-VL name -> the transformers 4.51 name official checkpoints use."""
    return re.sub(r"^model\.visual\.", "visual.", re.sub(r"^model\.language_model\.", "model.", name))


def randomise(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random values for every tensor (norm weights around 1), so no zero-init hides a wrong mapping."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * 0.1
            p.copy_(noise + 1 if re.search(r"norm|ln_q", name) and p.ndim == 1 and name.endswith("weight") else noise)
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Random official-named tensors and the independent reference modules they came from."""
    g = torch.Generator().manual_seed(0)
    qwen = Qwen2_5_VLForConditionalGeneration(reference_qwen_config(LLM, VISION, MROPE, VOCAB, tied=False))
    tensors = {legacy_name(k): v for k, v in randomise(qwen, g).items()}
    dit = LuminaNextDiT2DModel(**DIT).eval()
    projection = PixArtAlphaTextProjection(in_features=H, hidden_size=D).eval()
    tensors.update({f"model.dit.model.{k}": v for k, v in randomise(dit, g).items() if k != "pad_token"})
    tensors.update({f"model.dit.model.caption_projection.{k}": v for k, v in randomise(projection, g).items()})
    eva = build_clip_encoder(EVA)
    tensors.update({OFFICIAL_PREFIX + k: v for k, v in randomise(eva, g).items()})
    tensors["model.latent_queries"] = torch.randn(1, 64, H, generator=g)
    decoder = SdxlUnetDecoder(dataclasses.replace(DECODER_PRESETS["debug-sdxl-unet"], token_width=C))
    tokenizer_dir = tmp_path_factory.mktemp("tokenizer")
    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(151_643)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(QWEN_CONTROLS + ["[IMG]", "[/IMG]", "<image>"])  # as train.py saved it
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>").save_pretrained(tokenizer_dir)
    return types.SimpleNamespace(tensors=tensors, dit=dit, projection=projection, eva=eva, decoder=decoder,
                                 tokenizer_dir=tokenizer_dir)


def write_official(folder, parts, *, tied: bool = False, eva: bool = True, tensors: dict | None = None):
    """An official folder: 3 HF-Trainer shards + index, config.json, tokenizer, diffusion-decoder/."""
    shutil.copytree(parts.tokenizer_dir, folder)
    tensors = dict(parts.tensors if tensors is None else tensors)
    if tied:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # both names saved
    if not eva:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(OFFICIAL_PREFIX)}
    groups = [{k: v for k, v in tensors.items() if k.startswith(("model.embed", "model.layers", "model.norm"))},
              {k: v for k, v in tensors.items() if k.startswith(("visual.", "lm_head", "model.dit", "model.latent"))}]
    groups.append({k: v for k, v in tensors.items() if not any(k in group for group in groups)})
    weight_map = {}
    for i, shard in enumerate(g for g in groups if g):
        name = f"model-{i + 1:05d}-of-{sum(bool(g) for g in groups):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = official_config_json(LLM, VISION, MROPE, VOCAB, tied, C)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    decoder_dir = folder / "diffusion-decoder"
    parts.decoder.unet.save_pretrained(decoder_dir / "unet", variant="bf16")  # released: bf16 variant files only
    parts.decoder.vae.save_pretrained(decoder_dir / "vae", variant="bf16")
    make_scheduler(parts.decoder.scheduler_config).save_pretrained(decoder_dir / "scheduler")
    return folder


@pytest.fixture(scope="module")
def official_dir(parts, tmp_path_factory):
    return write_official(tmp_path_factory.mktemp("official") / "BLIP3o-Model-8B", parts)


@pytest.fixture(scope="module")
def model(official_dir):
    return Blip3o.from_pretrained(official_dir, dtype=torch.float32)


def reference_velocity(parts, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Official DiT call (nextdit_crossattn.py + blip3o_qwen_inference.py) on diffusers' Lumina-Next."""
    b = x.shape[0]
    with torch.no_grad():
        out = parts.dit(
            hidden_states=x.transpose(1, 2).reshape(b, C, 8, 8),  # (B, 64, C) tokens -> (B, C, 8, 8) latents
            timestep=(1000 * t).to(torch.long),  # official: t.to(torch.long) on the 0..1000 scale
            encoder_hidden_states=parts.projection(cond),
            encoder_mask=torch.ones(b, cond.shape[1]),
            image_rotary_emb=get_2d_rotary_pos_embed_lumina(D // DIT["num_attention_heads"], 384, 384),
            cross_attention_kwargs={},
        ).sample
    return out.flatten(2).transpose(1, 2)  # (B, 64, C)


def test_dit_matches_diffusers_lumina_next(model, parts):
    assert model.config.dit.quantize_timesteps
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(3, 64, C, generator=g), torch.randn(3, 64, H, generator=g)
    t = torch.tensor([0.25, 0.9337, 1.0])  # 933.7 -> 933, as the official long cast
    with torch.no_grad():
        ours = model.dit(x, t, cond)
    torch.testing.assert_close(ours, reference_velocity(parts, x, t, cond), atol=1e-4, rtol=1e-4)


def test_backbone_matches_transformers_loading_the_old_names(model, parts, tmp_path):
    # transformers 5 renames the 4.51 names itself on load: an independent check of map_key.
    llm = {k: v for k, v in parts.tensors.items() if k.startswith(("model.embed", "model.layers", "model.norm",
                                                                    "visual.", "lm_head"))}
    save_file(llm, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reference_qwen_config(LLM, VISION, MROPE, VOCAB, tied=False).save_pretrained(tmp_path)
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    ours = model.backbone.model.state_dict()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.backbone.model(input_ids=ids).logits, reference(input_ids=ids).logits)
        # the condition: prompt + [IMG] + official latent_queries -> last hidden states at the queries
        text = model.backbone.tokenizer([GENERATION_PROMPT.format(prompt="a red circle")], add_special_tokens=False)
        ids = torch.tensor([text.input_ids[0] + [151665]])
        queries = parts.tensors["model.latent_queries"]
        embeds = torch.cat([reference.get_input_embeddings()(ids), queries], dim=1)
        expected = reference.model.language_model(inputs_embeds=embeds).last_hidden_state[:, -64:]
        torch.testing.assert_close(model.condition(["a red circle"]), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.queries, queries)


def test_tokenizer_eva_and_decoder_load(model, parts):
    assert model.backbone.img_token_id == 151665 and len(model.backbone.tokenizer) == VOCAB
    assert model.config.clip_encoder == EVA and model.config.num_queries == 64
    for name, tensor in parts.eva.state_dict().items():
        assert torch.equal(model.clip_encoder.state_dict()[name], tensor), name
    assert model.config.decoder.token_width == C
    for source, loaded in ((parts.decoder.unet, model.decoder.unet), (parts.decoder.vae, model.decoder.vae)):
        for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
    assert model.config.extra["converted_from"] == "official BLIP3-o"


def test_official_folders_load_in_the_originals_dtypes(official_dir):
    """The original runs its model in float16 (`torch_dtype=torch.float16`) and its decoder pipeline in bfloat16;
    a dtype given casts every part."""
    default = Blip3o.from_pretrained(official_dir)
    for part in ("backbone", "dit", "clip_encoder"):
        assert {p.dtype for p in getattr(default, part).parameters()} == {torch.float16}, part
    assert default.queries.dtype == torch.float16
    assert {p.dtype for p in default.decoder.parameters()} == {torch.bfloat16}
    cast = Blip3o.from_pretrained(official_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}


def test_convert_round_trip(official_dir, tmp_path):
    assert cli_main(["convert", str(official_dir), str(tmp_path / "native")]) == 0
    assert "format_version" in json.loads((tmp_path / "native" / "config.json").read_text())
    model = Blip3o.from_pretrained(official_dir)  # the dtypes convert writes: the original's
    native = Blip3o.from_pretrained(tmp_path / "native")
    assert native.config.dit == model.config.dit and native.config.backbone == model.config.backbone
    for (name, a), (_, b) in zip(model.state_dict().items(), native.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert native.condition(["a red circle"]).equal(model.condition(["a red circle"]))


def test_4b_style_tied_lm_head_loads_tied(parts, tmp_path):
    tied = Blip3o.from_pretrained(write_official(tmp_path / "BLIP3o-Model-4B", parts, tied=True), dtype=torch.float32)
    lm = tied.backbone.model
    assert lm.lm_head.weight is lm.model.language_model.embed_tokens.weight
    assert torch.equal(lm.lm_head.weight, parts.tensors["model.embed_tokens.weight"])


def test_missing_eva_from_separate_weights_or_random(parts, tmp_path, monkeypatch):
    folder = write_official(tmp_path / "no-eva", parts, eva=False)
    eva_dir = tmp_path / "eva"
    eva_dir.mkdir()
    save_file({f"vision_tower.model.{k}": v for k, v in parts.eva.state_dict().items()},
              str(eva_dir / "model.safetensors"))
    loaded = Blip3o.from_pretrained(folder, clip_encoder_weights=eva_dir, dtype=torch.float32)
    for name, tensor in parts.eva.state_dict().items():
        assert torch.equal(loaded.clip_encoder.state_dict()[name], tensor), name
    # no tower anywhere: random EVA-CLIP-E (here shrunk to the tiny width), with a loud warning
    monkeypatch.setitem(CLIP_ENCODER_PRESETS, "eva-clip-e", EVA)
    with pytest.warns(UserWarning, match="RANDOM"):
        random = Blip3o.from_pretrained(folder)
    assert all(p.device.type == "cpu" and p.isfinite().all() for p in random.clip_encoder.parameters())


# ---------------------------------------------------------------------------------------------- 8B / 4B key lists

OFFICIAL_LLM = {  # Qwen2.5-VL-7B / -3B numbers, as in the official config.json
    "8b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=128000),
    "4b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=128000),
}
OFFICIAL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31])
OFFICIAL_DIT = dict(sample_size=8, patch_size=1, in_channels=1792, hidden_size=1792, num_layers=24,
                    num_attention_heads=28, num_kv_heads=28, multiple_of=256, ffn_dim_multiplier=None, norm_eps=1e-5,
                    learn_sigma=False, qk_norm=True, cross_attention_dim=1792)


def official_shapes(size: str) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of an official folder, from the reference architectures on meta."""
    llm, tied = OFFICIAL_LLM[size], size == "4b"
    vision = dict(OFFICIAL_VISION, out_hidden_size=llm["hidden_size"])
    with torch.device("meta"):
        qwen = Qwen2_5_VLForConditionalGeneration(reference_qwen_config(llm, vision, [16, 24, 24], VOCAB, tied))
        dit = LuminaNextDiT2DModel(**OFFICIAL_DIT)
        eva = build_clip_encoder(CLIP_ENCODER_PRESETS["eva-clip-e"])
    shapes = {legacy_name(k): tuple(v.shape) for k, v in qwen.state_dict().items()}  # tied: both names
    shapes.update({f"model.dit.model.{k}": tuple(v.shape) for k, v in dit.state_dict().items() if k != "pad_token"})
    hidden = llm["hidden_size"]
    shapes.update({"model.dit.model.caption_projection.linear_1.weight": (1792, hidden),
                   "model.dit.model.caption_projection.linear_1.bias": (1792,),
                   "model.dit.model.caption_projection.linear_2.weight": (1792, 1792),
                   "model.dit.model.caption_projection.linear_2.bias": (1792,)})
    shapes.update({OFFICIAL_PREFIX + k: tuple(v.shape) for k, v in eva.state_dict().items()})
    shapes["model.latent_queries"] = (1, 64, hidden)
    return shapes


def test_every_official_8b_key_maps_onto_one_parameter():
    shapes = official_shapes("8b")
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (VOCAB, 3584)
    assert shapes["model.dit.model.layers.0.feed_forward.linear_1.weight"] == (4864, 1792)
    assert "model.dit.model.layers.0.attn1.to_out.0.weight" not in shapes
    assert "model.dit.model.layers.0.attn2.to_out.0.weight" in shapes
    assert sum(k.startswith(OFFICIAL_PREFIX) for k in shapes) == 772
    ours = {k: tuple(v.shape) for k, v in Blip3o.from_preset("blip3o-8b", device="meta").state_dict().items()}
    mapped: dict[str, str] = {}
    for name, shape in shapes.items():
        target = official.map_key(name)
        assert target in ours, name
        assert ours[target] == shape, (name, target)
        assert target not in mapped, f"{name} and {mapped[target]} both map onto {target}"
        mapped[target] = name
    uncovered = {k for k in ours if not k.startswith("decoder.")} - set(mapped)
    assert uncovered == set(official.NATIVE_ONLY) == set()


def test_8b_and_4b_configs_are_the_presets():
    for size, preset in (("8b", "blip3o-8b"), ("4b", "blip3o-4b")):
        shapes = official_shapes(size)
        renamed = {official.map_key(k): v for k, v in shapes.items()}
        base = get_preset(preset)
        dit = official._dit_config(official._section(renamed, "dit."), base.dit, 8, "x")
        assert dit == dataclasses.replace(base.dit, quantize_timesteps=True)
        assert official._eva_config(official._section(renamed, "clip_encoder."), 4, "x") == base.clip_encoder
        raw = official_config_json(OFFICIAL_LLM[size], dict(OFFICIAL_VISION, out_hidden_size=base.backbone.hidden_size),
                                   [16, 24, 24], VOCAB, size == "4b", 1792)
        assert official.backbone_config(raw, base.backbone, VOCAB) == base.backbone


def test_4b_lm_head_and_embedding_both_map_and_are_tied():
    shapes = official_shapes("4b")
    model = Blip3o.from_preset("blip3o-4b", device="meta")
    lm = model.backbone.model
    assert lm.lm_head.weight is lm.model.language_model.embed_tokens.weight
    state = model.state_dict()
    for name in ("lm_head.weight", "model.embed_tokens.weight"):
        assert tuple(state[official.map_key(name)].shape) == shapes[name] == (VOCAB, 2048)


def test_map_key():
    assert official.map_key("model.rotary_emb.inv_freq") is None
    assert official.map_key("visual.rotary_pos_emb.inv_freq") is None
    assert official.map_key("model.latent_queries") == "queries"
    with pytest.raises(CheckpointError, match="not a tensor of the official"):
        official.map_key("model.down_projector.weight")


# ---------------------------------------------------------------------------------------------- bad input


def test_folder_neither_native_nor_official(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="neither a blip3o checkpoint"):
        Blip3o.from_pretrained(tmp_path)


def test_wrong_shape_and_unknown_key(parts, tmp_path):
    bad = dict(parts.tensors, **{"model.dit.model.layers.1.attn2.to_out.0.weight": torch.zeros(D, D + 1)})
    with pytest.raises(CheckpointError, match=r"wrong shape.*dit\.layers\.1\.attn2\.to_out\.0\.weight"):
        Blip3o.from_pretrained(write_official(tmp_path / "shape", parts, tensors=bad))
    unknown = dict(parts.tensors, **{"model.mystery.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="model.mystery.weight"):
        Blip3o.from_pretrained(write_official(tmp_path / "unknown", parts, tensors=unknown))


def rewrite_json(path, **changes) -> None:
    """Set fields of a JSON file; a dotted name sets a field of a nested object."""
    raw = json.loads(path.read_text())
    for name, value in changes.items():
        *holders, key = name.split(".")
        target = raw
        for holder in holders:
            target = target[holder]
        target[key] = value
    path.write_text(json.dumps(raw))


@pytest.fixture(scope="module")
def official_copy(official_dir, tmp_path_factory):
    """A fresh copy of the official folder for each call, to damage."""
    def copy(name: str):
        return shutil.copytree(official_dir, tmp_path_factory.mktemp("damaged") / name)
    return copy


@pytest.mark.parametrize("file, changes, message", [
    ("config.json", {"num_hidden_layers": 10**9}, "num_hidden_layers is 1000000000; at most 4096"),
    ("config.json", {"hidden_size": "32"}, "hidden_size is '32'; it must be an integer"),
    ("config.json", {"vision_config.depth": 1e9}, "vision_config.depth is 1000000000.0; it must be an integer"),
    ("config.json", {"vision_config": [2]}, r"vision_config must be an object, got \[2\]"),
    ("config.json", {"rope_scaling.mrope_section": [1, 1, 10**9]},
     r"rope_scaling.mrope_section\[2\] is 1000000000; at most 131072"),
    ("diffusion-decoder/unet/config.json", {"layers_per_block": 10**9}, "layers_per_block is 1000000000; at most 64"),
    ("diffusion-decoder/vae/config.json", {"block_out_channels": [16, 32] * 50},
     "block_out_channels has 100 entries; at most 8"),
    ("diffusion-decoder/scheduler/scheduler_config.json", {"num_train_timesteps": 10**12},
     "num_train_timesteps is 1000000000000; at most 100000"),
])
def test_absurd_official_configs_are_refused_by_file_and_field(official_copy, file, changes, message):
    folder = official_copy("config")
    rewrite_json(folder / file, **changes)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(folder / file))}: {message}"):
        Blip3o.from_pretrained(folder)


def test_official_weights_describing_an_absurd_dit_are_refused(parts, tmp_path):
    # the DiT's depth is read from the tensor names: one block numbered 999,999,999 asks for a billion layers
    tensors = {re.sub(r"^model\.dit\.model\.layers\.1\.", "model.dit.model.layers.999999999.", k): v
               for k, v in parts.tensors.items()}
    folder = write_official(tmp_path / "deep", parts, tensors=tensors)
    with pytest.raises(CheckpointError, match=f"official BLIP3-o folder {folder}: dit.num_layers is 1000000000; at "
                                              "most 4096"):
        Blip3o.from_pretrained(folder)


def test_a_fifo_in_the_decoder_folder_is_refused_not_opened(official_copy):
    folder = official_copy("fifo")
    unet_config = folder / "diffusion-decoder" / "unet" / "config.json"
    unet_config.unlink()
    os.mkfifo(unet_config)
    with pytest.raises(CheckpointError, match=f"{unet_config} is not a regular file"):
        Blip3o.from_pretrained(folder)
