"""Images in and out of the server: data URIs and allowed local files in, base64 PNGs out.

Every check runs before the image reaches the model queue: size in bytes, type, pixel count
(read from the header, before decoding, so a decompression bomb never expands), then the
library's own checks (mode, smallest side).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from blip3o.images import check_images
from blip3o.server.config import ServerConfig
from blip3o.server.errors import APIError, bad_request


def load_image(url: str, config: ServerConfig, param: str) -> Image.Image:
    """An `image_url` (data URI, `file://` URL or absolute path under an allowed folder) -> a checked PIL image
    (its own mode: the processor converts it to RGB as transformers does)."""
    if url.startswith("data:"):
        data = _from_data_uri(url, config, param)
    elif url.startswith(("http://", "https://")):
        raise bad_request("this server fetches nothing from the network; send the image inline as a data URI "
                          "(data:image/png;base64,...)", param, code="unsupported_url")
    else:
        data = _from_file(url.removeprefix("file://"), config, param)
    return decode_image(data, config, param)


def decode_image(data: bytes, config: ServerConfig, param: str) -> Image.Image:
    _check_bytes(len(data), config, param)
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as e:
        raise _unsupported(f"{param} is not an image this server reads", config, param) from e
    if image.format not in config.image_formats:
        raise _unsupported(f"{param} is a {image.format} image", config, param)
    w, h = image.size
    if w * h > config.max_image_pixels:
        raise bad_request(f"{param} is {w}x{h} = {w * h:,} pixels; the limit is {config.max_image_pixels:,}",
                          param, code="image_too_large")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise bad_request(f"{param} could not be decoded (truncated or corrupt): {e}", param,
                          code="invalid_image") from e
    try:
        (checked,) = check_images([image], name=param)
    except ValueError as e:
        raise bad_request(str(e), param, code="invalid_image") from e
    return checked


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
    if not config.allow_dirs:
        raise APIError(403, f"{param} names a local file, and this server reads none; send a data URI, or start "
                            "the server with --allow-dir DIR", param=param, code="local_files_disabled")
    path = Path(name)
    if not path.is_absolute():
        raise bad_request(f"{param}: a local image path must be absolute, got {name!r}", param,
                          code="invalid_image_url")
    path = path.resolve()  # symlinks and '..' resolved before the check, so neither escapes
    if not any(path.is_relative_to(folder) for folder in config.allow_dirs):
        raise APIError(403, f"{param}: {name} is outside the folders this server may read "
                            f"({', '.join(map(str, config.allow_dirs))})", param=param, code="path_not_allowed")
    if not path.is_file():
        raise bad_request(f"{param}: no file {name}", param, code="file_not_found")
    _check_bytes(path.stat().st_size, config, param)
    return path.read_bytes()


def _check_bytes(size: int, config: ServerConfig, param: str) -> None:
    if size > config.max_image_bytes:
        raise bad_request(f"{param} is {size:,} bytes; the limit is {config.max_image_bytes:,}", param,
                          code="image_too_large")


def _unsupported(what: str, config: ServerConfig, param: str) -> APIError:
    return APIError(415, f"{what}; supported image types: {', '.join(config.image_formats)}", param=param,
                    code="unsupported_image_type")
