"""The CLIP-target cache: every good sample's 64 encoder tokens, computed once, for the generation stage.

The generation stage trains the DiT to reach the frozen encoder's tokens of each image; computing them is most
of a step's cost for a large encoder (EVA-CLIP-E: 4.35 B parameters). `build_cache` computes them once, in the
encoder's own preprocessing (`encode_images`: any size, any mode), and writes

    DIR/manifest.json                        format, the encoder's identity (its config and a fingerprint of its
                                             weights), dtype, the spec, the shards and the count of samples
    DIR/targets-SSS-PPPPP.safetensors        source S, piece P: "targets" (n, 64, C) in the cache's dtype; the
                                             metadata "samples" a JSON list of {"key", "text", "json"}, row by row

One shard a piece of a source (a tar shard, a run of JSONL lines or of a folder's images): under torchrun rank r
computes pieces r, r + N, ...; each shard is written atomically, so a rerun skips the shards on disk and computes
only the missing ones. `TargetsReader` reads a cache as a source of the data layer (kind "targets"), one sample
a row: {"targets": (64, C), "text", "json", "where", "encoder"}; the generation stage trains on such samples
without running the encoder or the decoder, after checking `encoder` is its own encoder's identity.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from blip3o.files import atomic_file, write_text

from .readers import Reader, Record, reader_for
from .spec import TARGETS_MANIFEST, Source, SpecError, parse_spec
from .stats import DataStats, Problem, Skip

FORMAT = "blip3o-clip-targets"
VERSION = 1
MANIFEST = TARGETS_MANIFEST
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class CacheMismatch(ValueError):
    """A cache that is not for this model's encoder, dtype or data: the message says which and what to do."""


def shard_name(source: int, piece: int) -> str:
    return f"targets-{source:03d}-{piece:05d}.safetensors"


# ------------------------------------------------------------------ the encoder's identity


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state: every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoder_identity(model) -> dict:
    """{"config", "fingerprint", "id"} of a Blip3o's CLIP encoder: `id` hashes both, what a cached sample
    carries."""
    config = json.loads(json.dumps(dataclasses.asdict(model.config.clip_encoder)))
    fingerprint = weights_fingerprint(model.clip_encoder)
    key = hashlib.sha256(json.dumps({"config": config, "fingerprint": fingerprint}, sort_keys=True).encode())
    return {"config": config, "fingerprint": fingerprint, "id": key.hexdigest()}


def check_identity(identity: dict, cache: dict, where: str) -> None:
    """Refuse (CacheMismatch) a cache made by another encoder than `identity` describes."""
    if cache["id"] == identity["id"]:
        return
    theirs, mine = cache.get("config", {}), identity["config"]
    changed = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    diffs = "; ".join(f"{k}: cache {theirs.get(k)!r} vs model {mine.get(k)!r}" for k in changed)
    what = (f"its encoder config differs ({diffs})" if changed else "its encoder weights differ (fingerprint "
            f"{cache.get('fingerprint', '?')[:12]} vs the model's {identity['fingerprint'][:12]})")
    raise CacheMismatch(f"{where} holds the CLIP targets of another encoder: {what}. Train with the model the "
                        "cache was made with, or rebuild the cache with `blip3o data clip-targets --model ...`")


# ------------------------------------------------------------------ writing


@dataclass
class CacheReport:
    """What one `build_cache` call did on this rank."""

    written: list[str]  # shard names computed now
    skipped: list[str]  # shard names already on disk
    stats: DataStats  # the samples read: good ones, bad ones by reason

    def line(self) -> str:
        return (f"{len(self.written)} shards computed, {len(self.skipped)} already done; "
                f"{self.stats.good} samples cached, {self.stats.bad_total} bad ones skipped")


