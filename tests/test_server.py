"""`blip3o serve` on loopback: the official openai client, micro-batching under load, overload,
timeouts, and every request limit answered with an OpenAI-shaped 4xx (the debug model)."""

import asyncio
import base64
import io
import json
import random
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from blip3o import Blip3o
from blip3o.cli.entry import main
from blip3o.server import BackgroundServer, Blip3oService, ServerConfig, create_app
from blip3o.server.app import ReadBody

LIMITS = dict(max_image_bytes=100_000, max_image_pixels=512 * 512, max_body_bytes=400_000, max_prompt_chars=200,
              max_n=4, max_images_per_request=2, max_chat_chars=2000, max_messages=8, max_tokens=64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Blip3o.from_preset("debug")


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    return tmp_path_factory.mktemp("allowed")


@contextmanager
def running(model, **config):
    service = Blip3oService(model, "debug", ServerConfig(**config))
    app = create_app(service)
    with BackgroundServer(app) as server:
        server.service, server.app = service, app
        yield server


@pytest.fixture(scope="module")
def server(model, allowed):
    with running(model, allow_dirs=[allowed], batch_window_ms=30, **LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0)


def png(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


RED = Image.new("RGB", (32, 32), (220, 40, 40))


def request(server, path: str, body=None, *, raw: bytes | None = None, method: str | None = None):
    """(status, parsed JSON or text, headers) of one HTTP request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            status, text, headers = response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as e:
        status, text, headers = e.code, e.read().decode(), e.headers
    try:
        return status, json.loads(text), headers
    except json.JSONDecodeError:
        return status, text, headers


def chat_body(content, **extra) -> dict:
    return {"model": "debug", "max_tokens": 4, "messages": [{"role": "user", "content": content}], **extra}


def metric(server, name: str) -> float:
    text = request(server, "/metrics")[1]
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)[1])


# ------------------------------------------------------------------ the openai client


def test_openai_client_generates_seeded_images(client, model):
    result = client.images.generate(model="debug", prompt="a red circle", n=2, size="32x32",
                                    response_format="b64_json", extra_body={"seed": 7})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    # a seeded request is exactly the library call, whatever else the server is doing
    expected = model.generate(["a red circle"], num_images=2, seed=7, size=32)
    assert [im.convert("RGB").tobytes() for im in images] == [im.tobytes() for im in expected]
    as_url = client.images.generate(prompt="a red circle", response_format="url", extra_body={"seed": 7})
    assert as_url.data[0].url.startswith("data:image/png;base64,")
    (one,) = model.generate(["a red circle"], num_images=1, seed=7)
    assert Image.open(io.BytesIO(base64.b64decode(as_url.data[0].url.split(",", 1)[1]))).tobytes() == one.tobytes()


def test_openai_client_generates_width_x_height_images(client, server, model):
    # OpenAI's portrait form, 1024x1536 (width x height), at the debug decoder's scale: 32x48
    result = client.images.generate(model="debug", prompt="a red circle", size="32x48", response_format="b64_json",
                                    extra_body={"seed": 7})
    (image,) = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert image.format == "PNG" and image.size == (32, 48)
    (expected,) = model.generate(["a red circle"], height=48, width=32, seed=7)
    assert image.convert("RGB").tobytes() == expected.tobytes()
    with pytest.raises(openai.BadRequestError, match="size 1026x1024: width 1026 is not a positive multiple of 4"):
        client.images.generate(prompt="a red circle", size="1026x1024")
    # every size OpenAI's API offers reads as (height, width) and passes the debug decoder's checks
    sizes = {"auto": None, "1024x1024": (1024, 1024), "1536x1024": (1024, 1536), "1024x1536": (1536, 1024),
             "1792x1024": (1024, 1792), "1024x1792": (1792, 1024), "256x256": (256, 256), "512x512": (512, 512)}
    assert {size: server.service._size(size) for size in sizes} == sizes


def test_openai_client_chats_about_an_image_over_turns(client, allowed):
    image_part = {"type": "image_url", "image_url": {"url": data_uri(png(RED))}}
    messages = [{"role": "system", "content": "You describe pictures."},
                {"role": "user", "content": [image_part, {"type": "text", "text": "what is this?"}]}]
    first = client.chat.completions.create(model="debug", messages=messages, max_tokens=6, seed=1)
    reply = first.choices[0].message
    assert reply.role == "assistant" and isinstance(reply.content, str)
    assert first.choices[0].finish_reason in ("stop", "length") and first.model == "debug"
    messages += [{"role": "assistant", "content": reply.content}, {"role": "user", "content": "and its color?"}]
    second = client.chat.completions.create(model="debug", messages=messages, max_tokens=6, temperature=0.8,
                                            top_p=0.9, seed=3)
    again = client.chat.completions.create(model="debug", messages=messages, max_tokens=6, temperature=0.8,
                                           top_p=0.9, seed=3)
    assert second.choices[0].message.content == again.choices[0].message.content  # seeded sampling
    # a local file, under a folder the server may read
    RED.save(allowed / "red.png")
    local_part = {"type": "image_url", "image_url": {"url": f"file://{allowed / 'red.png'}"}}
    local = client.chat.completions.create(model="debug", max_tokens=6, messages=[
        messages[0], {"role": "user", "content": [local_part, {"type": "text", "text": "what is this?"}]}])
    assert local.choices[0].message.content == first.choices[0].message.content  # greedy: the same answer


def test_openai_client_streams(client):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(png(RED))}},
                                             {"type": "text", "text": "describe it"}]}]
    whole = client.chat.completions.create(model="debug", messages=messages, max_tokens=8)
    chunks = list(client.chat.completions.create(model="debug", messages=messages, max_tokens=8, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def sse_request(server, text: str) -> urllib.request.Request:
    return urllib.request.Request(server.url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                  data=json.dumps(chat_body(text, stream=True)).encode())


def next_event(response) -> dict | str:
    line = ""
    while not line.strip():
        line = response.readline().decode()
    payload = line.removeprefix("data: ").strip()
    return payload if payload == "[DONE]" else json.loads(payload)


def test_stream_arrives_while_the_model_writes(model, monkeypatch):
    """Token streaming: the client holds the first words while the model is still writing."""
    release = threading.Event()

    def chat(conversations, *, on_text=None, **kwargs):
        on_text(" the first ")
        assert release.wait(30), "the first piece never reached the client"
        on_text(" ")
        on_text("words")
        return ["the first  words"]

    monkeypatch.setattr(model, "chat", chat)
    with running(model) as server, urllib.request.urlopen(sse_request(server, "hi"), timeout=60) as response:
        assert next_event(response)["choices"][0]["delta"]["role"] == "assistant"
        assert next_event(response)["choices"][0]["delta"]["content"] == " the first "  # as decoded
        release.set()
        assert next_event(response)["choices"][0]["delta"]["content"] == " "
        assert next_event(response)["choices"][0]["delta"]["content"] == "words"
        assert next_event(response)["choices"][0]["finish_reason"] in ("stop", "length")
        assert next_event(response) == "[DONE]"


def test_stream_failure_after_the_first_piece_is_an_error_event(model, monkeypatch):
    def chat(conversations, *, on_text=None, **kwargs):
        on_text("partial ")
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "chat", chat)
    with running(model) as server, urllib.request.urlopen(sse_request(server, "hi"), timeout=60) as response:
        events = [next_event(response) for _ in range(4)]
    assert events[1]["choices"][0]["delta"]["content"] == "partial "
    assert events[2]["error"]["code"] == "model_error" and "out of memory" in events[2]["error"]["message"]
    assert events[3] == "[DONE]"


def test_sse_wire_format_ends_with_done(server):
    req = urllib.request.Request(server.url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps(chat_body("hello", stream=True)).encode())
    with urllib.request.urlopen(req, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = response.read().decode().strip().split("\n\n")
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_models_health_metrics_and_page(server, client):
    assert [m.id for m in client.models.list().data] == ["debug"]
    assert request(server, "/v1/models/debug")[0] == 200
    status, health, _ = request(server, "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "debug"
    status, text, headers = request(server, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in ("blip3o_requests_total{", "blip3o_request_duration_seconds_bucket{", "blip3o_queue_depth",
                 "blip3o_images_generated_total", "blip3o_batch_requests_bucket", "blip3o_batch_images_count"):
        assert name in text
    assert 'route="/health",status="200"' in text
    status, page, _ = request(server, "/")
    assert status == 200 and "<form" in page and "/static/app.js" in page
    assert request(server, "/static/app.js")[0] == 200


# ------------------------------------------------------------------ load, overload, timeouts


def test_50_concurrent_requests_all_succeed_micro_batched(server):
    before = metric(server, "blip3o_images_generated_total")
    bodies = [{"prompt": f"{i} red circles", "n": 1 + i % 2} for i in range(50)]
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda b: request(server, "/v1/images/generations", b), bodies))
    assert [status for status, _, _ in results] == [200] * 50
    assert [len(r["data"]) for _, r, _ in results] == [b["n"] for b in bodies]
    assert metric(server, "blip3o_images_generated_total") - before == sum(b["n"] for b in bodies)
    assert metric(server, "blip3o_batch_requests_max") > 1  # requests shared generate calls
    assert metric(server, "blip3o_queue_depth") == 0


class Gate:
    """Holds the model's generate until opened: the worker is busy for as long as a test needs."""

    def __init__(self, model, monkeypatch, fail_on: str | None = None):
        self.entered, self.opened, real = threading.Event(), threading.Event(), model.generate

        def generate(prompts, **kwargs):
            self.entered.set()
            self.opened.wait(30)
            if fail_on and any(fail_on in p for p in prompts):
                raise RuntimeError(f"cannot draw {fail_on}")
            return real(prompts, **kwargs)

        monkeypatch.setattr(model, "generate", generate)


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_overload_gets_429_with_retry_after_and_the_queue_drains(model, monkeypatch):
    gate = Gate(model, monkeypatch)
    with running(model, max_queue=3, retry_after_s=2) as server, ThreadPoolExecutor(8) as pool:
        busy = pool.submit(request, server, "/v1/images/generations", {"prompt": "first"})
        assert gate.entered.wait(20)  # the worker holds the first request
        queued = [pool.submit(request, server, "/v1/images/generations", {"prompt": f"queued {i}"})
                  for i in range(3)]
        wait_for(lambda: server.service.batcher.depth == 3)
        rejected = [request(server, "/v1/images/generations", {"prompt": "one too many"}) for _ in range(3)]
        for status, body, headers in rejected:
            assert status == 429 and headers["Retry-After"] == "2"
            assert body["error"]["code"] == "queue_full" and body["error"]["type"] == "rate_limit_error"
        gate.opened.set()
        assert [f.result(timeout=60)[0] for f in [busy, *queued]] == [200] * 4
        assert 'status="429"} 3' in request(server, "/metrics")[1]


def test_a_slow_request_gets_504_and_the_worker_goes_on(model, monkeypatch):
    gate = Gate(model, monkeypatch)
    # the timeout must also cover the next request, which waits for the slow one to finish first
    # (two debug generations: over 0.5 s on a loaded 2-core machine)
    with running(model, request_timeout_s=4.0) as server:
        start = time.monotonic()
        status, body, _ = request(server, "/v1/images/generations", {"prompt": "slow"})
        assert status == 504 and body["error"]["code"] == "timeout"
        assert time.monotonic() - start < 10
        gate.opened.set()
        assert request(server, "/v1/images/generations", {"prompt": "next"})[0] == 200


def test_a_failing_batch_fails_only_the_request_at_fault(model, monkeypatch):
    gate = Gate(model, monkeypatch, fail_on="poison")
    with running(model, batch_window_ms=50) as server, ThreadPoolExecutor(8) as pool:
        pool.submit(request, server, "/v1/images/generations", {"prompt": "warm up"})
        assert gate.entered.wait(20)
        prompts = ["good one", "poison apple", "good two", "good three"]
        futures = [pool.submit(request, server, "/v1/images/generations", {"prompt": p}) for p in prompts]
        wait_for(lambda: server.service.batcher.depth == 4)
        gate.opened.set()
        results = [f.result(timeout=60) for f in futures]
    assert [status for status, _, _ in results] == [200, 500, 200, 200]
    assert "cannot draw poison" in results[1][1]["error"]["message"]
    assert results[1][1]["error"]["type"] == "server_error"


def test_seeded_requests_share_calls_and_keep_their_solo_images(model, monkeypatch):
    gate, calls = Gate(model, monkeypatch), []
    gated = model.generate

    def logged(prompts, **kwargs):
        calls.append((list(prompts), kwargs.get("seed"), kwargs.get("num_images", 1)))
        return gated(prompts, **kwargs)

    monkeypatch.setattr(model, "generate", logged)
    bodies = [{"prompt": "a red circle", "seed": 11}, {"prompt": "a blue square", "seed": 12},
              {"prompt": "two green circles", "seed": 13, "n": 2}, {"prompt": "a red square", "seed": 14, "n": 2},
              {"prompt": "an unseeded one"}]
    with running(model, batch_window_ms=50) as server, ThreadPoolExecutor(8) as pool:
        pool.submit(request, server, "/v1/images/generations", {"prompt": "warm up"})
        assert gate.entered.wait(20)
        futures = [pool.submit(request, server, "/v1/images/generations", b) for b in bodies]
        wait_for(lambda: server.service.batcher.depth == 5)
        gate.opened.set()
        results = [f.result(timeout=60) for f in futures]
    assert [status for status, _, _ in results] == [200] * 5
    # the pool's threads may enqueue in any order: compare each call's (prompt, seed) pairs, not their order
    batched = sorted((sorted(zip(prompts, seed, strict=True)), n) for prompts, seed, n in calls[1:]
                     if isinstance(seed, list))
    assert batched == [([("a blue square", 12), ("a red circle", 11)], 1),
                       ([("a red square", 14), ("two green circles", 13)], 2)]
    for body, (_, result, _) in zip(bodies[:4], results, strict=False):
        got = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).convert("RGB") for d in result["data"]]
        solo = model.generate([body["prompt"]], num_images=body.get("n", 1), seed=body["seed"])
        for a, b in zip(got, solo, strict=True):  # the solo call's images, up to rounding between batch sizes
            diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
            assert diff.max() <= 2, body


