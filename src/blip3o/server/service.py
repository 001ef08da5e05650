"""The service behind the routes: it owns the model and the micro-batcher, validates every request
before it is queued, and turns requests into `Blip3o.generate` / `Blip3o.edit` / `Blip3o.chat` calls.

Seed semantics. A request that names a `seed` gets the images of
`model.generate([prompt], num_images=n, seed=seed, ...)`: what the CLI and the library give for
those arguments, whatever else the server is doing. Seeded requests with equal (steps, guidance,
size, n) share one call with one seed per prompt (`generate(prompts, num_images=n, seeds)`), which
draws each prompt's noise from its own generator exactly as its solo call would; only floating-point
rounding, which differs slightly between batch sizes, can move a pixel by a level. (Not with a
decoder whose sampler draws fresh noise at every step and n > 1: there a seeded request runs alone.)
Requests without a seed ask for fresh randomness and share calls with each other when (steps,
guidance, size) are equal. Calls hold up to `max_batch_images` images.

Edits (`/v1/images/edits`, and a chat request for an image of a conversation that holds one) follow the
same semantics with `model.edit([sources], [instruction], num_images=n, seed=seed, ...)` in place of
`generate`: a seeded edit gets the images of that call, and edits share calls only with edits of the
same settings and number of source images. A chat request for an image of a conversation without one
is a generation of its last user message's text (n = 1).

Memory. Each request reserves in the memory budget (`memory.py`) what it will hold at its largest
before anything is decoded: a chat request its images, encoded and decoded (sized from their headers),
an image request the images it asks for (and an edit its sources, encoded and decoded, too). A request's
images are decoded once before queueing, to refuse what the model could not read while the client can
still be told plainly, and dropped; while queued the request holds them encoded, and the worker decodes
them again just before the model reads them and drops them right after.

Clients that leave. When the route's await is cancelled (the client disconnected, see app.py) or times
out, a queued job leaves the queue unrun and a running chat stops at its next word.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import threading
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from PIL import Image

from blip3o.server.batcher import MicroBatcher, QueueFull, ShuttingDown
from blip3o.server.config import ServerConfig
from blip3o.server.errors import APIError, bad_request
from blip3o.server.media import (
    BYTES_PER_PIXEL,
    EncodedImage,
    decoded_bytes,
    encode_png,
    image_bytes,
    open_image,
)
from blip3o.server.memory import BudgetFull, LargerThanBudget, MemoryBudget, Reservation, return_freed_memory
from blip3o.server.metrics import Metrics
from blip3o.server.schemas import (
    ChatCompletionRequest,
    ChatImageOptions,
    ChatMessage,
    ImageEditRequest,
    ImageGenerationRequest,
)

log = logging.getLogger("blip3o.server")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationTask:
    """One image request as the worker runs it: `n` images of `prompt`, from `seed` if given; with `sources`,
    edits of those images by `prompt` (the instruction)."""

    prompt: str
    n: int
    seed: int | None
    sources: tuple[EncodedImage, ...] = ()


@dataclass(frozen=True)
class ChatTask:
    """One chat request as the worker runs it."""

    conversation: list[dict]  # Blip3o.chat's format, with each image an EncodedImage
    max_new_tokens: int
    temperature: float | None  # None: the model's generation config; 0: greedy
    top_p: float
    seed: int | None
    nbytes: int  # the memory it holds at its largest: each image encoded and decoded
    on_text: Callable[[str], None] | None = None  # streaming: receives the reply as it is generated
    stop: threading.Event = field(default_factory=threading.Event)  # set when no one waits for the reply

    @property
    def images(self) -> list[EncodedImage]:
        return [part["image"] for m in self.conversation if isinstance(m["content"], list)
                for part in m["content"] if part["type"] == "image"]


class Abandoned(Exception):
    """A running chat stopped because no one waits for its reply any more."""


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
        self.budget = MemoryBudget(c.memory_budget_bytes)
        self.metrics = Metrics(queue_depth=lambda: self.batcher.depth, memory_held=lambda: self.budget.held)

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()

    # ------------------------------------------------------------------ what the routes call

    def health(self) -> dict:
        return {"status": "ok", "model": self.model_id, "device": str(self.model.device),
                "queue_depth": self.batcher.depth, "memory_held_bytes": self.budget.held}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self, model_id: str | None = None) -> dict:
        self._check_model(model_id, param="model_id")
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "blip3o"}

    async def generate_images(self, request: ImageGenerationRequest) -> dict:
        encoded = await self._draw_images(*self._generation_task(request))
        return _images_answer(encoded, request.response_format)

    async def edit_images(self, request: ImageEditRequest, images: Sequence[EncodedImage]) -> dict:
        """`request.n` edits of `images` (one source or several) by `request.prompt`, as generate_images answers."""
        encoded = await self._draw_images(*self._generation_task(request, tuple(images)))
        return _images_answer(encoded, request.response_format)

    async def chat_completion(self, request: ChatCompletionRequest) -> dict:
        if _asks_for_image(request):
            task, key = await asyncio.to_thread(self._chat_image_task, request)  # base64: off the event loop
            (b64,) = await self._draw_images(task, key)
            return self._completion([{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}],
                                    "stop")
        task, future = await self._queue_chat(request)
        reply: ChatReply = await self._result(future, task.stop)
        return self._completion(reply.text, reply.finish_reason)

    def _completion(self, content: str | list[dict], finish_reason: str) -> dict:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish_reason, "logprobs": None}],
        }

    async def _draw_images(self, task: GenerationTask, key: Hashable) -> list[str]:
        """Run an image task: its memory reserved (the images it makes, and its sources encoded and decoded),
        its sources checked, queued; its images as base64 PNGs."""
        height, width = key[3] or (self.model.decoder.default_size,) * 2
        sources = sum(len(image.data) + decoded_bytes(image.data, self.config) for image in task.sources)
        reservation = self._reserve(task.n * height * width * BYTES_PER_PIXEL + sources)
        future = None
        try:
            if task.sources:
                await asyncio.to_thread(self._check_images, task.sources)
            batchable = task.seed is None or task.n == 1 or not self.model.decoder.step_noise
            future = self._enqueue(key, task, weight=task.n, batchable=batchable)
            images = await self._result(future)
            return await asyncio.to_thread(lambda: [encode_png(image) for image in images])
        finally:  # the worker may still be drawing them for a client that left: held until it is done
            _release_when_done(reservation, future)

    async def chat_stream(self, request: ChatCompletionRequest) -> ChatStream:
        """The reply as server-sent `chat.completion.chunk` events, token by token as the model writes
        it, then `data: [DONE]`.

        Validation and queueing happen before this returns, so a bad request or a full queue is a
        plain JSON error with its status; a failure after the stream began arrives as an `error` event.
        """
        if _asks_for_image(request):
            raise bad_request('an image reply cannot be streamed; send "stream": false with "modalities": '
                              '["image"]', "stream")
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()
        # together the pieces are exactly the reply chat_completion returns (as decoded)
        task, future = await self._queue_chat(
            request, on_text=lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece))
        return ChatStream(self._chat_events(future, task.stop, pieces), lambda: _give_up(future, task.stop))

    async def _queue_chat(self, request: ChatCompletionRequest, on_text: Callable[[str], None] | None = None
                          ) -> tuple[ChatTask, Future]:
        """Validate a chat request, reserve its memory, check its images decode, and queue it. The
        reservation ends when the job does (the worker has dropped its images by then)."""
        task = await asyncio.to_thread(self._chat_task, request)  # base64 and headers: off the event loop
        task = replace(task, on_text=on_text)
        reservation = self._reserve(task.nbytes)
        try:
            await asyncio.to_thread(self._check_images, task.images)
            future = self._enqueue(("chat",), task, batchable=False)
        except BaseException:
            reservation.release()
            raise
        _release_when_done(reservation, future)
        return task, future

    def _check_images(self, images: Sequence[EncodedImage]) -> None:
        """Decode each image once and drop it: what the worker could not read is refused before queueing."""
        freed = 0
        try:
            for image in images:
                decoded = open_image(image.data, self.config, image.param)
                freed += decoded.width * decoded.height * BYTES_PER_PIXEL
                del decoded
        finally:
            return_freed_memory(freed)

    async def _chat_events(self, future, stop: threading.Event, pieces: asyncio.Queue) -> AsyncIterator[str]:
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_id}

        def event(delta: dict, finish: str | None = None) -> str:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(chunk)}\n\n"

        yield event({"role": "assistant", "content": ""})
        done = asyncio.ensure_future(self._result(future, stop))
        try:
            while not done.done() or not pieces.empty():
                if pieces.empty():
                    piece = asyncio.ensure_future(pieces.get())
                    try:
                        await asyncio.wait({piece, done}, return_when=asyncio.FIRST_COMPLETED)
                    finally:  # a piece not yet taken stays in the queue (the stream may also end here)
                        piece.cancel()
                    if not piece.done() or piece.cancelled():
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

    def _generation_task(self, r: ImageGenerationRequest, sources: tuple[EncodedImage, ...] = ()
                         ) -> tuple[GenerationTask, Hashable]:
        """An image request (with `sources`: an edit of them) -> its task and its batching key."""
        self._check_model(r.model)
        if sources:
            self._check_editing(len(sources))
        self._check_prompt(r.prompt, "prompt")
        if not 1 <= r.n <= self.config.max_n:
            raise bad_request(f"n must be between 1 and {self.config.max_n}, got {r.n}", "n")
        return self._image_task(r.prompt, r.n, r.seed, r, sources)

    def _image_task(self, prompt: str, n: int, seed: int | None, options: ImageGenerationRequest | ChatImageOptions,
                    sources: tuple[EncodedImage, ...], at: str = "") -> tuple[GenerationTask, Hashable]:
        """The task of a checked prompt, its settings (`options`' steps, guidance and size, named `at` + field in
        errors) checked, and its key: requests share a model call only when their keys are equal."""
        c = self.config
        if options.steps is not None and not 1 <= options.steps <= c.max_steps:
            raise bad_request(f"{at}steps must be between 1 and {c.max_steps}, got {options.steps}", f"{at}steps")
        guidance = options.guidance
        if guidance is not None and not (math.isfinite(guidance) and 0 <= guidance <= 100):
            raise bad_request(f"{at}guidance must be between 0 and 100, got {guidance}", f"{at}guidance")
        _check_seed(seed)
        size = self._size(options.size, f"{at}size")
        # seeded requests share calls with seeded ones of the same n (one seed per prompt), unseeded with unseeded
        group = None if seed is None else ("seeded", n)
        kind = "edit" if sources else "generate"
        return GenerationTask(prompt, n, seed, sources), (kind, options.steps, guidance, size, group, len(sources))

    def _check_prompt(self, prompt: str, param: str) -> None:
        if not prompt.strip():
            raise bad_request(f"{param} is empty; give it some text", param)
        _check_text(prompt, param)
        if len(prompt) > self.config.max_prompt_chars:
            raise bad_request(f"{param} is {len(prompt)} characters; the limit is {self.config.max_prompt_chars}",
                              param, code="prompt_too_long")

    def _check_editing(self, count: int) -> None:
        """400 unless the model edits, from `count` source images."""
        try:
            self.model.require_editing()
        except ValueError as e:  # CannotEdit, or a backbone that generates nothing
            raise APIError(400, f"model {self.model_id!r} cannot edit images: {e}", param="model",
                           code="model_cannot_edit") from e
        dit = self.model.config.dit
        most = dit.max_sources if dit.source_context else 1
        limit = self.config.max_images_per_request
        if count > limit:
            raise bad_request(f"{count} images; the limit is {limit} per request", "image", code="too_many_images")
        if count > most:
            raise bad_request(f"{count} source images; model {self.model_id!r} edits from at most {most}", "image",
                              code="too_many_images")

    def _size(self, size: str | None, param: str = "size") -> tuple[int, int] | None:
        """OpenAI's `size`: "WxH" (width x height, e.g. "1536x1024") -> (height, width); "auto" or none ->
        None, the decoder's default square."""
        if size is None or size == "auto":
            return None
        match = re.fullmatch(r"(\d+)x(\d+)", size)
        if not match:
            side = self.model.decoder.default_size
            raise bad_request(f"{param} must be 'auto' or 'WxH' (width x height) such as '{side}x{side}', got "
                              f"{_shown(size)}", param)
        limit = self.config.max_pixels
        if any(len(side.lstrip("0")) > len(str(limit)) for side in match.groups()):  # int() refuses 4,300 digits
            raise bad_request(f"size {_shown(size)} has a side of more than {len(str(limit))} digits, beyond this "
                              f"server's limit of {limit:,} pixels", param)
        width, height = int(match[1]), int(match[2])
        if width * height > limit:
            raise bad_request(f"size {size} is {width * height:,} pixels, more than this server's limit of "
                              f"{limit:,}", param)
        try:
            self.model.decoder.check_size(height, width)
        except ValueError as e:
            raise bad_request(f"size {size}: {e}", param) from e
        return height, width

    def _chat_task(self, r: ChatCompletionRequest) -> ChatTask:
        c = self.config
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
        task = ChatTask(self._conversation(r), max_new, temperature, top_p, r.seed, nbytes=0)
        nbytes = sum(len(image.data) + decoded_bytes(image.data, c) for image in task.images)
        return replace(task, nbytes=nbytes)

    def _chat_image_task(self, r: ChatCompletionRequest) -> tuple[GenerationTask, Hashable]:
        """A chat request for an image: an edit of the conversation's latest image by the last user message's
        text, or a generation of that text when the conversation holds no image."""
        conversation = self._conversation(r)
        asking = [i for i, m in enumerate(conversation) if m["role"] == "user"]
        if not asking:
            raise bad_request("an image reply needs a user message to draw or edit by; the messages hold none",
                              "messages")
        content = conversation[asking[-1]]["content"]
        prompt = content if isinstance(content, str) else "\n".join(p["text"] for p in content if p["type"] == "text")
        param = f"messages[{asking[-1]}].content"
        if not prompt.strip():
            raise bad_request(f"{param} has no text: an image reply draws, or edits the latest image, by the text of "
                              "the last user message", param)
        self._check_prompt(prompt, param)
        images = [p["image"] for m in conversation if isinstance(m["content"], list) for p in m["content"]
                  if p["type"] == "image"]
        sources = tuple(images[-1:])
        if sources:
            self._check_editing(1)
        return self._image_task(prompt, 1, r.seed, r.image or ChatImageOptions(), sources, at="image.")

    def _conversation(self, r: ChatCompletionRequest) -> list[dict]:
        """The checked messages of a chat request in `Blip3o.chat`'s format, each image an EncodedImage."""
        c = self.config
        self._check_model(r.model)
        if r.n != 1:
            raise bad_request(f"n must be 1 (one reply per request), got {r.n}", "n")
        _check_seed(r.seed)
        if r.image is not None and not _asks_for_image(r):
            raise bad_request('image options are for image replies: add "image" to modalities', "image")
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
        return [self._message(m, f"messages[{i}]") for i, m in enumerate(r.messages)]

    def _message(self, m: ChatMessage, at: str) -> dict:
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            _check_text(m.content or "", f"{at}.content")
            return {"role": role, "content": m.content or ""}
        if not m.content:
            raise bad_request(f"{at}.content is an empty list", f"{at}.content")
        parts = []
        for k, part in enumerate(m.content):
            where = f"{at}.content[{k}]"
            if part.type == "text":
                if part.text is None:
                    raise bad_request(f"{where} is a text part without `text`", where)
                _check_text(part.text, f"{where}.text")
                parts.append({"type": "text", "text": part.text})
            else:
                if part.image_url is None:
                    raise bad_request(f"{where} is an image_url part without `image_url`", where)
                if role not in ("user", "assistant"):  # an assistant's: an image reply sent back
                    raise bad_request(f"{where}: only user and assistant messages may carry images", where)
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                param = f"{where}.image_url"
                parts.append({"type": "image", "image": EncodedImage(image_bytes(url, self.config, param), param)})
        return {"role": role, "content": parts}

    # ------------------------------------------------------------------ queueing

    def _reserve(self, nbytes: int) -> Reservation:
        """Hold `nbytes` of the memory budget: 413 for a request larger than the whole budget, 429 for one
        that does not fit beside the requests in flight."""
        try:
            return self.budget.reserve(nbytes)
        except LargerThanBudget as e:
            raise APIError(413, f"this request is too large for the server's memory: {e}",
                           code="request_too_large") from e
        except BudgetFull as e:
            raise APIError(429, f"the server is busy ({e}); retry after {self.config.retry_after_s} s",
                           type="rate_limit_error", code="memory_full",
                           headers={"Retry-After": str(self.config.retry_after_s)}) from e

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

    async def _result(self, future: Future, stop: threading.Event | None = None):
        """A queued job's result, every failure turned into the APIError a client should see. Left without
        one (a timeout, or the await cancelled because the client left), the job is given up (`_give_up`)."""
        timeout = self.config.request_timeout_s
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except asyncio.TimeoutError as e:
            raise APIError(504, f"no answer within {timeout:g} s; the request was cancelled",
                           type="timeout_error", code="timeout") from e
        except ShuttingDown as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from e
        except APIError:  # the worker's own refusal of a request (an image it could not decode)
            raise
        except (ValueError, TypeError) as e:  # the library's own input checks
            raise bad_request(str(e)) from e
        except Exception as e:
            log.exception("request failed in the model")
            raise APIError(500, f"the model failed on this request: {type(e).__name__}: {e}",
                           type="server_error", code="model_error") from e
        finally:
            _give_up(future, stop)

    # ------------------------------------------------------------------ the worker thread

    def _run(self, key: Hashable, payloads: Sequence) -> list:
        if key[0] == "chat":
            return [_capture(self._run_chat, task) for task in payloads]
        return self._run_generation(key, payloads)

    def _run_generation(self, key: Hashable, tasks: Sequence[GenerationTask]) -> list:
        try:
            return self._generate(key, tasks)
        except Exception:
            if len(tasks) == 1:
                raise
        # the batch failed: run its requests one by one, so only the ones at fault fail
        return [_capture(lambda t: self._generate(key, [t])[0], task) for task in tasks]

    def _generate(self, key: Hashable, tasks: Sequence[GenerationTask]) -> list[list[Image.Image]]:
        """One model call for `tasks`: `generate` of their prompts, or `edit` of their sources by them."""
        kind, steps, guidance, size, group, _ = key
        height, width = size or (None, None)
        settings = dict(steps=steps, guidance=guidance, height=height, width=width)
        sources = [[open_image(s.data, self.config, s.param) for s in t.sources] for t in tasks]
        freed = sum(image.width * image.height * BYTES_PER_PIXEL for row in sources for image in row)

        def call(rows: Sequence[int], **options) -> list[Image.Image]:  # rows: the task of each prompt
            prompts = [tasks[i].prompt for i in rows]
            if kind == "edit":
                return self.model.edit([sources[i] for i in rows], prompts, **options, **settings)
            return self.model.generate(prompts, **options, **settings)

        try:
            if len(tasks) == 1:  # alone: exactly the library call, so a seed reproduces
                images = call([0], num_images=tasks[0].n, seed=tasks[0].seed)
            elif group is not None:  # seeded, equal n: each prompt's noise from its own seed
                images = call(range(len(tasks)), num_images=tasks[0].n, seed=[t.seed for t in tasks])
            else:  # unseeded requests share fresh randomness: one prompt per image
                images = call([i for i, t in enumerate(tasks) for _ in range(t.n)])
        finally:
            sources.clear()  # the decoded sources: freed now, not when the batch ends
            return_freed_memory(freed)
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

        def on_text(piece: str) -> None:  # the model's streamer calls it at each word: the place to stop
            if task.stop.is_set():
                raise Abandoned("no one waits for this reply any more; it was stopped")
            if task.on_text is not None:
                task.on_text(piece)

        conversation = self._decoded(task.conversation)
        try:
            (text,) = self.model.chat([conversation], max_new_tokens=task.max_new_tokens, seed=task.seed,
                                      on_text=on_text, **sampling)
        except Exception as e:
            traceback.clear_frames(e.__traceback__)  # the frames of a failed call would keep the images alive
            raise
        finally:
            del conversation  # the decoded images: freed now, not when the request ends
            return_freed_memory(task.nbytes)
        # a reply as long as the budget was cut there ("length"); a shorter one ended on its own ("stop")
        used = len(self.model.backbone.tokenizer.encode(text, add_special_tokens=False))
        return ChatReply(text, "length" if used >= task.max_new_tokens else "stop")


    def _decoded(self, conversation: list[dict]) -> list[dict]:
        """The conversation with each EncodedImage decoded (a new list: the task keeps its bytes)."""

        def decoded(part: dict) -> dict:
            if part["type"] != "image":
                return part
            return {**part, "image": open_image(part["image"].data, self.config, part["image"].param)}

        return [{**m, "content": [decoded(p) for p in m["content"]]} if isinstance(m["content"], list) else m
                for m in conversation]


