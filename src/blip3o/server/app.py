"""The HTTP face of `Blip3oService`: routes parse the request and delegate; nothing here runs a model."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from blip3o.server.errors import APIError, too_large
from blip3o.server.schemas import ChatCompletionRequest, ImageGenerationRequest
from blip3o.server.service import Blip3oService

STATIC = Path(__file__).parent / "static"


def create_app(service: Blip3oService) -> FastAPI:
    """An ASGI app serving `service`: the OpenAI-compatible API, /health, /metrics and the web page."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        service.stop()

    app = FastAPI(title="blip3o", summary="BLIP3-o: generate and understand images", lifespan=lifespan)
    app.state.service = service
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=service.config.max_body_bytes)
    app.add_middleware(RecordMetrics, service=service)  # outermost: it sees every answer, 413s included

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return service.models()

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        return service.model_card(model_id)

    @app.post("/v1/images/generations")
    async def images(body: ImageGenerationRequest) -> dict:
        return await service.generate_images(body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        if body.stream:
            return StreamingResponse(await service.chat_stream(body), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await service.chat_completion(body)

    return app


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


class BodyLimit:
    """413 for request bodies over `max_bytes`, before anything parses them (chunked bodies too)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(scope, receive, send)
        if length is None:  # no declared length: read up to the limit, then replay what was read
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.max_bytes:
                    return await self._reject(scope, receive, send)
            replayed = False

            async def receive_replay():
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            return await self.app(scope, receive_replay, send)
        return await self.app(scope, receive, send)

    async def _reject(self, scope, receive, send) -> None:
        error = too_large(f"the request body is larger than this server's limit of {self.max_bytes:,} bytes",
                          code="body_too_large")
        await error.response()(scope, receive, send)


class RecordMetrics:
    """Counts answers by route and status and times them (to the response's start)."""

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
            self.service.metrics.observe_request(scope["method"], label, status[0], time.perf_counter() - start)