# ------------------------------------------------------------------ bad input


def noise(side: int) -> Image.Image:
    return Image.frombytes("RGB", (side, side), random.Random(0).randbytes(side * side * 3))  # incompressible


def big_png(side: int) -> bytes:
    return png(Image.new("RGB", (side, side), (255, 255, 255)))  # compresses to a few KB: a pixel bomb


IMAGE_ERRORS = [
    ("too many bytes", data_uri(png(noise(200))), 400, "image_too_large"),
    ("a pixel bomb", data_uri(big_png(1024)), 400, "image_too_large"),
    ("a TIFF", data_uri(png(RED, "TIFF"), "image/tiff"), 415, "unsupported_image_type"),
    ("not an image type", data_uri(b"hello", "text/plain"), 415, "unsupported_image_type"),
    ("not an image", data_uri(b"hello there"), 415, "unsupported_image_type"),
    ("bad base64", "data:image/png;base64,@@@", 400, "invalid_image_url"),
    ("not base64", "data:image/png,rawbytes", 400, "invalid_image_url"),
    ("too small", data_uri(png(Image.new("RGB", (4, 4)))), 400, "invalid_image"),
    ("truncated", data_uri(png(noise(64))[:400]), 400, "invalid_image"),
    ("a web URL", "https://example.com/cat.png", 400, "unsupported_url"),
    ("a relative path", "cat.png", 400, "invalid_image_url"),
    ("a path outside", "/etc/hostname", 403, "path_not_allowed"),
]


