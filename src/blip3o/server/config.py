"""Everything an operator may tune about the server: limits, batching, timeouts. One dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MIB = 1024 * 1024


@dataclass
class ServerConfig:
    # --- request limits (each breach is a 4xx with an OpenAI-shaped error naming the limit) ---
    max_prompt_chars: int = 1000  # an image prompt's length in characters (OpenAI's dall-e-2 limit)
    max_n: int = 8  # images per generation request
    max_pixels: int = 2048 * 2048  # largest width * height an image request may ask for (the decoder may allow fewer)
    max_steps: int = 200  # DiT sampling steps a request may ask for
    max_messages: int = 64  # messages in one chat request
    max_chat_chars: int = 32_000  # all text of one chat request, in characters
    max_images_per_request: int = 8  # images in one chat request
    max_image_bytes: int = 10 * MIB  # one image, encoded (after base64 decoding)
    max_image_pixels: int = 4096 * 4096  # one image's width * height: decompression bombs stop here
    image_formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # PIL format names accepted
    max_body_bytes: int = 48 * MIB  # one HTTP request body (base64 images inflate by 4/3)
    # bytes that queued and running requests may hold together: each image's encoded bytes plus its decoded
    # size (width * height * 4, PIL's RGB), in and out; past it 429, and a request larger than all of it 413
    memory_budget_bytes: int = 2048 * MIB
    max_tokens: int = 2048  # the largest `max_tokens` a chat request may ask for
    default_max_tokens: int = 256  # reply length when a chat request names none
    # the pixel count each chat image is resized into; None: the model's processor's (`Backbone.pixel_bounds`)
    chat_min_pixels: int | None = None
    chat_max_pixels: int | None = None
    # Local image files (`file://` URLs or absolute paths) are read only under these folders.
    allow_dirs: list[Path] = field(default_factory=list)
    # --- scheduling ---
    max_batch_images: int = 16  # images in one `model.generate` call (micro-batch)
    batch_window_ms: float = 10.0  # how long the worker waits for more compatible requests
    max_queue: int = 64  # requests waiting for the model; past this, 429 with Retry-After
    retry_after_s: int = 1  # the Retry-After a 429 suggests
    request_timeout_s: float = 120.0  # a request not answered by then gets 504
    # --- connections (uvicorn's own options, and the body deadline) ---
    body_timeout_s: float = 30.0  # a request body not whole by then gets 408 (a client trickling bytes)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 512  # open connections and running requests; past it uvicorn answers 503
    max_header_bytes: int = 16 * 1024  # buffered of a request line and headers not yet complete (h11's limit)
    docs: bool = False  # serve /docs, /redoc and /openapi.json (FastAPI's API pages)

    def __post_init__(self) -> None:
        self.allow_dirs = [Path(d).expanduser().resolve() for d in self.allow_dirs]
        if self.max_batch_images < self.max_n:
            raise ValueError(f"max_batch_images ({self.max_batch_images}) must be >= max_n ({self.max_n})")
        bounds = [v for v in (self.chat_min_pixels, self.chat_max_pixels) if v is not None]
        if any(v <= 0 for v in bounds) or (len(bounds) == 2 and bounds[0] > bounds[1]):
            raise ValueError(f"chat_min_pixels ({self.chat_min_pixels}) and chat_max_pixels ({self.chat_max_pixels}) "
                             "must be positive, chat_min_pixels at most chat_max_pixels")
        if self.max_queue < 1 or self.request_timeout_s <= 0 or self.batch_window_ms < 0:
            raise ValueError("max_queue must be >= 1, request_timeout_s > 0 and batch_window_ms >= 0")
        positive = ("memory_budget_bytes", "body_timeout_s", "keep_alive_s", "max_connections", "max_header_bytes")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
