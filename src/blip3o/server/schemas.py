"""Request bodies, in OpenAI's schema (plus a few named extensions). Unknown fields are ignored,
as OpenAI's own clients send some (`user`, `quality`, ...) that mean nothing here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageGenerationRequest(_Body):
    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None  # "WxH", width x height such as "1536x1024", or "auto" (the decoder's default square)
    response_format: Literal["b64_json", "url"] | None = None  # url: a data: URL (nothing is stored)
    seed: int | None = None  # extension: reproducible images (see the service's seed semantics)
    steps: int | None = None  # extension: DiT sampling steps
    guidance: float | None = None  # extension: DiT classifier-free guidance scale


class ImageEditRequest(ImageGenerationRequest):
    """The text fields of an edit's multipart form (`/v1/images/edits`); its source images come as files."""


class ImageURL(_Body):
    url: str  # a data URI, a file:// URL or an absolute path (OpenAI's `detail` is ignored: one resolution)


class ContentPart(_Body):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatImageOptions(_Body):
    """Extension: how a chat request's image reply is made (the `image` field, beside `modalities`)."""

    size: str | None = None  # as ImageGenerationRequest.size
    steps: int | None = None
    guidance: float | None = None


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # newer clients' name for max_tokens
    temperature: float | None = None  # 0: greedy; omitted: the model's generation config (greedy without one)
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    # ["text"] (or none): a text reply; ["image"] or ["text", "image"]: an image reply (see app.py)
    modalities: list[Literal["text", "image"]] | None = Field(default=None, min_length=1)
    image: ChatImageOptions | None = None  # extension: the image reply's size, steps and guidance