@pytest.mark.parametrize(("what", "url", "status", "code"), IMAGE_ERRORS, ids=[e[0] for e in IMAGE_ERRORS])
def test_bad_images_are_refused_clearly(server, what, url, status, code):
    got, body, _ = request(server, "/v1/chat/completions", chat_body(
        [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]))
    assert (got, body["error"]["code"]) == (status, code), body
    assert body["error"]["param"] == "messages[0].content[0].image_url"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_paths_cannot_escape_the_allowed_folder(server, allowed):
    (allowed / "sub").mkdir(exist_ok=True)
    (allowed / "link.png").unlink(missing_ok=True)
    (allowed / "link.png").symlink_to("/etc/hostname")
    for url in (f"{allowed}/sub/../../outside.png", f"file://{allowed}/link.png"):
        status, body, _ = request(server, "/v1/chat/completions", chat_body(
            [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}]))
        assert status == 403 and body["error"]["code"] == "path_not_allowed"
    status, body, _ = request(server, "/v1/chat/completions", chat_body(
        [{"type": "image_url", "image_url": {"url": f"{allowed}/missing.png"}}, {"type": "text", "text": "?"}]))
    assert status == 400 and body["error"]["code"] == "file_not_found"


def test_local_files_are_off_by_default(model):
    with running(model) as server:
        status, body, _ = request(server, "/v1/chat/completions", chat_body(
            [{"type": "image_url", "image_url": {"url": "/etc/hostname"}}, {"type": "text", "text": "what?"}]))
    assert status == 403 and body["error"]["code"] == "local_files_disabled"
    assert "--allow-dir" in body["error"]["message"]


