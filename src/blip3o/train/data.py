"""Training data: Shapes shards in memory, indexed by global item number, or any data spec streamed.

`ShardDataset`: webdataset shards read once into memory, then indexed by global item number.

Global item i of a run is example perm_e[i mod N] with e = i div N and perm_e a permutation seeded
by (seed, e): every epoch is a fresh shuffle, and any item can be reached without replaying the
stream, which is what makes resume and multi-process splits exact. Images stay PNG-encoded in
memory (about 1 KB each for Shapes) and are decoded on access.

`StreamedItems`: any spec `blip3o.data` reads, each rank reading its own part of the stream; the global item
indices still key every random draw of an item, and the stream's state resumes it exactly.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from PIL import Image

from blip3o.data.stats import DataStats
from blip3o.data.stream import DataStream, StreamingDataset
from blip3o.distributed import World
from blip3o.shapes.data import ReadStats, iter_examples, shard_urls


class ShardDataset:
    """Every readable (image, json) example of the shards, in memory; `dataset[i]` is global item i."""

    def __init__(self, urls: str | os.PathLike | Iterable[str | os.PathLike], seed: int = 0) -> None:
        self.stats = ReadStats()
        # each entry may be a folder of shards, a brace pattern, a path or a URL
        entries = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
        urls = [u for entry in entries for u in shard_urls(entry)]
        self.images: list[bytes] = []
        self.meta: list[dict] = []
        for image, meta in iter_examples(urls, stats=self.stats):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            self.images.append(buf.getvalue())
            self.meta.append({k: v for k, v in meta.items() if not k.startswith("__")})
        if not self.images:
            raise ValueError(f"no readable examples in {urls!r} ({self.stats.bad_shards} bad shards, "
                             f"{self.stats.bad_examples} bad examples; first errors: {self.stats.errors[:3]})")
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self)))
        return self._perm[1]

    def __getitem__(self, i: int) -> dict:
        """Global item i -> {"image": PIL RGB, "json": metadata}."""
        j = int(self.permutation(i // len(self))[i % len(self)])
        return {"image": Image.open(io.BytesIO(self.images[j])).convert("RGB"), "json": self.meta[j]}

    def describe(self) -> str:
        s = self.stats
        return f"{len(self)} examples ({s.bad_examples} bad examples and {s.bad_shards} bad shards skipped)"


def default_workers(device: torch.device) -> int:
    """Loader workers per rank when TrainConfig.num_workers is None: decoding overlaps the GPU's step on CUDA;
    on a CPU the workers would take cores from the step itself."""
    return 2 if device.type == "cuda" else 0


class StreamedItems:
    """One rank's micro-batches of a data spec (`blip3o.data`: shards, JSONL, folders, LLaVA, mixtures), read
    through a resumable `DataStream`; `state_dict()` is where this rank stands, for the checkpoint."""

    def __init__(self, spec: list[str], *, seed: int, world: World, batch_size: int, num_workers: int) -> None:
        self.stream = DataStream(StreamingDataset(spec, seed=seed, world=world), batch_size=batch_size,
                                 num_workers=num_workers)
        self._batches: Iterator[list[dict]] | None = None

    @property
    def stats(self) -> DataStats:
        """Samples read and skipped (by reason) by this rank and its workers since the run began."""
        return self.stream.stats

    def next_batch(self) -> list[dict]:
        """The next `batch_size` samples of this rank (a stream without end: a step count ends training)."""
        if self._batches is None:
            self._batches = iter(self.stream)
        return next(self._batches)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; before the first batch only."""
        if self._batches is not None:
            raise RuntimeError("the data position is restored before the first batch is read")
        self.stream.load_state_dict(state)