class ChatStream:
    """A streamed reply's server-sent events (`events`), and `aclose`, which gives the job up when the
    stream ends before the reply does, even if it never began (the client left at once)."""

    def __init__(self, events: AsyncIterator[str], give_up: Callable[[], None]) -> None:
        self.events, self._give_up = events, give_up

    def __aiter__(self) -> AsyncIterator[str]:
        return self.events

    async def aclose(self) -> None:
        self._give_up()
        await self.events.aclose()


def _give_up(future: Future, stop: threading.Event | None) -> None:
    """No one waits for this job any more: if queued it leaves the queue unrun; a running chat stops."""
    if not future.done():
        future.cancel()
        if stop is not None:
            stop.set()


def _asks_for_image(request: ChatCompletionRequest) -> bool:
    return "image" in (request.modalities or ())


def _images_answer(encoded: Sequence[str], response_format: str | None) -> dict:
    """OpenAI's images answer of base64 PNGs: each as `b64_json`, or as a data: URL for "url"."""
    if response_format == "url":
        data = [{"url": f"data:image/png;base64,{b64}"} for b64 in encoded]
    else:
        data = [{"b64_json": b64} for b64 in encoded]
    return {"created": int(time.time()), "data": data}


def _release_when_done(reservation: Reservation, future: Future | None) -> None:
    """Release `reservation` now if the job has ended (or was never queued), else when it ends."""
    if future is None or future.done():
        reservation.release()
    else:
        future.add_done_callback(lambda _: reservation.release())


def _check_text(text: str, param: str) -> None:
    """Text that JSON allows but no tokenizer reads: a lone surrogate (\\ud800), refused by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(f"{param} is not valid Unicode text: a lone surrogate {text[e.start]!r} at character "
                          f"{e.start}", param, code="invalid_text") from e


def _shown(text: str, limit: int = 40) -> str:
    """`text` quoted for a message, cut short if long (the client sent it; it need not come back whole)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text):,} characters)"


def _check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise bad_request(f"seed must be between 0 and {MAX_SEED}, got {seed}", "seed")


def _capture(fn, arg):
    """fn(arg), or the exception it raised (a result that fails only its own request)."""
    try:
        return fn(arg)
    except Exception as e:
        return e
