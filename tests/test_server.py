"""`blip3o serve` on loopback: the official openai client, micro-batching under load, overload,
timeouts, and every request limit answered with an OpenAI-shaped 4xx (the debug model)."""

import base64
import io
import json
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import openai
import pytest
import torch
from PIL import Image

from blip3o import Blip3o
from blip3o.server import BackgroundServer, Blip3oService, ServerConfig, create_app

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
    with BackgroundServer(create_app(service)) as server:
        server.service = service
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
    ("image from the assistant", {"messages": [{"role": "assistant", "content": chat_image(1)}]},
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