IMAGE_REQUEST_ERRORS = [
    ("no prompt", {"n": 1}, "prompt", 400),
    ("empty prompt", {"prompt": "  "}, "prompt", 400),
    ("prompt too long", {"prompt": "x" * 201}, "prompt", 400),
    ("prompt not text", {"prompt": ["a", "b"]}, "prompt", 400),
    ("n zero", {"prompt": "a", "n": 0}, "n", 400),
    ("n too big", {"prompt": "a", "n": 5}, "n", 400),
    ("size not WxH", {"prompt": "a", "size": "32"}, "size", 400),
    ("size upper-case X", {"prompt": "a", "size": "32X64"}, "size", 400),
    ("size the decoder cannot make", {"prompt": "a", "size": "34x34"}, "size", 400),
    ("size too big", {"prompt": "a", "size": "4096x4096"}, "size", 400),
    ("steps zero", {"prompt": "a", "steps": 0}, "steps", 400),
    ("guidance negative", {"prompt": "a", "guidance": -1}, "guidance", 400),
    ("seed negative", {"prompt": "a", "seed": -1}, "seed", 400),
    ("response format", {"prompt": "a", "response_format": "png"}, "response_format", 400),
    ("unknown model", {"prompt": "a", "model": "dall-e-3"}, "model", 404),
]


@pytest.mark.parametrize(("what", "body", "param", "status"), IMAGE_REQUEST_ERRORS,
                         ids=[e[0] for e in IMAGE_REQUEST_ERRORS])
def test_bad_image_requests_are_refused_clearly(server, what, body, param, status):
    got, answer, _ = request(server, "/v1/images/generations", body)
    assert got == status and answer["error"]["param"] == param, answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]
    if param == "size":  # the message names the size asked for
        assert repr(body["size"]) in answer["error"]["message"] or body["size"] in answer["error"]["message"]


def test_image_size_limit_is_in_pixels(model):
    with running(model, max_pixels=32 * 48) as server:
        assert request(server, "/v1/images/generations", {"prompt": "a", "size": "48x32", "seed": 0})[0] == 200
        status, answer, _ = request(server, "/v1/images/generations", {"prompt": "a", "size": "48x48"})
    assert status == 400 and answer["error"]["message"] == (
        "size 48x48 is 2,304 pixels, more than this server's limit of 1,536")


