"""The service behind the routes: it owns the model and the micro-batcher, validates every request
before it is queued, and turns requests into `Blip3o.generate` / `Blip3o.chat` calls.

Seed semantics. A request that names a `seed` gets the images of
`model.generate([prompt], num_images=n, seed=seed, ...)`: what the CLI and the library give for
those arguments, whatever else the server is doing. Seeded requests with equal (steps, guidance,
size, n) share one call with one seed per prompt (`generate(prompts, num_images=n, seeds)`), which
draws each prompt's noise from its own generator exactly as its solo call would; only floating-point
rounding, which differs slightly between batch sizes, can move a pixel by a level. (Not with a
decoder whose sampler draws fresh noise at every step and n > 1: there a seeded request runs alone.)
Requests without a seed ask for fresh randomness and share calls with each other when (steps,
guidance, size) are equal. Calls hold up to `max_batch_images` images.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from dataclasses import dataclass, replace

from PIL import Image

from blip3o.server.batcher import MicroBatcher, QueueFull, ShuttingDown
from blip3o.server.config import ServerConfig
from blip3o.server.errors import APIError, bad_request
from blip3o.server.media import encode_png, load_image
from blip3o.server.metrics import Metrics
from blip3o.server.schemas import ChatCompletionRequest, ChatMessage, ImageGenerationRequest

log = logging.getLogger("blip3o.server")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationTask:
    """One image request as the worker runs it: `n` images of `prompt`, from `seed` if given."""

    prompt: str
    n: int
    seed: int | None


@dataclass(frozen=True)
class ChatTask:
    """One chat request as the worker runs it."""

    conversation: list[dict]  # Blip3o.chat's format: images as PIL
    max_new_tokens: int
    temperature: float | None  # None: the model's generation config; 0: greedy
    top_p: float
    seed: int | None
    on_text: Callable[[str], None] | None = None  # streaming: receives the reply as it is generated


@dataclass(frozen=True)
class ChatReply:
    text: str
    finish_reason: str  # "stop" | "length"


class Blip3oService:
    """What the HTTP routes call: validates each request, queues it on the micro-batcher, and renders the
    model's answer in OpenAI's shapes. One worker thread runs `model`; `start`/`stop` own that thread."""

    def __init__(self, model, model_id: str, config: ServerConfig | None = None) -> None:
        self.model, self.model_id, self.config = model, model_id, config or ServerConfig()
        self.created = int(time.time())
        c = self.config
        self.batcher = MicroBatcher(self._run, max_batch=c.max_batch_images, window_s=c.batch_window_ms / 1000,
                                    max_queue=c.max_queue)
        self.metrics = Metrics(queue_depth=lambda: self.batcher.depth)

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    # ------------------------------------------------------------------ what the routes call

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_id, "device": str(self.model.device),
                "queue_depth": self.batcher.depth}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self, model_id: str | None = None) -> dict:
        self._check_model(model_id, param="model_id")
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "blip3o"}

    async def generate_images(self, request: ImageGenerationRequest) -> dict:
        task, key = self._generation_task(request)
        batchable = task.seed is None or task.n == 1 or not self.model.decoder.step_noise
        images = await self._submit(key, task, weight=task.n, batchable=batchable)
        encoded = await asyncio.to_thread(lambda: [encode_png(image) for image in images])
        if request.response_format == "url":
            data = [{"url": f"data:image/png;base64,{b64}"} for b64 in encoded]
        else:
            data = [{"b64_json": b64} for b64 in encoded]
        return {"created": int(time.time()), "data": data}

    async def chat_completion(self, request: ChatCompletionRequest) -> dict:
        task = await asyncio.to_thread(self._chat_task, request)  # decoding images is slow: off the event loop
        reply: ChatReply = await self._submit(("chat",), task, batchable=False)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                         "finish_reason": reply.finish_reason, "logprobs": None}],
        }

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[str]:
        """The reply as server-sent `chat.completion.chunk` events, token by token as the model writes
        it, then `data: [DONE]`.

        Validation and queueing happen before this returns, so a bad request or a full queue is a
        plain JSON error with its status; a failure after the stream began arrives as an `error` event.
        """
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        task = await asyncio.to_thread(self._chat_task, request)
        # together the pieces are exactly the reply chat_completion returns (as decoded)
        task = replace(task, on_text=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
        future = self._enqueue(("chat",), task, batchable=False)
        return self._chat_events(future, pieces)

    async def _chat_events(self, future, pieces: asyncio.Queue) -> AsyncIterator[str]:
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_id}

        def event(delta: dict, finish: str | None = None) -> str:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(chunk)}\n\n"

        yield event({"role": "assistant", "content": ""})
        done = asyncio.ensure_future(self._result(future))
        try:
            while not done.done() or not pieces.empty():
                if pieces.empty():
                    piece = asyncio.ensure_future(pieces.get())
                    await asyncio.wait({piece, done}, return_when=asyncio.FIRST_COMPLETED)
                    if not piece.done():
                        piece.cancel()
                        continue
                    yield event({"content": piece.result()})
                else:  # pieces queued before the reply was handed over
                    yield event({"content": pieces.get_nowait()})
            reply: ChatReply = done.result()
        except APIError as e:
            error = {"message": e.message, "type": e.type, "param": e.param, "code": e.code}
            yield f"data: {json.dumps({'error': error})}\n\n"
        else:
            yield event({}, reply.finish_reason)
        finally:
            done.cancel()
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ validation (before queueing)

    def _check_model(self, model: str | None, param: str = "model") -> None:
        if model is not None and model != self.model_id:
            raise APIError(404, f"model {model!r} is not served here; this server serves {self.model_id!r} "
                                "(GET /v1/models)", param=param, code="model_not_found")

    def _generation_task(self, r: ImageGenerationRequest) -> tuple[GenerationTask, Hashable]:
        c = self.config
        self._check_model(r.model)
        if not r.prompt.strip():
            raise bad_request("prompt is empty; give it some text", "prompt")
        if len(r.prompt) > c.max_prompt_chars:
            raise bad_request(f"prompt is {len(r.prompt)} characters; the limit is {c.max_prompt_chars}", "prompt",
                              code="prompt_too_long")
        if not 1 <= r.n <= c.max_n:
            raise bad_request(f"n must be between 1 and {c.max_n}, got {r.n}", "n")
        if r.steps is not None and not 1 <= r.steps <= c.max_steps:
            raise bad_request(f"steps must be between 1 and {c.max_steps}, got {r.steps}", "steps")
        if r.guidance is not None and not (math.isfinite(r.guidance) and 0 <= r.guidance <= 100):
            raise bad_request(f"guidance must be between 0 and 100, got {r.guidance}", "guidance")
        _check_seed(r.seed)
        size = self._size(r.size)
        # seeded requests share calls with seeded ones of the same n (one seed per prompt), unseeded with unseeded
        group = None if r.seed is None else ("seeded", r.n)
        return GenerationTask(r.prompt, r.n, r.seed), ("generate", r.steps, r.guidance, size, group)

    def _size(self, size: str | None) -> tuple[int, int] | None:
        """OpenAI's `size`: "WxH" (width x height, e.g. "1536x1024") -> (height, width); "auto" or none ->
        None, the decoder's default square."""
        if size is None or size == "auto":
            return None
        match = re.fullmatch(r"(\d+)x(\d+)", size)
        if not match:
            side = self.model.decoder.default_size
            raise bad_request(f"size must be 'auto' or 'WxH' (width x height) such as '{side}x{side}', got {size!r}",
                              "size")
        width, height = int(match[1]), int(match[2])
        if width * height > self.config.max_pixels:
            raise bad_request(f"size {size} is {width * height:,} pixels, more than this server's limit of "
                              f"{self.config.max_pixels:,}", "size")
        try:
            self.model.decoder.check_size(height, width)
        except ValueError as e:
            raise bad_request(f"size {size}: {e}", "size") from e
        return height, width

    def _chat_task(self, r: ChatCompletionRequest) -> ChatTask:
        c = self.config
        self._check_model(r.model)
        if r.n != 1:
            raise bad_request(f"n must be 1 (one reply per request), got {r.n}", "n")
        max_new = next((v for v in (r.max_completion_tokens, r.max_tokens) if v is not None),
                       min(c.default_max_tokens, c.max_tokens))
        if not 1 <= max_new <= c.max_tokens:
            raise bad_request(f"max_tokens must be between 1 and {c.max_tokens}, got {max_new}", "max_tokens")
        temperature = r.temperature
        if temperature is not None and not (math.isfinite(temperature) and 0 <= temperature <= 2):
            raise bad_request(f"temperature must be between 0 and 2, got {temperature}", "temperature")
        top_p = 1.0 if r.top_p is None else r.top_p
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise bad_request(f"top_p must be in (0, 1], got {top_p}", "top_p")
        _check_seed(r.seed)
        if len(r.messages) > c.max_messages:
            raise bad_request(f"{len(r.messages)} messages; the limit is {c.max_messages}", "messages")
        text = sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text or "") for p in m.content or [])
                   for m in r.messages)
        if text > c.max_chat_chars:
            raise bad_request(f"the messages hold {text} characters of text; the limit is {c.max_chat_chars}",
                              "messages", code="context_too_long")
        images = [p for m in r.messages if isinstance(m.content, list) for p in m.content if p.type == "image_url"]
        if len(images) > c.max_images_per_request:
            raise bad_request(f"{len(images)} images; the limit is {c.max_images_per_request} per request",
                              "messages", code="too_many_images")
        conversation = [self._message(m, f"messages[{i}]") for i, m in enumerate(r.messages)]
        return ChatTask(conversation, max_new, temperature, top_p, r.seed)

    def _message(self, m: ChatMessage, at: str) -> dict:
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            return {"role": role, "content": m.content or ""}
        if not m.content:
            raise bad_request(f"{at}.content is an empty list", f"{at}.content")
        parts = []
        for k, part in enumerate(m.content):
            where = f"{at}.content[{k}]"
            if part.type == "text":
                if part.text is None:
                    raise bad_request(f"{where} is a text part without `text`", where)
                parts.append({"type": "text", "text": part.text})
            else:
                if part.image_url is None:
                    raise bad_request(f"{where} is an image_url part without `image_url`", where)
                if role != "user":
                    raise bad_request(f"{where}: only user messages may carry images", where)
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                parts.append({"type": "image", "image": load_image(url, self.config, f"{where}.image_url")})
        return {"role": role, "content": parts}

    # ------------------------------------------------------------------ queueing

    async def _submit(self, key: Hashable, payload, *, weight: int = 1, batchable: bool = True):
        return await self._result(self._enqueue(key, payload, weight=weight, batchable=batchable))

    def _enqueue(self, key: Hashable, payload, *, weight: int = 1, batchable: bool = True):
        """Queue a job (its concurrent Future); a full queue is 429, a stopping server 503."""
        try:
            return self.batcher.submit(key, payload, weight=weight, batchable=batchable)
        except QueueFull as e:
            raise APIError(429, f"the server is busy ({e}); retry after {self.config.retry_after_s} s",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.config.retry_after_s)}) from e
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from e

    async def _result(self, future):
        """A queued job's result, every failure turned into the APIError a client should see."""
        timeout = self.config.request_timeout_s
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError as e:
            raise APIError(504, f"no answer within {timeout:g} s; the request was cancelled",
                           type="timeout_error", code="timeout") from e
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from e
        except (ValueError, TypeError) as e:  # the library's own input checks
            raise bad_request(str(e)) from e
        except Exception as e:
            log.exception("request failed in the model")
            raise APIError(500, f"the model failed on this request: {type(e).__name__}: {e}",
                           type="server_error", code="model_error") from e

    # ------------------------------------------------------------------ the worker thread

    def _run(self, key: Hashable, payloads: Sequence) -> list:
        if key[0] == "generate":
            return self._run_generation(key, payloads)
        return [_capture(self._run_chat, task) for task in payloads]

    def _run_generation(self, key: Hashable, tasks: Sequence[GenerationTask]) -> list:
        try:
            return self._generate(key, tasks)
        except Exception:
            if len(tasks) == 1:
                raise
        # the batch failed: run its requests one by one, so only the ones at fault fail
        return [_capture(lambda t: self._generate(key, [t])[0], task) for task in tasks]

    def _generate(self, key: Hashable, tasks: Sequence[GenerationTask]) -> list[list[Image.Image]]:
        _, steps, guidance, size, group = key
        height, width = size or (None, None)
        settings = dict(steps=steps, guidance=guidance, height=height, width=width)
        if len(tasks) == 1:  # alone: exactly the library call, so a seed reproduces
            (t,) = tasks
            images = self.model.generate([t.prompt], num_images=t.n, seed=t.seed, **settings)
        elif group is not None:  # seeded, equal n: each prompt's noise from its own seed
            images = self.model.generate([t.prompt for t in tasks], num_images=tasks[0].n,
                                         seed=[t.seed for t in tasks], **settings)
        else:  # unseeded requests share fresh randomness: one prompt per image
            images = self.model.generate([t.prompt for t in tasks for _ in range(t.n)], **settings)
        self.metrics.observe_batch(len(tasks), len(images))
        out, start = [], 0
        for t in tasks:
            out.append(images[start:start + t.n])
            start += t.n
        return out

    def _run_chat(self, task: ChatTask) -> ChatReply:
        c = self.config
        if task.temperature is None:  # the model's generation config decides
            sampling = {}
        elif task.temperature == 0:
            sampling = dict(do_sample=False)
        else:
            sampling = dict(do_sample=True, temperature=task.temperature, top_p=task.top_p)
        sampling.update(min_pixels=c.chat_min_pixels, max_pixels=c.chat_max_pixels)
        (text,) = self.model.chat([task.conversation], max_new_tokens=task.max_new_tokens, seed=task.seed,
                                  on_text=task.on_text, **sampling)
        # a reply as long as the budget was cut there ("length"); a shorter one ended on its own ("stop")
        used = len(self.model.backbone.tokenizer.encode(text, add_special_tokens=False))
        return ChatReply(text, "length" if used >= task.max_new_tokens else "stop")


def _check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise bad_request(f"seed must be between 0 and {MAX_SEED}, got {seed}", "seed")


def _capture(fn, arg):
    """fn(arg), or the exception it raised (a result that fails only its own request)."""
    try:
        return fn(arg)
    except Exception as e:
        return e
