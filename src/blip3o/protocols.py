"""Understanding protocols: how a benchmark's images and questions reach the model.

    stock    the model's own processor (a folder's preprocessor_config.json, else the config's pixel bounds),
             the images as given, the model's dtype and generation config, any batch size
    blip3o   the inputs BLIP3-o's paper scores were produced with, by the original's lmms-eval model
             (eval/lmms-eval/lmms_eval/models/blip3o.py): each image converted to RGB and re-encoded as a
             JPEG at PIL's default quality, pixel bounds 200,704..1,605,632 (256 and 2,048 merged 28x28
             patches), float16 weights on a GPU, replies stopped at <|im_end|> only, one question a call

    protocol = PROTOCOLS["blip3o"]
    answers = protocol.answer(model, images, questions, max_new_tokens=128)
    (out / "answers.protocol.json").write_text(json.dumps(protocol.settings(model)))

The two differ from the first image token on: a 100x60 image is 273 image tokens under `blip3o` and 8
under Qwen2.5-VL's class defaults, and the JPEG round trip moves pixels by a few levels.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from blip3o.images import check_images


@dataclass(frozen=True)
class UnderstandingProtocol:
    name: str
    min_pixels: int | None = None  # None: the model's processor's bounds
    max_pixels: int | None = None
    jpeg_round_trip: bool = False  # RGB, then a JPEG at PIL's default quality, decoded again
    gpu_dtype: str | None = None  # the weights' dtype on a GPU (None: as loaded)
    stop_tokens: tuple[str, ...] | None = None  # None: the model's (its generation config's eos, else its own)
    batch_size: int | None = None  # questions a model call; None: the caller's

    def prepare(self, image: Image.Image) -> Image.Image:
        """The image as the protocol hands it to the processor."""
        if not self.jpeg_round_trip:
            return image
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG")  # no quality named: PIL's default (75), as the original
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    def options(self) -> dict:
        """`Blip3o.answer`/`chat` options of the protocol."""
        options = {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "stop_tokens": self.stop_tokens}
        return {k: v for k, v in options.items() if v is not None}

    def inputs(self, model, image: Image.Image, question: str):
        """What the model reads for one question about one image under the protocol (`Backbone.inputs`)."""
        conversation = [{"role": "user", "content": [{"type": "image", "image": self.prepare(image)},
                                                     {"type": "text", "text": question}]}]
        bounds = {k: v for k, v in self.options().items() if k != "stop_tokens"}
        return model.backbone.inputs([conversation], **bounds)

    def answer(self, model, images: Sequence[Image.Image], questions: Sequence[str], *, batch_size: int = 8,
               **options) -> list[str]:
        """`model.answer` under the protocol: one answer a question, as decoded. `batch_size` is the caller's
        where the protocol names none."""
        images = [self.prepare(im) for im in check_images(images)]
        size = self.batch_size or batch_size
        answers = []
        for start in range(0, len(images), size):
            answers += model.answer(images[start:start + size], list(questions[start:start + size]),
                                    **self.options(), **options)
        return answers

    def settings(self, model) -> dict:
        """What to write beside a result: the protocol's settings and what they came to for `model`."""
        low, high = model.backbone.pixel_bounds
        return {**dataclasses.asdict(self), "pixel_bounds": [self.min_pixels or low, self.max_pixels or high],
                "dtype": str(model.backbone.model.dtype).removeprefix("torch."), "device": str(model.device),
                "stop_ids": [model.backbone.token_id(t) for t in self.stop_tokens] if self.stop_tokens
                else list(model.backbone.stop_ids)}


PROTOCOLS: dict[str, UnderstandingProtocol] = {
    "stock": UnderstandingProtocol("stock"),
    "blip3o": UnderstandingProtocol("blip3o", min_pixels=256 * 28 * 28, max_pixels=2048 * 28 * 28,
                                    jpeg_round_trip=True, gpu_dtype="float16", stop_tokens=("<|im_end|>",),
                                    batch_size=1),
}