def chat_image(n: int) -> list:
    return [{"type": "image_url", "image_url": {"url": data_uri(png(RED))}}] * n + [{"type": "text", "text": "?"}]


CHAT_REQUEST_ERRORS = [
    ("no messages", {"model": "debug", "messages": []}, "messages", 400),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", 400),
    ("too many messages", {"messages": [{"role": "user", "content": "x"}] * 9}, "messages", 400),
    ("too much text", chat_body("x" * 2001), "messages", 400),
    ("too many images", chat_body(chat_image(3)), "messages", 400),
    ("image from the system", {"messages": [{"role": "system", "content": chat_image(1)}]},
     "messages[0].content[0]", 400),
    ("image part without image", chat_body([{"type": "image_url"}]), "messages[0].content[0]", 400),
    ("max_tokens zero", chat_body("x", max_tokens=0), "max_tokens", 400),
    ("max_tokens too big", chat_body("x", max_tokens=65), "max_tokens", 400),
    ("temperature too high", chat_body("x", temperature=5), "temperature", 400),
    ("top_p zero", chat_body("x", top_p=0), "top_p", 400),
    ("n above one", chat_body("x", n=2), "n", 400),
    ("unknown model", chat_body("x", model="gpt-4o"), "model", 404),
]


@pytest.mark.parametrize(("what", "body", "param", "status"), CHAT_REQUEST_ERRORS,
                         ids=[e[0] for e in CHAT_REQUEST_ERRORS])
def test_bad_chat_requests_are_refused_clearly(server, what, body, param, status):
    got, answer, _ = request(server, "/v1/chat/completions", body)
    assert got == status and answer["error"]["param"] == param, answer


def test_malformed_requests_get_openai_shaped_errors(server):
    for raw in (b"{not json", b"", b"[1, 2]"):
        status, body, _ = request(server, "/v1/images/generations", raw=raw)
        assert status == 400 and body["error"]["type"] == "invalid_request_error", body
    assert request(server, "/v1/images/generations", raw=b"{not json")[1]["error"]["code"] == "invalid_json"
    status, body, _ = request(server, "/v1/images/generations", raw=b" " * 400_001)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    status, body, _ = request(server, "/v1/nothing-here")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body, _ = request(server, "/v1/images/generations", method="GET")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    # none of it hurt the server
    assert request(server, "/health")[0] == 200
    assert request(server, "/v1/images/generations", {"prompt": "still here"})[0] == 200


# ------------------------------------------------------------------ hostile input: each a 4xx, never a 500


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with(*chunks: bytes) -> bytes:
    """A valid 32x32 black PNG with `chunks` before its pixels."""
    pixels = zlib.compress(b"".join(b"\x00" + bytes(32 * 3) for _ in range(32)))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 32, 8, 2, 0, 0, 0))
            + b"".join(chunks) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b""))


def declared(format: str, side: int = 20_000) -> bytes:
    """A small file whose header declares a side x side image: 400 M pixels, past PIL's bomb limit."""
    if format == "PNG":
        return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))
    if format == "JPEG":
        jpeg = bytearray(png(Image.new("RGB", (16, 16)), "JPEG"))
        frame = jpeg.find(b"\xff\xc0")
        jpeg[frame + 5:frame + 9] = struct.pack(">HH", side, side)
        return bytes(jpeg)
    if format == "BMP":
        return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, side, side, 1, 24,
                                                                         0, 0, 0, 0, 0, 0)
    if format == "GIF":
        return (b"GIF89a" + struct.pack("<HH", side, side) + b"\x00\x00\x00," + struct.pack("<HHHH", 0, 0, side, side)
                + b"\x00\x02\x02\x44\x01\x00;")
    canvas = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (16383).to_bytes(3, "little") * 2  # WebP's largest
    return b"RIFF" + struct.pack("<I", 4 + len(canvas)) + b"WEBP" + canvas


SIXTY_FOUR_MB_OF_ZEROS = zlib.compress(bytes(64 << 20), 9)  # 64 KB compressed


