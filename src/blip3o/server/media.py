"""Images in and out of the server: data URIs, uploaded files and allowed local files in, base64 PNGs out.

A request's images arrive as bytes (`image_bytes`, `read_upload`: their size in bytes checked, nothing
decoded) and are sized from their headers (`decoded_bytes`) for the memory budget before anything
expands. `open_image` decodes them through `blip3o.images.admit_image`, the one door for untrusted
images: format, pixel count read from the header before decoding (so a decompression bomb never
expands), PIL's own limits on text and ICC chunks, then the library's checks (mode, smallest side).
Its refusals map to OpenAI-shaped errors: too large -> 400 `image_too_large`, an unsupported type ->
415, anything undecodable -> 400 `invalid_image`.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from starlette.datastructures import UploadFile

from blip3o.images import ImageRejected, admit_image
from blip3o.server.config import ServerConfig
from blip3o.server.errors import APIError, bad_request

BYTES_PER_PIXEL = 4  # PIL holds RGB and RGBA images in 4 bytes a pixel, and the model reads every image as RGB


@dataclass(frozen=True)
class EncodedImage:
    """A request's image as the request holds it until the worker decodes it (`open_image`)."""

    data: bytes
    param: str  # where the request carried it, for error messages: messages[0].content[1].image_url, image[1]


def image_bytes(url: str, config: ServerConfig, param: str) -> bytes:
    """An `image_url` (data URI, `file://` URL or absolute path under an allowed folder) -> its encoded bytes."""
    if url.startswith("data:"):
        return _from_data_uri(url, config, param)
    if url.startswith(("http://", "https://")):
        raise bad_request("this server fetches nothing from the network; send the image inline as a data URI "
                          "(data:image/png;base64,...)", param, code="unsupported_url")
    return _from_file(url.removeprefix("file://"), config, param)


async def read_upload(upload: UploadFile, config: ServerConfig, param: str) -> EncodedImage:
    """A multipart form's file -> its bytes, read no further than one byte past the size limit."""
    if upload.size is not None:  # the parser counted it
        _check_bytes(upload.size, config, param)
    data = await upload.read(config.max_image_bytes + 1)
    _check_bytes(len(data), config, param)
    return EncodedImage(data, param)


def decoded_bytes(data: bytes, config: ServerConfig) -> int:
    """The memory the image in `data` takes decoded, from its header alone: width * height * 4. 0 when the
    header cannot be read or declares more pixels than `config` allows: `open_image` refuses those before
    decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                pixels = image.width * image.height
    except Exception:  # noqa: BLE001  (untrusted bytes: open_image says what is wrong with them)
        return 0
    return pixels * BYTES_PER_PIXEL if pixels <= config.max_image_pixels else 0


def open_image(data: bytes, config: ServerConfig, param: str) -> Image.Image:
    """Encoded bytes -> a decoded, checked PIL image in its own mode (the processor converts it to RGB as
    transformers does); an APIError naming `param` if it is refused."""
    try:
        return admit_image(data, name=param, max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels,
                           formats=config.image_formats)
    except ImageRejected as e:
        if e.reason == "too_large":
            raise bad_request(str(e), param, code="image_too_large") from e
        if e.reason == "unsupported":
            raise APIError(415, str(e), param=param, code="unsupported_image_type") from e
        raise bad_request(str(e), param, code="invalid_image") from e


def encode_png(image: Image.Image) -> str:
    """PIL image -> base64 PNG text."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _from_data_uri(url: str, config: ServerConfig, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    mime = header[len("data:"):].split(";")[0].lower()
    if not comma or not header.endswith(";base64"):
        raise bad_request(f"{param} must be a base64 data URI: data:image/png;base64,...", param,
                          code="invalid_image_url")
    if mime and not mime.startswith("image/"):
        raise _unsupported(f"{param} has media type {mime!r}", config, param)
    _check_bytes(len(payload) * 3 // 4, config, param)  # before decoding: never hold a huge decode
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{param} is not valid base64: {e}", param, code="invalid_image_url") from e


def _from_file(name: str, config: ServerConfig, param: str) -> bytes:
    """The bytes of a local file under an allowed folder. Messages never repeat a path: the server's
    folders are its own business, and `param` already says which image is meant."""
    if not config.allow_dirs:
        raise APIError(403, f"{param} names a local file, and this server reads none; send a data URI, or start "
                            "the server with --allow-dir DIR", param=param, code="local_files_disabled")
    path = Path(name)
    if not path.is_absolute():
        raise bad_request(f"{param}: a local image path must be absolute", param, code="invalid_image_url")
    try:
        path = path.resolve()  # symlinks and '..' resolved before the check, so neither escapes
        allowed = any(path.is_relative_to(folder) for folder in config.allow_dirs)
        found = allowed and path.is_file()  # a regular file: a FIFO or a device would block the reader
    except (OSError, ValueError, RuntimeError) as e:  # a name too long, a NUL byte or lone surrogate, a symlink loop
        raise bad_request(f"{param} is not a path this server can open ({type(e).__name__})", param,
                          code="invalid_image_url") from e
    if not allowed:
        raise APIError(403, f"{param} names a file outside the folders this server may read (--allow-dir)",
                       param=param, code="path_not_allowed")
    if not found:
        raise bad_request(f"{param}: no such file", param, code="file_not_found")
    try:
        with path.open("rb") as f:
            _check_bytes(os.fstat(f.fileno()).st_size, config, param)
            data = f.read(config.max_image_bytes + 1)  # a file that grew since it was looked at reads no further
    except OSError as e:
        raise bad_request(f"{param} could not be read ({e.strerror or type(e).__name__})", param,
                          code="invalid_image") from e
    _check_bytes(len(data), config, param)
    return data


def _check_bytes(size: int, config: ServerConfig, param: str) -> None:
    if size > config.max_image_bytes:
        raise bad_request(f"{param} is {size:,} bytes; the limit is {config.max_image_bytes:,}", param,
                          code="image_too_large")


def _unsupported(what: str, config: ServerConfig, param: str) -> APIError:
    return APIError(415, f"{what}; supported image types: {', '.join(config.image_formats)}", param=param,
                    code="unsupported_image_type")
