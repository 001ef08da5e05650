"""Training data: webdataset shards read once into memory, then indexed by global item number.

Global item i of a run is example perm_e[i mod N] with e = i div N and perm_e a permutation seeded
by (seed, e): every epoch is a fresh shuffle, and any item can be reached without replaying the
stream, which is what makes resume and multi-process splits exact. Images stay PNG-encoded in
memory (about 1 KB each for Shapes) and are decoded on access.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

import numpy as np
from PIL import Image

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
