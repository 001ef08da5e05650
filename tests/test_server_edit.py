"""Editing through `blip3o serve`: `/v1/images/edits` in OpenAI's multipart form (the official openai client),
and chat requests whose reply is an image, drawn or edited from the conversation's latest image (the debug
model, which edits)."""

import base64
import dataclasses
import io
import json
import threading
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from blip3o import Blip3o
from test_server import LIMITS, RED, big_png, data_uri, noise, png, request, running, wait_for

BLUE = Image.new("RGB", (32, 32), (40, 40, 220))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Blip3o.from_preset("debug")


@pytest.fixture(scope="module")
def server(model):
    with running(model, batch_window_ms=30, **LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0)


def record_edits(model, monkeypatch) -> list:
    """The (sources as RGB bytes, instructions) of each `model.edit` call from here on."""
    calls, real = [], model.edit

    def edit(images, instructions, **kwargs):
        rows = [row if isinstance(row, list) else [row] for row in images]
        calls.append(([[im.convert("RGB").tobytes() for im in row] for row in rows], list(instructions)))
        return real(images, instructions, **kwargs)

    monkeypatch.setattr(model, "edit", edit)
    return calls


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def from_url(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return decoded(url.split(",", 1)[1])


def post_form(server, fields: dict, files: list[tuple[str, bytes]], content_type: str | None = None):
    """(status, parsed JSON) of a multipart/form-data POST to /v1/images/edits; files are (field name, bytes)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f{k}.png"\r\n'
              f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for k, (name, data) in enumerate(files)]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    headers = {"Content-Type": content_type or f"multipart/form-data; boundary={boundary}"}
    req = urllib.request.Request(server.url + "/v1/images/edits", data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ------------------------------------------------------------------ /v1/images/edits through the openai client


def test_openai_client_edits_an_image_as_the_library_does(client, model):
    result = client.images.edit(model="debug", image=("red.png", png(RED), "image/png"), prompt="make it blue",
                                n=2, size="32x32", response_format="b64_json", extra_body={"seed": 7})
    got = [decoded(d.b64_json) for d in result.data]
    assert result.created > 0 and [im.size for im in got] == [(32, 32), (32, 32)]
    expected = model.edit([RED], ["make it blue"], num_images=2, seed=7, size=32)
    assert [im.tobytes() for im in got] == [im.tobytes() for im in expected]


def test_openai_client_edits_several_images_answered_as_urls(client, model, monkeypatch):
    calls = record_edits(model, monkeypatch)
    result = client.images.edit(model="debug", image=[("red.png", png(RED), "image/png"),
                                                      ("blue.png", png(BLUE), "image/png")],
                                prompt="put the first shape in the colour of the second", response_format="url",
                                extra_body={"seed": 3})
    (url,) = [d.url for d in result.data]
    assert calls == [([[RED.tobytes(), BLUE.tobytes()]], ["put the first shape in the colour of the second"])]
    (expected,) = model.edit([[RED, BLUE]], ["put the first shape in the colour of the second"], seed=3)
    assert from_url(url).tobytes() == expected.tobytes()


def test_seeded_edits_reproduce_and_unseeded_ones_differ(client):
    def edit(**extra):
        result = client.images.edit(image=("red.png", png(RED), "image/png"), prompt="make it blue",
                                    response_format="b64_json", extra_body=extra)
        return base64.b64decode(result.data[0].b64_json)

    assert edit(seed=11) == edit(seed=11)
    assert edit(seed=11) != edit(seed=12)
    assert edit() != edit()


def test_seeded_edits_share_calls_and_keep_their_solo_images(model, monkeypatch):
    entered, opened, calls, real = threading.Event(), threading.Event(), [], model.edit

    def gated(images, instructions, **kwargs):
        entered.set()
        assert opened.wait(30)
        calls.append((list(instructions), kwargs.get("seed")))
        return real(images, instructions, **kwargs)

    monkeypatch.setattr(model, "edit", gated)
    asks = [("make it blue", 1), ("make it green", 2), ("make it bigger", 3)]
    with running(model, batch_window_ms=50) as server, ThreadPoolExecutor(4) as pool:
        first = pool.submit(post_form, server, {"prompt": "warm up"}, [("image", png(RED))])
        assert entered.wait(20)
        futures = [pool.submit(post_form, server, {"prompt": p, "seed": s}, [("image", png(RED))]) for p, s in asks]
        wait_for(lambda: server.service.batcher.depth == 3)
        opened.set()
        results = [f.result(timeout=60) for f in [first, *futures]]
    assert [status for status, _ in results] == [200] * 4
    assert sorted(zip(*calls[1][:2], strict=True)) == sorted(asks)  # the three seeded edits: one call
    for (prompt, seed), (_, answer) in zip(asks, results[1:], strict=True):
        (solo,) = model.edit([RED], [prompt], seed=seed)
        diff = np.abs(np.asarray(decoded(answer["data"][0]["b64_json"]), np.int16) - np.asarray(solo, np.int16))
        assert diff.max() <= 2, prompt  # the solo call's image, up to rounding between batch sizes


def test_an_edit_holds_its_sources_and_its_images_in_the_memory_budget(model, monkeypatch):
    entered, opened, real = threading.Event(), threading.Event(), model.edit

    def gated(*args, **kwargs):
        entered.set()
        assert opened.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "edit", gated)
    held = 2 * 32 * 32 * 4 + 2 * (len(png(RED)) + 32 * 32 * 4)  # two images made, two sources encoded and decoded
    with running(model, memory_budget_bytes=held + 100) as server, ThreadPoolExecutor(2) as pool:
        first = pool.submit(post_form, server, {"prompt": "swap them", "n": 2}, [("image[]", png(RED))] * 2)
        assert entered.wait(20)
        assert server.service.budget.held == held
        status, answer = post_form(server, {"prompt": "again"}, [("image", png(RED))])
        assert (status, answer["error"]["code"]) == (429, "memory_full")
        opened.set()
        assert first.result(timeout=60)[0] == 200
        wait_for(lambda: server.service.budget.held == 0)


# ------------------------------------------------------------------ bad edit requests


ONE = [("image", png(RED))]
EDIT_ERRORS = [  # (what, fields, files, status, param, code)
    ("no image", {"prompt": "a"}, [], 400, "image", "missing_image"),
    ("the image as text", {"prompt": "a", "image": "red.png"}, [], 400, "image", "invalid_image"),
    ("not an image", {"prompt": "a"}, [("image", b"hello there")], 415, "image", "unsupported_image_type"),
    ("too many bytes", {"prompt": "a"}, [("image", png(noise(200)))], 400, "image", "image_too_large"),
    ("too many pixels", {"prompt": "a"}, [("image", big_png(1024))], 400, "image", "image_too_large"),
    ("a bad second image", {"prompt": "a"}, [("image[]", png(RED)), ("image[]", b"hello")], 415, "image[1]",
     "unsupported_image_type"),
    ("too many images", {"prompt": "a"}, [("image[]", png(RED))] * 3, 400, "image", "too_many_images"),
    ("a mask", {"prompt": "a"}, [*ONE, ("mask", png(RED))], 400, "mask", "mask_not_supported"),
    ("no prompt", {}, ONE, 400, "prompt", "invalid_value"),
    ("empty prompt", {"prompt": "  "}, ONE, 400, "prompt", "invalid_value"),
    ("prompt too long", {"prompt": "x" * 201}, ONE, 400, "prompt", "prompt_too_long"),
    ("n zero", {"prompt": "a", "n": 0}, ONE, 400, "n", "invalid_value"),
    ("n too big", {"prompt": "a", "n": 5}, ONE, 400, "n", "invalid_value"),
    ("n not a number", {"prompt": "a", "n": "two"}, ONE, 400, "n", "invalid_value"),
    ("size not WxH", {"prompt": "a", "size": "32"}, ONE, 400, "size", "invalid_value"),
    ("size the decoder cannot make", {"prompt": "a", "size": "34x34"}, ONE, 400, "size", "invalid_value"),
    ("response format", {"prompt": "a", "response_format": "png"}, ONE, 400, "response_format", "invalid_value"),
    ("seed negative", {"prompt": "a", "seed": -1}, ONE, 400, "seed", "invalid_value"),
    ("steps zero", {"prompt": "a", "steps": 0}, ONE, 400, "steps", "invalid_value"),
    ("unknown model", {"prompt": "a", "model": "dall-e-2"}, ONE, 404, "model", "model_not_found"),
]


@pytest.mark.parametrize(("what", "fields", "files", "status", "param", "code"), EDIT_ERRORS,
                         ids=[e[0] for e in EDIT_ERRORS])
def test_bad_edit_requests_are_refused_clearly(server, what, fields, files, status, param, code):
    got, answer = post_form(server, fields, files)
    assert (got, answer["error"]["param"], answer["error"]["code"]) == (status, param, code), answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"
    assert server.service.budget.held == 0


def test_an_edit_must_be_a_multipart_form(server):
    status, answer, _ = request(server, "/v1/images/edits", {"prompt": "a", "image": data_uri(png(RED))})
    assert (status, answer["error"]["code"]) == (415, "unsupported_media_type")
    assert "multipart/form-data" in answer["error"]["message"]
    status, answer = post_form(server, {"prompt": "a"}, ONE, content_type="multipart/form-data")  # no boundary
    assert (status, answer["error"]["code"]) == (400, "invalid_form"), answer


def test_the_api_pages_describe_the_edit_form(model):
    with running(model, docs=True) as server:
        status, schema, _ = request(server, "/openapi.json")
    form = schema["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert status == 200 and form["required"] == ["prompt"]
    assert {"image", "image[]", "prompt", "n", "size", "response_format", "seed"} <= set(form["properties"])


def test_the_model_bounds_the_number_of_sources(model):
    with running(model, max_images_per_request=8) as server:
        status, answer = post_form(server, {"prompt": "a"}, [("image[]", png(RED))] * 5)
    assert (status, answer["error"]["code"]) == (400, "too_many_images")
    assert answer["error"]["message"] == "5 source images; model 'debug' edits from at most 4"


@pytest.fixture(scope="module")
def text_only(model):
    """The debug model with a DiT that reads no source image: it generates and cannot edit."""
    config = dataclasses.replace(model.config, dit=dataclasses.replace(model.config.dit, source="none"))
    torch.manual_seed(0)
    return Blip3o(config)


def test_a_model_that_cannot_edit_says_so(text_only):
    with running(text_only) as server:
        status, answer = post_form(server, {"prompt": "make it blue"}, ONE)
        assert (status, answer["error"]["code"], answer["error"]["param"]) == (400, "model_cannot_edit", "model")
        assert "cannot edit images" in answer["error"]["message"] and "dit.source" in answer["error"]["message"]
        chat = {"modalities": ["image"], "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri(png(RED))}}, {"type": "text", "text": "bluer"}]}]}
        status, answer, _ = request(server, "/v1/chat/completions", chat)
        assert (status, answer["error"]["code"]) == (400, "model_cannot_edit")
        # with no image to edit, an image reply is a generation, which this model makes
        status, answer, _ = request(server, "/v1/chat/completions",
                                    {"modalities": ["image"], "messages": [{"role": "user", "content": "a circle"}]})
        assert status == 200 and answer["choices"][0]["message"]["content"][0]["type"] == "image_url"


# ------------------------------------------------------------------ images in chat


def image_of(completion) -> Image.Image:
    (part,) = completion.choices[0].message.content
    assert part["type"] == "image_url"
    return from_url(part["image_url"]["url"])


def test_a_chat_draws_an_image_then_edits_it(client, model, monkeypatch):
    calls = record_edits(model, monkeypatch)
    messages = [{"role": "user", "content": "a red circle"}]
    first = client.chat.completions.create(model="debug", messages=messages, modalities=["image"], seed=5)
    assert first.choices[0].message.role == "assistant" and first.choices[0].finish_reason == "stop"
    drawn = image_of(first)
    (expected,) = model.generate(["a red circle"], seed=5)
    assert drawn.tobytes() == expected.tobytes() and calls == []  # drawn, not edited
    # the reply goes back as it came, and the next image request edits it
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "make it blue"}]
    second = client.chat.completions.create(model="debug", messages=messages, modalities=["image"], seed=6)
    assert calls == [([[drawn.tobytes()]], ["make it blue"])]
    (edited,) = model.edit([drawn], ["make it blue"], seed=6)
    assert image_of(second).tobytes() == edited.tobytes()
    # a text reply reads a conversation whose assistant sent an image
    text = client.chat.completions.create(model="debug", messages=messages, max_tokens=4)
    assert isinstance(text.choices[0].message.content, str)


def test_a_chat_edits_the_latest_image_by_the_last_user_text(client, model, monkeypatch):
    calls = record_edits(model, monkeypatch)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png(BLUE))}},
                                             {"type": "text", "text": "what is this?"}]},
                {"role": "assistant", "content": "a blue square"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png(RED))}},
                                             {"type": "text", "text": "make it"}, {"type": "text", "text": "green"}]}]
    reply = client.chat.completions.create(model="debug", messages=messages, seed=9,
                                           extra_body={"modalities": ["text", "image"], "image": {"size": "32x48"}})
    assert calls == [([[RED.tobytes()]], ["make it\ngreen"])]
    (expected,) = model.edit([RED], ["make it\ngreen"], seed=9, height=48, width=32)
    assert image_of(reply).size == (32, 48) and image_of(reply).tobytes() == expected.tobytes()


def image_chat(*messages, **extra) -> dict:
    return {"model": "debug", "modalities": ["image"], "messages": list(messages), **extra}


USER = {"role": "user", "content": "a red circle"}
CHAT_IMAGE_ERRORS = [  # (what, body, status, param)
    ("streamed", image_chat(USER, stream=True), 400, "stream"),
    ("image options without an image reply", {"messages": [USER], "image": {"size": "32x32"}}, 400, "image"),
    ("no modality", {"messages": [USER], "modalities": []}, 400, "modalities"),
    ("an unknown modality", {"messages": [USER], "modalities": ["audio"]}, 400, "modalities[0]"),
    ("a size the decoder cannot make", image_chat(USER, image={"size": "34x34"}), 400, "image.size"),
    ("steps zero", image_chat(USER, image={"steps": 0}), 400, "image.steps"),
    ("no user message", image_chat({"role": "system", "content": "draw"}), 400, "messages"),
    ("no text to edit by", image_chat({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(png(RED))}}]}), 400, "messages[0].content"),
    ("text too long", image_chat({"role": "user", "content": "x" * 201}), 400, "messages[0].content"),
    ("a source that is not an image", image_chat({"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(b"hello there")}}]}, USER), 415,
     "messages[0].content[0].image_url"),
    ("an image from the system", image_chat({"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(png(RED))}}]}, USER), 400, "messages[0].content[0]"),
]


@pytest.mark.parametrize(("what", "body", "status", "param"), CHAT_IMAGE_ERRORS,
                         ids=[e[0] for e in CHAT_IMAGE_ERRORS])
def test_bad_image_chat_requests_are_refused_clearly(server, what, body, status, param):
    got, answer, headers = request(server, "/v1/chat/completions", body)
    assert (got, answer["error"]["param"]) == (status, param), answer
    assert headers["Content-Type"] == "application/json" and answer["error"]["message"]