def chat_about(url: str) -> dict:
    return chat_body([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what?"}])


HOSTILE = [  # (what, body given the allowed folder, status, code, param)
    *[(f"a {f} header declaring 400 M pixels", lambda _, f=f: chat_about(data_uri(declared(f))), 400,
       "image_too_large", "messages[0].content[0].image_url") for f in ("PNG", "JPEG", "BMP", "GIF")],
    ("a WebP header declaring 268 M pixels", lambda _: chat_about(data_uri(declared("WEBP"), "image/webp")), 400,
     "image_too_large", "messages[0].content[0].image_url"),
    ("a 64 MB zTXt chunk", lambda _: chat_about(data_uri(png_with(
        png_chunk(b"zTXt", b"k\x00\x00" + SIXTY_FOUR_MB_OF_ZEROS)))), 400, "invalid_image",
     "messages[0].content[0].image_url"),
    ("a 64 MB iCCP chunk", lambda _: chat_about(data_uri(png_with(
        png_chunk(b"iCCP", b"p\x00\x00" + SIXTY_FOUR_MB_OF_ZEROS)))), 400, "invalid_image",
     "messages[0].content[0].image_url"),
    ("a 64 MB iTXt chunk", lambda _: chat_about(data_uri(png_with(
        png_chunk(b"iTXt", b"k\x00\x01\x00\x00\x00" + SIXTY_FOUR_MB_OF_ZEROS)))), 400, "invalid_image",
     "messages[0].content[0].image_url"),
    ("68 text chunks of 1 MB", lambda _: chat_about(data_uri(png_with(
        *[png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * 1_000_000, 9))] * 68))), 400, "invalid_image",
     "messages[0].content[0].image_url"),
    ("a NUL byte in a path", lambda allowed: chat_about(f"{allowed}/a\x00b.png"), 400, "invalid_image_url",
     "messages[0].content[0].image_url"),
    ("a 100,000-character path", lambda allowed: chat_about(f"{allowed}/{'a' * 100_000}"), 400,
     "invalid_image_url", "messages[0].content[0].image_url"),
    ("a lone surrogate in a path", lambda allowed: chat_about(f"{allowed}/\ud800.png"), 400, "invalid_image_url",
     "messages[0].content[0].image_url"),
    ("a symlink loop", lambda allowed: chat_about(f"{allowed}/loop"), 400, "invalid_image_url",
     "messages[0].content[0].image_url"),
    ("a size of 5,000-digit sides", lambda _: {"prompt": "a", "size": "9" * 5000 + "x" + "9" * 5000}, 400,
     "invalid_value", "size"),
]


