"""A stock Qwen2.5-VL folder loads for understanding and reads exactly what stock transformers reads.

The tiny folder carries Qwen2.5-VL-7B-Instruct's preprocessor_config.json (max_pixels 12,845,056), chat
template and generation_config.json (repetition penalty 1.05, top_k 1), its config.json in the
transformers 4.x layout the release has, and a word-level tokenizer with Qwen2.5's control tokens at
their ids. The reference is transformers itself: AutoImageProcessor, AutoTokenizer and
Qwen2_5_VLForConditionalGeneration.from_pretrained on the same folder (AutoProcessor needs torchvision
for its video processor, so the image placeholders are expanded here as Qwen2_5_VLProcessor does).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from blip3o import Blip3o
from blip3o.backbone import CannotGenerate
from blip3o.checkpoints import CheckpointError
from blip3o.cli import main as cli_main
from blip3o.protocols import PROTOCOLS

QWEN_CONTROLS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
                 "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                 "<|repo_name|>", "<|file_sep|>"]
# Qwen2.5-VL-7B-Instruct's preprocessor_config.json and generation_config.json, as released
PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2_5_VLProcessor"}
GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
              "repetition_penalty": 1.05, "temperature": 0.1, "top_p": 0.001, "top_k": 1}
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           rms_norm_eps=1e-6, max_position_embeddings=4096, vocab_size=151936)
VISION = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14,
              spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1])
QUESTION = "t5 t7 t11"
NEW_TOKENS = 20


def release_config_json() -> dict:
    """config.json in the layout of the Qwen2.5-VL-7B-Instruct release (transformers 4.x: text fields flat)."""
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", **LLM,
            "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
            "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
            "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "torch_dtype": "float32",
            "vision_config": {**VISION, "hidden_act": "silu", "in_chans": 3, "tokens_per_second": 2,
                              "model_type": "qwen2_5_vl"}}


def reference_model_config() -> Qwen2_5_VLConfig:
    text = dict(LLM, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]})
    return Qwen2_5_VLConfig(text_config=text, vision_config=VISION, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2.5-vl")
    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(151_643)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(QWEN_CONTROLS)
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|endoftext|>").save_pretrained(out)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(reference_model_config()).save_pretrained(out)
    (out / "config.json").write_text(json.dumps(release_config_json()))
    (out / "generation_config.json").write_text(json.dumps(GENERATION))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def image():
    """A 1500x900 image: above the class default's 1,003,520 pixels, under the 7B's 12,845,056."""
    g = torch.Generator().manual_seed(0)
    coarse = (torch.rand(9, 15, 3, generator=g) * 255).byte().numpy()
    return Image.fromarray(coarse).resize((1500, 900), Image.BICUBIC)


@pytest.fixture(scope="module")
def model(folder):
    return Blip3o.from_pretrained(folder)


def stock_inputs(folder, image: Image.Image, question: str) -> dict:
    """What stock transformers builds: the folder's image processor, tokenizer and chat template, each
    <|image_pad|> expanded to the image's merged patches as Qwen2_5_VLProcessor does."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vision = AutoImageProcessor.from_pretrained(folder)(images=[image], return_tensors="pt")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    tokens = int(vision["image_grid_thw"][0].prod()) // 4  # merge_size 2 x 2
    text = text.replace("<|image_pad|>", "<|image_pad|>" * tokens)
    ids = tokenizer([text], return_tensors="pt")
    return {**ids, **vision}


@pytest.fixture(scope="module")
def stock_reply(folder, image):
    """The 20 tokens stock transformers generates under the folder's generation config, decoded."""
    inputs = stock_inputs(folder, image, QUESTION)
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder)
    out = reference.generate(**inputs, max_new_tokens=NEW_TOKENS)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert len(new) == NEW_TOKENS  # no early stop: every token is compared
    return AutoTokenizer.from_pretrained(folder).decode(new, skip_special_tokens=True)


def test_inputs_are_stock_transformers(model, folder, image):
    expected = stock_inputs(folder, image, QUESTION)
    ours = model.backbone.inputs([[{"role": "user", "content": [{"type": "image", "image": image},
                                                                {"type": "text", "text": QUESTION}]}]])
    assert torch.equal(ours["input_ids"], expected["input_ids"])
    assert torch.equal(ours["image_grid_thw"], expected["image_grid_thw"])
    assert torch.equal(ours["pixel_values"], expected["pixel_values"])
    assert int((ours["input_ids"] == 151655).sum()) == 1728  # the 7B's processor; 1,242 under the class default
    assert model.backbone.pixel_bounds == (3136, 12845056)


