"""The HTTP face of `Blip3oService`: routes parse the request and delegate; nothing here runs a model.

Images from a chat (`POST /v1/chat/completions`). A request whose `modalities` holds "image" (["image"] or
["text", "image"]) gets one image as its reply instead of text. When the conversation holds an image (a
user's upload, or an earlier image reply sent back as an assistant message), the reply edits the most
recent one, with the text of the last user message (its text parts joined by newlines) as the
instruction; otherwise it draws that text. The text is a prompt: the images route's limits apply to it.
`seed` makes the image reproducible (the service's seed semantics: the image of `Blip3o.edit` or
`Blip3o.generate` for that text and seed); the optional `image` object sets its `size` ("WxH", width x
height, or "auto"), `steps` and `guidance`; `max_tokens`, `temperature` and `top_p` play no part. Such a
request cannot be streamed (`stream: true` is refused), and a model that cannot edit refuses an edit with
400 `model_cannot_edit`. Assistant messages may carry image parts, so a reply goes back as it came:

    {"model": "blip3o", "modalities": ["image"], "seed": 7, "image": {"size": "1024x1024"},
     "messages": [
       {"role": "user", "content": "a red circle"},
       {"role": "assistant", "content": [{"type": "image_url",
                                          "image_url": {"url": "data:image/png;base64,iVBO..."}}]},
       {"role": "user", "content": "make it blue"}]}

answers

    {"id": "chatcmpl-...", "object": "chat.completion", "created": 1700000000, "model": "blip3o",
     "choices": [{"index": 0, "finish_reason": "stop", "logprobs": null,
                  "message": {"role": "assistant", "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO..."}}]}}]}

Image edits (`POST /v1/images/edits`) take OpenAI's multipart form: the source as the file `image`, or
several as files `image[]` (the official client's names), and the fields `prompt`, `model`, `n`, `size`,
`response_format`, and the extensions `seed`, `steps` and `guidance`; they answer as `/v1/images/generations`.
A `mask` is refused: this model edits the whole image by its instruction.

Around the routes, from the outside in: `RecordMetrics` counts every answer; `CancelOnDisconnect` stops
the work of a client that left; `ReadBody` reads each request body whole, within a size limit and a
deadline, before anything parses it.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from blip3o.server.config import ServerConfig
from blip3o.server.errors import APIError, bad_request, too_large
from blip3o.server.media import EncodedImage, read_upload
from blip3o.server.schemas import ChatCompletionRequest, ImageEditRequest, ImageGenerationRequest
from blip3o.server.service import Blip3oService

STATIC = Path(__file__).parent / "static"
CLIENT_GONE = "blip3o.client_gone"  # set in a request's scope when its client left before the answer ended
CLIENT_CLOSED_REQUEST = 499  # the status metrics count such a request under (nginx's name and number)


def create_app(service: Blip3oService) -> FastAPI:
    """An ASGI app serving `service`: the OpenAI-compatible API, /health, /metrics and the web page (and
    FastAPI's /docs, /redoc and /openapi.json when `service.config.docs`). Every GET route answers HEAD."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        service.stop()

    c = service.config
    app = FastAPI(title="blip3o", summary="BLIP3-o: generate and understand images", lifespan=lifespan,
                  docs_url="/docs" if c.docs else None, redoc_url="/redoc" if c.docs else None,
                  openapi_url="/openapi.json" if c.docs else None)
    app.state.service = service
    _install_error_handlers(app)
    app.add_middleware(ReadBody, max_bytes=c.max_body_bytes, timeout_s=c.body_timeout_s)
    app.add_middleware(CancelOnDisconnect)
    app.add_middleware(RecordMetrics, service=service)  # outermost: it sees every answer, 413s included

    def get(path: str, **options):
        """app.get, and the same endpoint for HEAD (uvicorn sends its headers without the body)."""
        def register(endpoint):
            app.head(path, **{**options, "include_in_schema": False})(endpoint)
            return app.get(path, **options)(endpoint)
        return register

    @get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # answers HEAD itself

    @get("/health")
    async def health() -> dict:
        return service.health()

    @get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @get("/v1/models")
    async def models() -> dict:
        return service.models()

    @get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        return service.model_card(model_id)

    @app.post("/v1/images/generations")
    async def images(body: ImageGenerationRequest) -> dict:
        return await service.generate_images(body)

    @app.post("/v1/images/edits", openapi_extra=_edit_form_schema())
    async def edits(request: Request) -> dict:
        body, images = await _edit_form(request, c)
        return await service.edit_images(body, images)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        if body.stream:
            return EventStream(await service.chat_stream(body))
        return await service.chat_completion(body)

    return app


IMAGE_FIELDS = ("image", "image[]")  # an edit's source files: one `image`, or several `image[]` (the openai client)


def _edit_form_schema() -> dict:
    """The edit form's OpenAPI description (the route reads the form itself): ImageEditRequest's fields and the
    source files."""
    schema = ImageEditRequest.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    schema["properties"] = {"image": binary, "image[]": {"type": "array", "items": binary}, **schema["properties"]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


async def _edit_form(request: Request, config: ServerConfig) -> tuple[ImageEditRequest, list[EncodedImage]]:
    """An edit's multipart form -> its text fields and its source images (read within the size limit)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise APIError(415, f"/v1/images/edits takes a multipart/form-data body (the image as a file), got "
                            f"{kind or 'no content type'!r}", code="unsupported_media_type")
    try:
        async with request.form() as form:
            return _edit_fields(form), await _edit_images(form, config)
    except HTTPException as e:  # starlette's refusal of a malformed form
        raise bad_request(f"the multipart form could not be read: {e.detail}", code="invalid_form") from e


def _edit_fields(form: FormData) -> ImageEditRequest:
    if "mask" in form:
        raise bad_request("mask is not supported: this model edits the whole image by the prompt; send the image and "
                          "the prompt alone", "mask", code="mask_not_supported")
    fields = {name: value for name, value in form.multi_items() if isinstance(value, str)}
    try:
        return ImageEditRequest.model_validate(fields)
    except ValidationError as e:  # rendered as every invalid body is
        raise RequestValidationError(e.errors()) from e


async def _edit_images(form: FormData, config: ServerConfig) -> list[EncodedImage]:
    parts = [(name, value) for name, value in form.multi_items() if name in IMAGE_FIELDS]
    if not parts:
        raise bad_request("the form has no image: send the source image as the file `image` (several as `image[]`)",
                          "image", code="missing_image")
    images = []
    for k, (name, value) in enumerate(parts):
        param = "image" if len(parts) == 1 else f"image[{k}]"
        if not isinstance(value, UploadFile):
            raise bad_request(f"{param} must be a file of the form, not a text field ({name!r})", param,
                              code="invalid_image")
        images.append(await read_upload(value, config, param))
    return images


class EventStream(StreamingResponse):
    """Server-sent events from an async iterator that has `aclose`; it is closed however the response ends
    (a client that left included, even before the first event), so the work behind it stops."""

    def __init__(self, events) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            ctx = errors[0].get("ctx", {}).get("error", "")
            return APIError(400, f"the request body is not valid JSON: {ctx}".rstrip(": "),
                            code="invalid_json").response()
        err = errors[0]
        param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}"
                        for part in err.get("loc", ()) if part != "body").lstrip(".") or None  # messages[0].role
        message = f"{param}: {err.get('msg')}" if param else f"the request body: {err.get('msg')}"
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code,
                        headers=dict(e.headers or {})).response()

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()


class ReadBody:
    """Reads a POST, PUT or PATCH body whole before the app sees it (as one message): 413 for a body over
    `max_bytes` (declared or sent, chunked bodies too), 408 for one not whole within `timeout_s` (a client
    that trickles its bytes holds a connection and nothing else)."""

    def __init__(self, app, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(self._too_large(), scope, receive, send)
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except asyncio.TimeoutError:
            error = APIError(408, f"the request body did not arrive within {self.timeout_s:g} s",
                             code="body_timeout", headers={"Connection": "close"})
            return await self._refuse(error, scope, receive, send)
        except _BodyTooLarge:
            return await self._refuse(self._too_large(), scope, receive, send)
        if body is None:  # the client left while sending
            return
        replayed = False

        async def receive_replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, receive_replay, send)

    async def _read(self, receive) -> bytes | None:
        """The body's pieces joined once (adding each to a growing bytes would copy it all every time)."""
        pieces, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            piece = message.get("body", b"")
            size += len(piece)
            if size > self.max_bytes:
                raise _BodyTooLarge
            pieces.append(piece)
            if not message.get("more_body", False):
                return b"".join(pieces)

    def _too_large(self) -> APIError:
        return too_large(f"the request body is larger than this server's limit of {self.max_bytes:,} bytes",
                         code="body_too_large")

    @staticmethod
    async def _refuse(error: APIError, scope, receive, send) -> None:
        await error.response()(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class CancelOnDisconnect:
    """Cancels the app's work for a request whose client disconnects before the answer is complete: awaits
    in the service are cancelled, so a queued job leaves the queue and a running chat stops (the service
    sees to both), and the request is marked `CLIENT_GONE` for the metrics."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        inbox: asyncio.Queue = asyncio.Queue()  # what the client sent, in order, for the app to receive
        complete = False

        async def send_tracked(message) -> None:
            nonlocal complete
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        async def listen() -> None:
            while True:
                message = await receive()
                inbox.put_nowait(message)
                if message["type"] == "http.disconnect":
                    scope[CLIENT_GONE] = not complete
                    return

        app = asyncio.ensure_future(self.app(scope, inbox.get, send_tracked))
        listener = asyncio.ensure_future(listen())
        try:
            await asyncio.wait({app, listener}, return_when=asyncio.FIRST_COMPLETED)
            if scope.get(CLIENT_GONE):
                app.cancel()
            await asyncio.wait({app})
            if not app.cancelled():
                app.result()  # the app's own exception, if any, goes on to the error middleware
        finally:
            listener.cancel()
            app.cancel()


class RecordMetrics:
    """Counts answers by route and status and times them (to the response's start); a request whose client
    left before its answer ended counts as 499."""

    def __init__(self, app, service: Blip3oService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or ("/static" if scope["path"].startswith("/static/") else "other")
            answered = CLIENT_CLOSED_REQUEST if scope.get(CLIENT_GONE) else status[0]
            self.service.metrics.observe_request(scope["method"], label, answered, time.perf_counter() - start)