@pytest.mark.parametrize(("what", "body", "status", "code", "param"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_refused_clearly(server, allowed, what, body, status, code, param):
    if not (allowed / "loop").is_symlink():
        (allowed / "loop").symlink_to(allowed / "loop")
    body = body(allowed)
    route = "/v1/images/generations" if "prompt" in body else "/v1/chat/completions"
    got, answer, _ = request(server, route, raw=json.dumps(body, ensure_ascii=True).encode())
    assert (got, answer["error"]["code"], answer["error"]["param"]) == (status, code, param), answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert len(answer["error"]["message"]) < 500 and str(allowed) not in answer["error"]["message"]


def test_text_no_tokenizer_reads_is_refused_before_queueing(server):
    for route, body, param in (
            ("/v1/images/generations", {"prompt": "a \ud800 b"}, "prompt"),
            ("/v1/chat/completions", chat_body("a \ud800 b", stream=True), "messages[0].content"),
            ("/v1/chat/completions", chat_body([{"type": "text", "text": "\udfff"}]), "messages[0].content[0].text")):
        status, answer, headers = request(server, route, raw=json.dumps(body).encode())
        assert (status, answer["error"]["param"], answer["error"]["code"]) == (400, param, "invalid_text"), answer
        assert headers["Content-Type"] == "application/json"  # a plain error, even for a stream


# ------------------------------------------------------------------ the memory budget


class ChatGate:
    """Holds the model's chat until opened; `stopped` is set when the chat ends by an exception."""

    def __init__(self, model, monkeypatch, words: int = 1):
        self.entered, self.opened, self.stopped = threading.Event(), threading.Event(), threading.Event()

        def chat(conversations, *, on_text=None, **kwargs):
            self.entered.set()
            try:
                assert self.opened.wait(30)
                for _ in range(words):
                    on_text("word ")  # where the service stops a reply no one waits for
                    time.sleep(0.005)
            except BaseException:
                self.stopped.set()
                raise
            return ["word " * words]

        monkeypatch.setattr(model, "chat", chat)


def chat_images(n: int) -> dict:
    return chat_body(chat_image(n))


RED_HELD = len(png(RED)) + 32 * 32 * 4  # what a chat request holds for RED: encoded and decoded (RGB in 4 bytes)


def test_memory_budget_refuses_past_it_and_a_finished_request_gives_its_bytes_back(model, monkeypatch):
    gate = ChatGate(model, monkeypatch)
    with running(model, memory_budget_bytes=2 * RED_HELD + RED_HELD // 2, retry_after_s=3) as server, \
            ThreadPoolExecutor(2) as pool:
        status, answer, _ = request(server, "/v1/chat/completions", chat_images(3))
        assert (status, answer["error"]["code"]) == (413, "request_too_large"), answer  # never fits: 413
        assert server.service.budget.held == 0
        first = pool.submit(request, server, "/v1/chat/completions", chat_images(2))
        assert gate.entered.wait(20)
        assert server.service.budget.held == 2 * RED_HELD  # the running request's images
        assert metric(server, "blip3o_memory_held_bytes") == 2 * RED_HELD
        status, answer, headers = request(server, "/v1/chat/completions", chat_images(1))
        assert (status, answer["error"]["code"], headers["Retry-After"]) == (429, "memory_full", "3"), answer
        assert answer["error"]["type"] == "rate_limit_error"
        gate.opened.set()
        assert first.result(timeout=60)[0] == 200
        wait_for(lambda: server.service.budget.held == 0)  # released when it ended
        assert request(server, "/v1/chat/completions", chat_images(2))[0] == 200
        assert server.service.budget.held == 0


def test_image_requests_hold_the_images_they_ask_for(model, monkeypatch):
    gate = Gate(model, monkeypatch)
    with running(model, memory_budget_bytes=4 * 32 * 32 * 4) as server, ThreadPoolExecutor(2) as pool:
        first = pool.submit(request, server, "/v1/images/generations", {"prompt": "a", "n": 3})
        assert gate.entered.wait(20)
        assert server.service.budget.held == 3 * 32 * 32 * 4
        status, answer, _ = request(server, "/v1/images/generations", {"prompt": "a", "n": 2})
        assert (status, answer["error"]["code"]) == (429, "memory_full")
        status, answer, _ = request(server, "/v1/images/generations", {"prompt": "a", "n": 4, "size": "32x64"})
        assert (status, answer["error"]["code"]) == (413, "request_too_large")
        gate.opened.set()
        assert first.result(timeout=60)[0] == 200
        wait_for(lambda: server.service.budget.held == 0)


def test_a_queued_chat_request_holds_its_images_encoded(model, monkeypatch):
    gate, tasks = ChatGate(model, monkeypatch), []
    with running(model) as server, ThreadPoolExecutor(2) as pool:
        monkeypatch.setattr(server.service.batcher, "submit", record(server.service.batcher.submit, tasks))
        running_one = pool.submit(request, server, "/v1/chat/completions", chat_images(1))
        assert gate.entered.wait(20)
        queued = pool.submit(request, server, "/v1/chat/completions", chat_images(2))
        wait_for(lambda: server.service.batcher.depth == 1)
        images = [part["image"] for m in tasks[-1].conversation for part in m["content"] if part["type"] == "image"]
        assert [image.data for image in images] == [png(RED)] * 2  # bytes, not decoded pixels
        gate.opened.set()
        assert running_one.result(timeout=60)[0] == queued.result(timeout=60)[0] == 200


def record(submit, payloads: list):
    def recorded(key, payload, **kwargs):
        payloads.append(payload)
        return submit(key, payload, **kwargs)
    return recorded


# ------------------------------------------------------------------ clients that leave


def send_raw(server, path: str, body: dict) -> socket.socket:
    """A connection that has sent one POST and reads nothing; closing it is the client leaving."""
    data = json.dumps(body).encode()
    sock = socket.create_connection((server.host, server.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_queued_work_of_clients_that_left_never_runs_and_counts_as_499(model, monkeypatch):
    gate, calls = Gate(model, monkeypatch), []
    gated = model.generate
    monkeypatch.setattr(model, "generate", lambda prompts, **kw: calls.append(list(prompts)) or gated(prompts, **kw))
    with running(model, batch_window_ms=0) as server, ThreadPoolExecutor(2) as pool:
        first = pool.submit(request, server, "/v1/images/generations", {"prompt": "first"})
        assert gate.entered.wait(20)
        made = metric(server, "blip3o_images_generated_total")
        left = [send_raw(server, "/v1/images/generations", {"prompt": f"left {i}", "n": 2}) for i in range(3)]
        left.append(send_raw(server, "/v1/chat/completions", chat_body("left too", stream=True)))
        wait_for(lambda: server.service.batcher.depth == 4)
        for sock in left:
            sock.close()
        wait_for(lambda: server.service.batcher.depth == 0)  # they left the queue at once
        gate.opened.set()
        assert first.result(timeout=60)[0] == 200
        assert request(server, "/v1/images/generations", {"prompt": "after"})[0] == 200
        text = request(server, "/metrics")[1]
    assert calls == [["first"], ["after"]]
    assert metric_value(text, "blip3o_images_generated_total") == made + 2  # "first" and "after"
    assert 'route="/v1/images/generations",status="499"} 3' in text
    assert 'route="/v1/chat/completions",status="499"} 1' in text
    assert 'route="/v1/images/generations",status="200"} 2' in text


def metric_value(text: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)[1])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_running_chat_stops_when_its_client_leaves(model, monkeypatch, stream):
    gate = ChatGate(model, monkeypatch, words=2000)  # 2,000 words of 5 ms: 10 s unless stopped
    with running(model) as server:
        sock = send_raw(server, "/v1/chat/completions", chat_body("hi", stream=stream))
        assert gate.entered.wait(20)
        gate.opened.set()
        time.sleep(0.1)
        sock.close()
        assert gate.stopped.wait(5)
        wait_for(lambda: 'route="/v1/chat/completions",status="499"} 1' in request(server, "/metrics")[1])
        assert server.service.budget.held == 0


# ------------------------------------------------------------------ slow clients, connections


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, f"the connection closed after {data!r}"
        data += piece
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def test_a_body_trickled_past_the_deadline_gets_408(model):
    with running(model, body_timeout_s=0.5) as server, socket.create_connection((server.host, server.port)) as sock:
        sock.settimeout(10)
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": ")
        start = time.monotonic()
        status, headers, body = read_response(sock)
        assert time.monotonic() - start < 5
        assert status == 408 and json.loads(body)["error"]["code"] == "body_timeout"
        assert sock.recv(1) == b""  # and the connection is closed
        assert 'status="408"} 1' in request(server, "/metrics")[1]


def test_a_body_in_small_pieces_is_read_in_linear_time():
    """16 MB in 1 KB pieces: joined once, not copied at every piece (which takes seconds)."""
    pieces = iter([{"type": "http.request", "body": b"%05d" % i + b"x" * 1019, "more_body": i < 16_383}
                   for i in range(16_384)])
    received = []

    async def app(scope, receive, send):
        received.append(await receive())

    async def receive():
        return next(pieces)

    start = time.monotonic()
    asyncio.run(ReadBody(app, max_bytes=48 << 20, timeout_s=30)({"type": "http", "method": "POST", "headers": []},
                                                               receive, None))
    assert time.monotonic() - start < 2
    body = received[0]["body"]
    assert len(body) == 16 << 20 and received[0]["more_body"] is False
    assert [body[i * 1024:i * 1024 + 5] for i in (0, 1, 16_383)] == [b"00000", b"00001", b"16383"]


def test_idle_connections_close_after_the_keep_alive_time(model):
    with running(model, keep_alive_s=0.3) as server, socket.create_connection((server.host, server.port)) as sock:
        sock.settimeout(3)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(sock)[0] == 200
        assert sock.recv(1) == b""  # closed by the server, well before the socket's 3 s


def test_connections_past_the_limit_get_503_and_unending_headers_400(model):
    with running(model, max_connections=3, max_header_bytes=1024) as server:
        idle = [socket.create_connection((server.host, server.port)) for _ in range(3)]
        wait_for(lambda: len(server._server.server_state.connections) == 3)
        assert request(server, "/health")[0] == 503
        for sock in idle:
            sock.close()
        wait_for(lambda: not server._server.server_state.connections)
        assert request(server, "/health")[0] == 200
        with socket.create_connection((server.host, server.port)) as sock:  # headers that never end
            sock.settimeout(10)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"a" * 2000)
            assert read_response(sock)[0] == 400


# ------------------------------------------------------------------ what the server shows


def test_messages_never_show_the_servers_folders(server, allowed):
    for url, status, code in (("/etc/hostname", 403, "path_not_allowed"),
                              (f"{allowed}/../outside.png", 403, "path_not_allowed"),
                              (f"{allowed}/missing.png", 400, "file_not_found")):
        got, answer, _ = request(server, "/v1/chat/completions", chat_about(url))
        assert (got, answer["error"]["code"]) == (status, code)
        assert str(allowed) not in answer["error"]["message"] and "/etc" not in answer["error"]["message"]
        assert answer["error"]["param"] in answer["error"]["message"]  # it says which image


def test_api_pages_are_served_only_when_asked(server, model):
    for path in ("/docs", "/redoc", "/openapi.json"):
        status, answer, _ = request(server, path)
        assert (status, answer["error"]["code"]) == (404, "not_found")
    with running(model, docs=True) as documented:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert request(documented, path)[0] == request(documented, path, method="HEAD")[0] == 200


def test_head_is_answered_wherever_get_is(server):
    paths = [route.path.replace("{model_id}", "debug") for route in server.app.routes
             if "GET" in getattr(route, "methods", ())]
    assert {"/", "/health", "/metrics", "/v1/models", "/v1/models/debug"} <= set(paths)
    for path in [*paths, "/static/app.js"]:
        get, head = (urllib.request.urlopen(urllib.request.Request(server.url + path, method=m), timeout=30)
                     for m in ("GET", "HEAD"))
        with get, head:
            assert head.status == get.status == 200, path
            assert head.headers["Content-Type"] == get.headers["Content-Type"]
            assert head.read() == b"" and get.read()


# ------------------------------------------------------------------ blip3o serve


def test_serve_exits_2_before_printing_anything_when_its_port_is_taken(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "debug", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert f"blip3o serve: error: cannot listen on 127.0.0.1:{port} (Address already in use)" in err


def test_serve_refuses_a_port_outside_0_to_65535(capsys):
    assert main(["serve", "--model", "debug", "--port", "70000"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "blip3o serve: error: --port must be between 0 and 65535, got 70000\n"


def test_serve_docs_serves_the_api_pages(monkeypatch, capsys):
    served = []
    monkeypatch.setattr("blip3o.server.serve", lambda app, sock, log_level: served.append(app))
    assert main(["serve", "--model", "debug", "--port", "0"]) == 0
    assert "/docs" not in capsys.readouterr().out
    assert main(["serve", "--model", "debug", "--port", "0", "--docs"]) == 0
    assert "/docs (API reference)" in capsys.readouterr().out
    assert [app.docs_url for app in served] == [None, "/docs"]
