"""Backbone: tiny random Qwen2.5-VL end to end on CPU, exact parameter counts of the real presets."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration

from blip3o.backbone import BACKBONE_PRESETS, GENERATION_PROMPT, Backbone, BackboneConfig
from blip3o.tokenizer import (
    ASSET,
    SHAPES_WORDS,
    SPECIAL_IDS,
    build_builtin_tokenizer,
    load_builtin_tokenizer,
)

Q = 64


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    torch.manual_seed(0)
    return Backbone(BACKBONE_PRESETS["debug"]).freeze()


@pytest.fixture(scope="module")
def queries(backbone) -> torch.Tensor:
    return torch.randn(1, Q, backbone.hidden_size, generator=torch.Generator().manual_seed(1))


def shapes_image(color=(220, 40, 40)) -> Image.Image:
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((10, 10, 26, 26), fill=color)
    return image


# --- condition ---------------------------------------------------------------------------------

def test_condition_shape(backbone, queries):
    c = backbone.condition(["a red circle", "a photo of two blue squares"], queries)
    assert c.shape == (2, Q, backbone.hidden_size)
    assert torch.isfinite(c).all()


def test_generation_prompt_is_the_official_one():
    assert GENERATION_PROMPT.format(prompt="x") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Please generate image based on the following caption: x<|im_end|>\n<|im_start|>assistant\n"
    )


def test_left_padding_does_not_change_a_condition(backbone, queries):
    short = "a red circle"
    long = "a photo of a green cross left of a purple triangle and three yellow squares"
    alone = backbone.condition([short], queries)
    batch = backbone.condition([long, short, short + " above a blue square"], queries)
    assert len(backbone.tokenizer(long).input_ids) > len(backbone.tokenizer(short).input_ids)
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[0], backbone.condition([long], queries)[0], atol=1e-5, rtol=0)


def test_condition_after_image_chat_is_unchanged(backbone, queries):
    # generate() stores mrope deltas on the model; condition must not pick them up.
    before = backbone.condition(["a blue square"], queries)
    backbone.answer([shapes_image()], ["what color is the circle?"], max_new_tokens=2)
    torch.testing.assert_close(backbone.condition(["a blue square"], queries), before, atol=0, rtol=0)


def test_training_condition_differentiates_only_the_queries_and_is_exact(backbone, queries):
    # With the queries trained and the backbone frozen, the prompt runs without a graph and only the query
    # positions are differentiated: values and the queries' gradient must equal the one-pass forward's.
    prompts = ["a photo of a green cross left of a purple triangle", "a red circle"]  # padded batch
    weights = torch.randn(2, Q, backbone.hidden_size, generator=torch.Generator().manual_seed(2))
    q_split = queries.clone().requires_grad_(True)
    split = backbone.condition(prompts, q_split)
    (split * weights).sum().backward()
    q_full = queries.clone().requires_grad_(True)
    lm = backbone.model.model.language_model
    lm.requires_grad_(True)  # a trained backbone takes the one-pass path (its prompt needs gradients too)
    try:
        full = backbone.condition(prompts, q_full)
        (full * weights).sum().backward()
    finally:
        backbone.freeze()
        backbone.zero_grad(set_to_none=True)
    torch.testing.assert_close(split, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(q_split.grad, q_full.grad, atol=1e-5, rtol=1e-4)
    assert q_split.grad.abs().sum() > 0
    with torch.no_grad():  # and inference (no graph) is the one-pass path, same values
        torch.testing.assert_close(backbone.condition(prompts, queries), split.detach(), atol=1e-5, rtol=0)


def test_negative_condition_is_img_then_queries(backbone, queries):
    negative = backbone.negative_condition(queries)
    assert negative.shape == (1, Q, backbone.hidden_size)
    # Official CFG negative: the one-space prompt untemplated, i.e. " " + [IMG] + queries and nothing else.
    space = backbone.tokenizer([" "], add_special_tokens=False).input_ids[0]
    ids = torch.tensor([[*space, backbone.img_token_id]])
    embeds = torch.cat([backbone.model.get_input_embeddings()(ids), queries], dim=1)  # (1, P + Q, H)
    expected = backbone.model.model.language_model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    torch.testing.assert_close(negative, expected[:, -Q:], atol=1e-6, rtol=0)


def test_gradients_reach_queries_not_backbone(backbone, queries):
    q = queries.clone().requires_grad_(True)
    backbone.condition(["a red circle", "two blue squares"], q).square().mean().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert not backbone.training


# --- understanding -----------------------------------------------------------------------------

def test_answer_batched_greedy_and_seeded_sampling(backbone):
    images = [shapes_image(), None, shapes_image((40, 70, 210))]
    questions = ["how many circles are there?", "is there a red square?", "what color is the circle?"]
    greedy = backbone.answer(images, questions, max_new_tokens=6)
    assert isinstance(greedy, list) and len(greedy) == 3 and all(isinstance(a, str) for a in greedy)
    assert backbone.answer(images, questions, max_new_tokens=6) == greedy
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.95)
    first = backbone.answer(images, questions, seed=3, **kw)
    assert backbone.answer(images, questions, seed=3, **kw) == first


def test_answer_in_batch_matches_answer_alone(backbone):
    # Left padding with mrope positions from the mask: a question's greedy answer is its own.
    images, questions = [shapes_image(), None], ["what shape is the red object?", "hi"]
    batch = backbone.answer(images, questions, max_new_tokens=5)
    assert batch[0] == backbone.answer(images[:1], questions[:1], max_new_tokens=5)[0]


def test_chat_multi_turn_with_image(backbone):
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "image", "image": shapes_image()},
                                     {"type": "text", "text": "what color is the circle?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "text", "text": "how many circles are there?"}]},
    ]
    replies = backbone.chat([conversation, conversation[1:2]], max_new_tokens=4)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_chat_template_matches_qwen_format(backbone):
    text = backbone.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        tokenize=False, add_generation_prompt=True,
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_nano_processor_keeps_shapes_images_at_64_tokens():
    backbone = Backbone(BACKBONE_PRESETS["nano"])
    out = backbone.processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[shapes_image()],
                             return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 16, 16]]  # 64 px / 4 px patches, not resized
    assert (out["input_ids"] == backbone.model.config.image_token_id).sum() == 64  # 2x2 patches merged


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "prompts, error, match",
    [
        ([], ValueError, "must not be empty"),
        (["ok", ""], ValueError, r"prompts\[1\] is empty"),
        (["ok", "  "], ValueError, r"prompts\[1\] is empty"),
        (["ok", 3], TypeError, r"prompts\[1\] must be a str"),
        ("a red circle", TypeError, "list of strings"),
    ],
)
def test_bad_prompts(backbone, queries, prompts, error, match):
    with pytest.raises(error, match=match):
        backbone.condition(prompts, queries)


@pytest.mark.parametrize("shape", [(Q, 64), (2, Q, 64), (1, Q, 32), (1, 0, 64)])
def test_bad_queries_shape(backbone, shape):
    with pytest.raises(ValueError, match=r"queries must have shape \(1, Q, 64\)"):
        backbone.condition(["a red circle"], torch.zeros(shape))


def test_bad_understanding_inputs(backbone):
    with pytest.raises(ValueError, match="one entry"):
        backbone.answer([shapes_image()], ["a?", "b?"])
    with pytest.raises(TypeError, match=r"questions\[0\] must be a str"):
        backbone.answer([None], [1])
    with pytest.raises(TypeError, match="must be a PIL.Image.Image"):
        backbone.answer(["not an image"], ["a?"])
    with pytest.raises(ValueError, match="at least 8 px"):
        backbone.answer([Image.new("RGB", (4, 4))], ["a?"])
    with pytest.raises(ValueError, match="role"):
        backbone.chat([[{"role": "robot", "content": "hi"}]])


# --- building and loading ----------------------------------------------------------------------

def expected_parameters(c: BackboneConfig) -> int:
    """Parameter count of Qwen2.5-VL from its architecture, independent of transformers."""
    H, I, V = c.hidden_size, c.intermediate_size, c.vocab_size
    kv = H // c.num_heads * c.num_kv_heads  # width of k and v
    attention = (H * H + H) + 2 * (H * kv + kv) + H * H  # q, k, v with bias; o without
    layer = attention + 3 * H * I + 2 * H  # SwiGLU MLP, two RMSNorms
    text = V * H + c.num_layers * layer + H + (0 if c.tie_word_embeddings else V * H)
    vh, vi = c.vision_hidden_size, c.vision_intermediate_size
    block = 2 * vh + (3 * vh * vh + 3 * vh) + (vh * vh + vh) + 2 * (vh * vi + vi) + (vi * vh + vh)
    merged = vh * c.spatial_merge_size**2
    merger = vh + (merged * merged + merged) + (merged * H + H)  # RMSNorm, two-layer MLP
    patch_embed = 3 * c.temporal_patch_size * c.patch_size**2 * vh  # Conv3d without bias
    return text + patch_embed + c.vision_depth * block + merger


def meta_parameters(name: str) -> int:
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(BACKBONE_PRESETS[name].to_hf())
    return sum(p.numel() for p in model.parameters())


def test_7b_preset_parameter_count():
    config = BACKBONE_PRESETS["qwen2.5-vl-7b"]
    # Qwen2.5-VL-7B-Instruct as published: 8,292,166,656 parameters with 152,064 untied rows of
    # embedding and lm_head; BLIP3-o resized both to its tokenizer's 151,668 rows.
    published = 8_292_166_656 - 2 * (152_064 - 151_668) * 3584
    assert meta_parameters("qwen2.5-vl-7b") == expected_parameters(config) == published == 8_289_328_128


def test_3b_preset_parameter_count():
    config = BACKBONE_PRESETS["qwen2.5-vl-3b"]
    # Qwen2.5-VL-3B-Instruct: 3,754,622,976 with 151,936 tied rows; here 151,668 rows.
    published = 3_754_622_976 - (151_936 - 151_668) * 2048
    assert meta_parameters("qwen2.5-vl-3b") == expected_parameters(config) == published


@pytest.mark.parametrize("name", ["debug", "nano"])
def test_small_presets_match_the_formula(name):
    backbone = Backbone(BACKBONE_PRESETS[name])
    assert sum(p.numel() for p in backbone.parameters()) == expected_parameters(BACKBONE_PRESETS[name])


def test_meta_build_then_load_and_init_buffers_reproduces_condition(backbone, queries):
    with torch.device("meta"):
        rebuilt = Backbone(BACKBONE_PRESETS["debug"])
    rebuilt.load_state_dict(backbone.state_dict(), assign=True)
    rebuilt.init_buffers()
    rebuilt.freeze()
    assert all(b.device.type == "cpu" for b in rebuilt.buffers())
    prompts = ["a red circle", "two blue squares above a cross"]
    torch.testing.assert_close(rebuilt.condition(prompts, queries), backbone.condition(prompts, queries),
                               atol=0, rtol=0)


def test_config_checks():
    with pytest.raises(ValueError, match="mrope_section"):
        BackboneConfig(hidden_size=64, num_heads=4, num_kv_heads=2, mrope_section=[16, 24, 24])
    with torch.device("meta"):  # an official-vocabulary preset builds without a tokenizer...
        backbone = Backbone(BACKBONE_PRESETS["qwen2.5-vl-7b"])
    with pytest.raises(RuntimeError, match="no tokenizer"):  # ...but says what it lacks when used
        backbone.condition(["a red circle"], torch.zeros(1, 64, 3584, device="meta"))


# --- tokenizers --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "a photo of a red circle left of two blue squares",
    "Ünïcödé, 世界 🙂 tabs\tand\nnewlines  double  spaces 12345 <b>html</b>",
    "",
])
def test_builtin_tokenizer_round_trips_any_text(text):
    tokenizer = load_builtin_tokenizer()
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_builtin_tokenizer_keeps_shapes_words_whole():
    tokenizer = load_builtin_tokenizer()
    for word in SHAPES_WORDS:
        assert len(tokenizer(word).input_ids) == 1, word
        assert len(tokenizer(" " + word).input_ids) == 1, word
    assert len(tokenizer("a photo of a yellow triangle below a cyan cross").input_ids) == 10  # one per word


def test_builtin_tokenizer_asset_is_reproducible_and_ids_fixed():
    assert build_builtin_tokenizer().get_vocab() == Tokenizer.from_file(str(ASSET)).get_vocab()
    tokenizer = load_builtin_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|image_pad|>", "[IMG]", "[/IMG]",
                                           "<image>"])
    assert ids == [SPECIAL_IDS[t] for t in ["<|endoftext|>", "<|im_end|>", "<|image_pad|>", "[IMG]", "[/IMG]",
                                            "<image>"]]
    assert len(tokenizer) <= BACKBONE_PRESETS["nano"].vocab_size
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.padding_side == "left"


def test_checkpoint_tokenizer_gets_official_blip3o_ids(tmp_path):
    # A stand-in with Qwen2.5's layout: 151,643 ordinary tokens, then its 22 control tokens
    # (151643..151664). BLIP3-o's script appends [IMG], [/IMG], <image> -> 151665, 151666, 151667.
    controls = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"]
    vocab = {f"t{i}": i for i in range(151_643)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(controls)
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>").save_pretrained(tmp_path)
    with torch.device("meta"):
        backbone = Backbone(BACKBONE_PRESETS["qwen2.5-vl-7b"], tokenizer_dir=tmp_path)
    added = backbone.tokenizer.convert_tokens_to_ids(["[IMG]", "[/IMG]", "<image>"])
    assert added == [151665, 151666, 151667]
    assert len(backbone.tokenizer) == BACKBONE_PRESETS["qwen2.5-vl-7b"].vocab_size == 151668
    assert backbone.img_token_id == 151665