def test_answers_are_stock_transformers_through_the_api_cli_and_server(model, folder, image, stock_reply, tmp_path,
                                                                      capsys):
    assert model.answer([image], [QUESTION], max_new_tokens=NEW_TOKENS) == [stock_reply]
    path = tmp_path / "image.png"
    image.save(path)
    assert cli_main(["ask", str(path), QUESTION, "--model", str(folder), "--max-new-tokens", str(NEW_TOKENS)]) == 0
    assert capsys.readouterr().out.strip() == stock_reply.strip()
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(path.read_bytes())
                                            .decode()}},
        {"type": "text", "text": QUESTION}]}], "max_tokens": NEW_TOKENS}
    with served(model) as client:
        reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == stock_reply


def served(model):
    from fastapi.testclient import TestClient

    from blip3o.server import Blip3oService, ServerConfig, create_app

    return TestClient(create_app(Blip3oService(model, "qwen", ServerConfig(max_image_pixels=2000 * 2000))))


def test_generation_is_refused_with_the_reason(model, folder, capsys):
    with pytest.raises(CannotGenerate, match="stock Qwen2.5-VL"):
        model.generate(["a red circle"])
    assert cli_main(["generate", "a red circle", "--model", str(folder)]) == 2
    assert "cannot generate images" in capsys.readouterr().err
    with served(model) as client:
        reply = client.post("/v1/images/generations", json={"prompt": "a red circle"})
    assert reply.status_code == 400 and "cannot generate images" in reply.json()["error"]["message"]


def test_pixel_bounds_per_call_and_class_defaults_without_a_preprocessor_config(model, folder, image, tmp_path):
    conversation = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "t1"}]}]]
    small = model.backbone.inputs(conversation, max_pixels=200_704)
    assert int(small["image_grid_thw"].prod()) * 14 * 14 <= 200_704
    with pytest.raises(ValueError, match="min_pixels 9 is above max_pixels 4"):
        model.backbone.inputs(conversation, min_pixels=9, max_pixels=4)
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "preprocessor_config.json").unlink()
    assert Blip3o.from_pretrained(bare).backbone.pixel_bounds == (56 * 56, 28 * 28 * 1280)


def test_a_call_overrides_the_folders_generation_config(model, image):
    config = model.backbone.model.generation_config
    assert (config.repetition_penalty, config.top_k) == (1.05, 1)
    options = model.backbone.generate_options(do_sample=False, temperature=None, top_p=None, top_k=None)
    assert options["do_sample"] is False and options["eos_token_id"] == [151645, 151643]
    assert model.backbone.generate_options(stop_tokens=["<|im_end|>"])["eos_token_id"] == [151645]


def test_a_converted_stock_folder_keeps_its_processor_and_generation_config(model, image, tmp_path):
    model.save_pretrained(tmp_path / "native")
    again = Blip3o.from_pretrained(tmp_path / "native")
    assert again.backbone.pixel_bounds == (3136, 12845056)
    assert again.backbone.model.generation_config.repetition_penalty == 1.05
    assert again.answer([image], [QUESTION], max_new_tokens=4) == model.answer([image], [QUESTION], max_new_tokens=4)
    with pytest.raises(CannotGenerate):
        again.generate(["a red circle"])


def test_answers_are_returned_as_decoded(model, monkeypatch):
    def decode(ids, skip_special_tokens=True):
        return [" spaced answer \n"] * len(ids)

    monkeypatch.setattr(model.backbone.tokenizer, "batch_decode", decode)
    assert model.answer([None], [QUESTION], max_new_tokens=1) == [" spaced answer \n"]



# ---------------------------------------------------------------------------------------------
# The evaluation protocols
# ---------------------------------------------------------------------------------------------