def build_cache(model, spec, out: str | os.PathLike, *, batch_size: int = 64, dtype: str = "bf16", world=None,
                image_root: str | os.PathLike | None = None) -> CacheReport:
    """Compute every good image-text sample's encoder tokens of `spec` into the cache folder `out` (module
    docstring), this rank's pieces only; rank 0 writes the manifest once every rank is done. Refuses a model
    with a random encoder, a source that is not image-text, and a folder that holds a cache for another
    encoder, dtype or spec."""
    from blip3o.distributed import World, barrier

    world = world or World()
    model.config.require_trained_clip_encoder("cache its CLIP targets")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    sources = parse_spec(spec, image_root=image_root)
    for source in sources:
        if source.kind in ("llava", "edits", "targets"):
            raise SpecError(f"{source.name}: a CLIP-target cache is made from image-text sources (shards, JSONL "
                            f"captions, folders), not {source.kind}")
    out = Path(out)
    head = {"format": FORMAT, "version": VERSION, "encoder": encoder_identity(model), "dtype": dtype,
            "spec": [s.name for s in sources]}
    if world.is_main:
        claim_folder(out, head)
    barrier(world)
    pieces = [(s, p, piece) for s, source in enumerate(sources) for p, piece in enumerate(reader_for(source).pieces())]
    report = CacheReport([], [], DataStats())
    for s, p, piece in pieces[world.rank::world.size]:
        name = shard_name(s, p)
        if (out / name).is_file():
            report.skipped.append(name)
            continue
        write_shard(out / name, model, reader_for(sources[s]), piece, batch_size, DTYPES[dtype], report.stats)
        report.written.append(name)
    barrier(world)
    if world.is_main:
        finish_manifest(out, head, [shard_name(s, p) for s, p, _ in pieces])
    return report


def claim_folder(out: Path, head: dict) -> None:
    """Make `out` a cache folder for `head` (an unfinished manifest); a folder of another cache is refused."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    if path.is_file():
        old = read_manifest(out, complete=False)
        check_identity(head["encoder"], old["encoder"], str(out))
        for key in ("dtype", "spec"):
            if old.get(key) != head[key]:
                raise CacheMismatch(f"{out} holds a cache with {key} {old.get(key)!r}, not {head[key]!r}: use "
                                    "another --out, or the same settings to finish that cache")
    elif any(out.iterdir()):
        raise CacheMismatch(f"{out} is not empty and holds no {MANIFEST}: give an empty or new folder as --out")
    write_text(path, json.dumps({**head, "complete": False}, indent=2))


def write_shard(path: Path, model, reader: Reader, piece, batch_size: int, dtype: torch.dtype,
                stats: DataStats) -> None:
    """One piece's good samples: their tokens, computed `batch_size` at a time, and their texts, atomically."""
    samples, tokens, done = [], [], 0

    def encode() -> None:
        nonlocal done
        images = [sample.pop("image") for sample in samples[done:]]
        done = len(samples)
        if images:
            tokens.append(model.clip_encoder.encode_images(images).to("cpu", dtype))  # (b, 64, C)

    for sample in good_samples(reader, piece, stats):
        samples.append(sample)
        if len(samples) % batch_size == 0:
            encode()
    encode()
    width = model.clip_encoder.width
    targets = torch.cat(tokens) if tokens else torch.zeros(0, model.clip_encoder.num_tokens, width, dtype=dtype)
    with atomic_file(path) as tmp:
        save_file({"targets": targets.contiguous()}, str(tmp), metadata={"samples": json.dumps(samples)})


def good_samples(reader: Reader, piece, stats: DataStats) -> Iterator[dict]:
    """{"image", "key", "text", "json"} of the piece's samples that load; bad ones go to `stats`."""
    for record in reader.records(piece, 0, stats.add):
        try:
            sample = reader.load(record)
        except Skip as e:
            stats.add(Problem(record.file, record.at, e.reason, str(e)))
            continue
        stats.good += 1
        yield {"image": sample["image"], "key": record.where, "text": sample["text"], "json": sample["json"]}


def finish_manifest(out: Path, head: dict, names: list[str]) -> None:
    """The complete manifest: every shard with its count, once all are on disk."""
    missing = [n for n in names if not (out / n).is_file()]
    if missing:
        raise RuntimeError(f"{out}: shards {missing[:3]} are missing after every rank finished; rerun the command")
    shards = [{"name": n, "count": shard_rows(out / n)} for n in names]
    manifest = {**head, "complete": True, "count": sum(s["count"] for s in shards), "shards": shards}
    write_text(out / MANIFEST, json.dumps(manifest, indent=2))


