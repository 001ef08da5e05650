"""Training data: Shapes shards in memory, indexed by global item number, or any data spec streamed.

`ShardDataset`: webdataset shards read once into memory, then indexed by global item number.

Global item i of a run is example perm_e[i mod N] with e = i div N and perm_e a permutation seeded
by (seed, e): every epoch is a fresh shuffle, and any item can be reached without replaying the
stream, which is what makes resume and multi-process splits exact. Images stay PNG-encoded in
memory (about 1 KB each for Shapes) and are decoded on access.

`EditShardDataset`: Shapes edit shards (`blip3o.shapes.edits`) the same way, items of the edit stage.
`Mixture`: several in-memory datasets interleaved by weight, item i drawn from the dataset its own stream picks.

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


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def open_png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def shard_list(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Each entry may be a folder of shards, a brace pattern, a path or a URL -> the shards' URLs."""
    entries = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    return [u for entry in entries for u in shard_urls(entry)]


class ShardDataset:
    """Every readable (image, json) example of the shards, in memory; `dataset[i]` is global item i."""

    def __init__(self, urls: str | os.PathLike | Iterable[str | os.PathLike], seed: int = 0) -> None:
        self.stats = ReadStats()
        urls = shard_list(urls)
        self.images: list[bytes] = []
        self.meta: list[dict] = []
        for image, meta in iter_examples(urls, stats=self.stats):
            self.images.append(png_bytes(image))
            self.meta.append({k: v for k, v in meta.items() if not k.startswith("__")})
        self.check_read(urls)
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def check_read(self, urls: list[str]) -> None:
        if not self.meta:
            raise ValueError(f"no readable examples in {urls!r} ({self.stats.bad_shards} bad shards, "
                             f"{self.stats.bad_examples} bad examples; first errors: {self.stats.errors[:3]})")

    def __len__(self) -> int:
        return len(self.meta)

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self)))
        return self._perm[1]

    def __getitem__(self, i: int) -> dict:
        """Global item i -> {"image": PIL RGB, "json": metadata}."""
        return {"image": open_png(self.images[self.example(i)]), "json": self.meta[self.example(i)]}

    def example(self, i: int) -> int:
        """The example that global item i is: of epoch i div N, its place in that epoch's permutation."""
        return int(self.permutation(i // len(self))[i % len(self)])

    def describe(self) -> str:
        s = self.stats
        return f"{len(self)} examples ({s.bad_examples} bad examples and {s.bad_shards} bad shards skipped)"


class EditShardDataset(ShardDataset):
    """Every readable edit of Shapes edit shards (`blip3o.shapes.edits.write_edit_shards`), in memory;
    `dataset[i]` is global item i as the edit stage reads it: {"sources": [PIL], "instruction", "image" (the
    target), "json"}."""

    def __init__(self, urls: str | os.PathLike | Iterable[str | os.PathLike], seed: int = 0) -> None:
        from blip3o.shapes.edits import iter_edits

        self.stats = ReadStats()
        urls = shard_list(urls)
        self.sources: list[bytes] = []
        self.images: list[bytes] = []
        self.instructions: list[str] = []
        self.meta: list[dict] = []
        for triplet in iter_edits(urls, stats=self.stats):
            self.sources.append(png_bytes(triplet.source))
            self.images.append(png_bytes(triplet.target))
            self.instructions.append(triplet.instruction)
            self.meta.append({k: v for k, v in triplet.meta.items() if not k.startswith("__")})
        self.check_read(urls)
        self.seed = seed
        self._perm = None

    def __getitem__(self, i: int) -> dict:
        j = self.example(i)
        return {"sources": [open_png(self.sources[j])], "instruction": self.instructions[j],
                "image": open_png(self.images[j]), "json": self.meta[j]}


class Mixture:
    """In-memory datasets interleaved by weight: global item i comes from dataset k with probability
    weights[k] / sum (drawn from the item's own stream, keyed by (seed, i)), and is that dataset's item i."""

    def __init__(self, parts: list[tuple[object, float]], seed: int = 0) -> None:
        if not parts or any(w < 0 for _, w in parts) or sum(w for _, w in parts) <= 0:
            raise ValueError(f"a mixture needs datasets with weights >= 0 summing above 0, got "
                             f"{[w for _, w in parts]}")
        self.parts = [d for d, _ in parts]
        total = sum(w for _, w in parts)
        self.bounds = np.cumsum([w / total for _, w in parts])
        self.seed = seed

    def __len__(self) -> int:
        return sum(len(d) for d in self.parts)

    def part_of(self, i: int) -> int:
        u = np.random.default_rng([self.seed, i, 7]).random()
        return min(int(np.searchsorted(self.bounds, u, side="right")), len(self.parts) - 1)

    def __getitem__(self, i: int) -> dict:
        return self.parts[self.part_of(i)][i]

    def describe(self) -> str:
        return " + ".join(d.describe() for d in self.parts)


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
