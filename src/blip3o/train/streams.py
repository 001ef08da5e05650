"""Every random draw of training, keyed by (seed, item index, stream).

Global item i of a run is `dataset[i]`; each thing drawn for it comes from a generator of its own, seeded
by (run seed, i, the stream's name). Draws do not depend on which process holds the item, on what was
drawn before, or on which other options are on: a new option draws from a new stream and every other
draw stays as it was. A resumed run, and a run split over N processes, draw exactly what one
uninterrupted process draws.

The streams (the one list; `item_generator` refuses a name not in it):
"""

from __future__ import annotations

import hashlib
import random

import torch

STREAMS: dict[str, str] = {
    # per item
    "caption": "clip: which of the item's captions the text tower reads",
    "turns": "understanding: the order of the item's question turns, hence which `max_turns` are asked",
    "plan": "understanding, Shapes: the `plan` turns (blip3o.shapes.training)",
    "reading": "understanding, Shapes: the `reading` turns (blip3o.shapes.training)",
    "locate": "understanding, Shapes: the `locate` turns (blip3o.shapes.training)",
    "restate": "understanding, Shapes: the `restate` turns (blip3o.shapes.training)",
    "text": "generation and the decoder's DiT redraw: which complete text conditions the item",
    "noise": "generation: the path's noise x_1 (N, C)",
    "time": "generation: the path's time t",
    "condition_drop": "generation: whether the item's condition is dropped (classifier-free guidance)",
    "self_condition": "generation: whether the DiT reads its own first-pass estimate",
    "token_noise": "decoder: the standard deviation of the item's token noise, then the noise (N, C)",
    "dit_tokens": "decoder: whether the item is redrawn through the DiT, then the redraw's noise (N, C)",
    # per batch: keyed by the first item of the process's share of the batch
    "decoder_loss": "decoder: the decoder's own loss draws (its times, noise and condition drop) for the batch",
    "dit_from": "decoder: the DiT redraw's start time, one for the batch",
}


def stream_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit seed for (seed, index, stream): a hash, so neighbouring items and streams are unrelated."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; the streams: {', '.join(STREAMS)}")
    digest = hashlib.blake2b(f"{seed}:{index}:{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def item_generator(seed: int, index: int, stream: str) -> torch.Generator:
    """The CPU torch.Generator of one stream of global item `index` of a run seeded `seed`."""
    return torch.Generator().manual_seed(stream_seed(seed, index, stream))


def item_random(seed: int, index: int, stream: str) -> random.Random:
    """The Python random.Random of one stream (choices, shuffles) of global item `index`."""
    return random.Random(stream_seed(seed, index, stream))