def shard_rows(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return f.get_slice("targets").get_shape()[0]


# ------------------------------------------------------------------ reading


def is_cache(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding a CLIP-target cache's manifest."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(folder: str | os.PathLike, *, complete: bool = True) -> dict:
    """The manifest of a cache folder, checked: its format, and (`complete`) that every shard was written."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SpecError(f"{path}: not a readable CLIP-target manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise SpecError(f"{path}: not a {FORMAT} manifest of version {VERSION}")
    if complete and not manifest.get("complete"):
        raise SpecError(f"{folder}: the CLIP-target cache is unfinished; rerun `blip3o data clip-targets` with the "
                        "same flags to complete it")
    return manifest


def shard_samples(path: str) -> tuple[torch.Tensor, list[dict]]:
    """A shard's targets (n, 64, C) and its samples' {"key", "text", "json"}."""
    with safe_open(path, "pt") as f:
        return f.get_tensor("targets"), json.loads(f.metadata()["samples"])


def cached_sample(targets: torch.Tensor, sample: dict, encoder: str, where: str) -> dict:
    """A training sample of a cache row; `json` gains the text where it holds no caption of its own."""
    meta = sample["json"] if "text" in sample["json"] else {"text": sample["text"], **sample["json"]}
    return {"targets": targets, "text": sample["text"], "json": meta, "where": where, "key": sample["key"],
            "encoder": encoder}


class TargetsReader(Reader):
    """A CLIP-target cache as a source: one piece a shard, one record a row."""

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self.manifest = read_manifest(source.paths[0])

    def pieces(self) -> list[str]:
        return [str(Path(self.source.paths[0]) / s["name"]) for s in self.manifest["shards"]]

    def records(self, piece: str, skip: int, report: Callable[[Problem], None]) -> Iterator[Record]:
        targets, samples = shard_samples(piece)
        for k in range(skip, len(samples)):
            yield Record(piece, f"row {k}", (targets[k].clone(), samples[k]))  # not a view of the whole shard

    def load(self, record: Record) -> dict:
        targets, sample = record.data
        return cached_sample(targets, sample, self.manifest["encoder"]["id"], record.where)


class TargetsDataset:
    """A cache as the trainer's indexable data: `dataset[i]` is global item i, epoch e = i div N shuffled by
    (seed, e) as `blip3o.train.data.ShardDataset` shuffles; rows are read from the shards on access."""

    def __init__(self, folder: str | os.PathLike, seed: int = 0) -> None:
        self.reader = TargetsReader(Source(str(folder), "targets", (str(folder),)))
        self.rows = [(piece, k) for piece, s in zip(self.reader.pieces(), self.reader.manifest["shards"], strict=True)
                     for k in range(s["count"])]
        if not self.rows:
            raise ValueError(f"{folder}: the CLIP-target cache holds no sample")
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None  # the current epoch's order
        self._open: tuple[str, tuple[torch.Tensor, list[dict]]] | None = None  # the shard read last

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        epoch = i // len(self)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self)))
        piece, k = self.rows[int(self._perm[1][i % len(self)])]
        if self._open is None or self._open[0] != piece:
            self._open = (piece, shard_samples(piece))
        targets, samples = self._open[1]
        return cached_sample(targets[k].clone(), samples[k], self.reader.manifest["encoder"]["id"], f"{piece}, row {k}")


# ------------------------------------------------------------------ training from a cache


def cached_items(items: list[dict]) -> bool:
    """Whether a batch's items carry cached targets (all of them) or images (none); a mixture is refused."""
    flags = {"targets" in item for item in items}
    if len(flags) > 1:
        raise ValueError("a batch mixes samples of a CLIP-target cache with images: train from one or the other")
    return flags == {True}


def check_items_encoder(items: list[dict], identity: dict) -> None:
    """Refuse items whose cache was made by another encoder than `identity` describes."""
    for item in items:
        if item["encoder"] != identity["id"]:
            manifest = read_manifest(Path(item["where"].split(", ")[0]).parent)
            check_identity(identity, manifest["encoder"], item["where"])


def release_towers(model) -> None:
    """Move the CLIP encoder and the decoder to the CPU: training from cached targets never runs them, and the
    device memory they held is handed back."""
    device = model.queries.device
    model.clip_encoder.to("cpu")
    model.decoder.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