def originals_evaluation_inputs(folder, image: Image.Image, question: str) -> dict:
    """The original's lmms-eval model: convert("RGB"), a JPEG at PIL's default quality decoded again, the processor
    built with min_pixels 256 * 28 * 28 and max_pixels 2048 * 28 * 28."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG")
    decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    processor = AutoImageProcessor.from_pretrained(folder, min_pixels=200_704, max_pixels=1_605_632)
    vision = processor(images=[decoded], return_tensors="pt")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(vision["image_grid_thw"][0].prod()) // 4))
    return {**tokenizer([text], return_tensors="pt"), **vision}


@pytest.mark.parametrize("size", [(100, 60), (1500, 900)])
def test_blip3o_protocol_builds_the_originals_evaluation_inputs(model, folder, image, size):
    photo = image.resize(size, Image.BICUBIC)
    expected = originals_evaluation_inputs(folder, photo, QUESTION)
    ours = PROTOCOLS["blip3o"].inputs(model, photo, QUESTION)
    for key in ("input_ids", "image_grid_thw", "pixel_values"):
        assert torch.equal(ours[key], expected[key]), key
    if size == (100, 60):  # 273 image tokens, where the 7B's own processor gives 8
        assert int((ours["input_ids"] == 151655).sum()) == 273
        assert int((PROTOCOLS["stock"].inputs(model, photo, QUESTION)["input_ids"] == 151655).sum()) == 8


def test_blip3o_protocol_asks_one_question_a_call_and_stops_at_im_end(model, image, monkeypatch):
    calls = []

    def answer(images, questions, **options):
        calls.append((len(images), options))
        return ["a"] * len(images)

    monkeypatch.setattr(model, "answer", answer)
    assert PROTOCOLS["blip3o"].answer(model, [image] * 3, ["q1", "q2", "q3"], batch_size=8) == ["a"] * 3
    assert [n for n, _ in calls] == [1, 1, 1]
    assert calls[0][1] == {"min_pixels": 200_704, "max_pixels": 1_605_632, "stop_tokens": ("<|im_end|>",)}
    settings = PROTOCOLS["blip3o"].settings(model)
    assert settings["pixel_bounds"] == [200_704, 1_605_632] and settings["stop_ids"] == [151645]
    assert settings["jpeg_round_trip"] and settings["gpu_dtype"] == "float16" and settings["batch_size"] == 1
    assert PROTOCOLS["stock"].settings(model)["stop_ids"] == [151645, 151643]  # the folder's generation config


def test_ask_writes_the_protocol_beside_the_answers(folder, image, tmp_path, capsys):
    image.resize((100, 60)).save(tmp_path / "a.png")
    (tmp_path / "q.jsonl").write_text(json.dumps({"image": "a.png", "question": QUESTION}) + "\n")
    out = tmp_path / "answers.jsonl"
    args = ["ask", "--questions-file", str(tmp_path / "q.jsonl"), "--out", str(out), "--model", str(folder),
            "--max-new-tokens", "2"]
    assert cli_main([*args, "--protocol", "blip3o"]) == 0
    settings = json.loads(out.with_suffix(".protocol.json").read_text())
    assert settings["name"] == "blip3o" and settings["pixel_bounds"] == [200_704, 1_605_632]
    assert settings["max_new_tokens"] == 2 and len(out.read_text().splitlines()) == 1
    assert cli_main([*args, "--protocol", "blip3o", "--batch-size", "2"]) == 2
    assert "--batch-size cannot go with --protocol blip3o" in capsys.readouterr().err


@pytest.mark.parametrize("file, changes, message", [
    ("config.json", {"num_hidden_layers": 10**9}, "num_hidden_layers is 1000000000; at most 4096"),
    ("config.json", {"hidden_size": float("nan")}, "hidden_size is nan; it must be an integer"),
    ("config.json", {"vision_config": {**VISION, "num_heads": 0}}, "vision_config.num_heads is 0; at least 1"),
    ("preprocessor_config.json", {"min_pixels": 10**12}, "min_pixels is 1000000000000; at most 67108864"),
    ("preprocessor_config.json", {"max_pixels": "many"}, "max_pixels is 'many'; it must be an integer"),
    ("generation_config.json", {"num_beams": 10**9}, "num_beams is 1000000000; at most 1024"),
])
def test_absurd_stock_configs_are_refused_by_file_and_field(folder, tmp_path, capsys, file, changes, message):
    damaged = shutil.copytree(folder, tmp_path / "damaged")
    raw = json.loads((damaged / file).read_text())
    (damaged / file).write_text(json.dumps({**raw, **changes}))
    with pytest.raises(CheckpointError, match=f"^{damaged / file}: {message}"):
        Blip3o.from_pretrained(damaged)
    Image.new("RGB", (32, 32)).save(tmp_path / "image.png")
    assert cli_main(["ask", str(tmp_path / "image.png"), QUESTION, "--model", str(damaged)]) == 2
    assert f"{damaged / file}: " in capsys.readouterr().err


def test_a_fifo_generation_config_is_refused_not_opened(folder, tmp_path):
    damaged = shutil.copytree(folder, tmp_path / "fifo")
    (damaged / "generation_config.json").unlink()
    os.mkfifo(damaged / "generation_config.json")

    def hangs(*args):
        raise TimeoutError("the loader opened the FIFO and waits on it")

    previous = signal.signal(signal.SIGALRM, hangs)
    signal.alarm(60)
    try:
        with pytest.raises(CheckpointError, match="generation_config.json is not a regular file"):
            Blip3o.from_pretrained(damaged)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
