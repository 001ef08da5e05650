"""Shapes-world training data as webdataset tar shards, and a reader for any image-text shards.

A shard `shapes-000000.tar` holds samples `{key}.png` + `{key}.json`, the json being
`{scene, rasteriser, prompt, prompts: [{tag, prompt}], questions: [{type, question, answer}], caption}`
(`caption` answers `describe the image.` and lists every object). Half the samples are drawn
prompt-first: `prompt` ({tag, prompt}) is a random prompt of a random GenEval family and the scene
holds exactly the objects it names, so it describes the image whole (generation pairs with a
sharp target); the other half are random scenes (`prompt` null). Sample `i` of seed `s` depends only on (s, i), so
shards are byte-identical for a seed however they are split.

`iter_samples` reads these or any webdataset-style image-text shards (`jpg`/`png`/`webp` +
`txt`/`json`, local paths, URLs or brace patterns) and skips broken data instead of failing,
counting what it skipped in a `ReadStats`.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from .prompts import (
    SLOT_JITTER,
    TAGS,
    canonical_scene,
    check_canonical_jitter,
    describe,
    prompts_from_scene,
    sample_prompt,
    scene_for,
)
from .questions import questions_for_scene
from .render import choose_rasteriser, render
from .world import sample_scene

SHARD_NAME = "shapes-{:06d}.tar"
IMAGE_KEYS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")
MAX_ERRORS_KEPT = 20  # ReadStats keeps the first messages only
PROMPT_FIRST = 0.5  # share of samples whose scene is drawn for a random prompt


def tag_weights_of(weights: dict[str, float] | None) -> list[float] | None:
    """The prompt families' weights in TAGS order (a family not named weighs 1); None for None. Refuses
    unknown families and weights that are negative, not numbers, or all zero."""
    if weights is None:
        return None
    unknown = sorted(set(weights) - set(TAGS))
    if unknown:
        raise ValueError(f"unknown prompt family {unknown[0]!r} in tag weights; expected some of {TAGS}")
    for tag, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
            raise ValueError(f"tag weight of {tag} must be a number >= 0, got {w!r}")
    out = [float(weights.get(tag, 1.0)) for tag in TAGS]
    if not any(out):
        raise ValueError("tag weights are all zero: no prompt family left to draw")
    return out


def make_sample(seed: int, index: int, prompt_first: float = PROMPT_FIRST,
                ordered: float = 0.0, canonical: float = 0.0,
                tag_weights: dict[str, float] | None = None,
                canonical_jitter: int = SLOT_JITTER) -> tuple[Image.Image, dict]:
    """Sample `index` of the Shapes dataset for `seed`: (64x64 RGB image, metadata dict).

    `prompt_first` is the chance that the scene is drawn for a random prompt (0: always a random
    scene of 1 to 4 objects, as the evaluation's questions use). `canonical` is the chance that such a
    scene puts each named object in its canonical cell, up to `canonical_jitter` px (`canonical_scene`;
    meta["canonical"]), `ordered` the
    chance that it follows the prompt's ordered layout instead (`follows_layout`; meta["ordered"]).
    `tag_weights` ({family: weight}, unnamed families 1) draws the prompt's family unevenly (default: evenly).
    """
    weights = tag_weights_of(tag_weights)
    rng = random.Random(f"shapes-{seed}-{index}")  # str seeds hash with sha512: stable across runs
    prompt = None
    if rng.random() < prompt_first:
        prompt = sample_prompt(rng, None if weights is None else rng.choices(TAGS, weights)[0])
    # a stream of its own, so that data written without `ordered` or `canonical` is unchanged
    layout = random.Random(f"shapes-{seed}-{index}-layout").random() if prompt is not None else 1.0
    in_canonical = canonical > 0 and layout < canonical
    in_order = not in_canonical and ordered > 0 and layout < canonical + ordered
    if prompt is None:
        scene = sample_scene(rng)
    elif in_canonical:
        scene = canonical_scene(prompt, rng, jitter=canonical_jitter)
    else:
        scene = scene_for(prompt, rng, extras=False, ordered=in_order)
    rasteriser = choose_rasteriser(rng)
    questions = questions_for_scene(scene, rng)
    meta = {
        "scene": scene.to_dict(),
        "rasteriser": rasteriser,
        "prompt": {"tag": prompt.tag, "prompt": prompt.text} if prompt else None,
        "prompts": [{"tag": p.tag, "prompt": p.text} for p in prompts_from_scene(scene, rng)],
        "questions": [{"type": q.type, "question": q.text, "answer": q.answer} for q in questions],
        "caption": describe(scene, rng),
    }
    if in_order:
        meta["ordered"] = True
    if in_canonical:
        meta["canonical"] = True
    return render(scene, rasteriser=rasteriser), meta


def write_shards(out_dir: str | os.PathLike, num: int, seed: int, shard_size: int = 1000,
                 prompt_first: float = PROMPT_FIRST, ordered: float = 0.0, canonical: float = 0.0,
                 tag_weights: dict[str, float] | None = None, canonical_jitter: int = SLOT_JITTER) -> list[Path]:
    """Write `num` samples as `shapes-000000.tar`, ... in `out_dir`; returns the shard paths.

    `prompt_first` is make_sample's share of scenes drawn for a prompt (1.0: every sample pairs a GenEval
    prompt with a scene it describes whole, e.g. for a generation stage that oversamples the prompts);
    `ordered` the share of those scenes laid out in the prompt's ordered layout and `canonical` the share laid
    out in its canonical cells (make_sample; together at most 1), up to `canonical_jitter` px; `tag_weights`
    how often each prompt family is drawn (make_sample).
    Each shard is written to a temporary name and renamed, so a reader never sees half a shard.
    """
    if num < 1 or shard_size < 1:
        raise ValueError(f"num and shard_size must be positive, got num={num}, shard_size={shard_size}")
    if not 0.0 <= prompt_first <= 1.0:
        raise ValueError(f"prompt_first must be a share in [0, 1], got {prompt_first!r}")
    if not 0.0 <= ordered <= 1.0:
        raise ValueError(f"ordered must be a share in [0, 1], got {ordered!r}")
    if not 0.0 <= canonical <= 1.0 - ordered:
        raise ValueError(f"canonical must be a share in [0, 1 - ordered] = [0, {1.0 - ordered:g}], got {canonical!r}")
    tag_weights_of(tag_weights)  # refused before anything is written
    check_canonical_jitter(canonical_jitter)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, num, shard_size)):
        path = out / SHARD_NAME.format(shard)
        tmp = path.with_name(path.name + ".tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, min(start + shard_size, num)):
                image, meta = make_sample(seed, index, prompt_first, ordered, canonical, tag_weights,
                                          canonical_jitter)
                png = io.BytesIO()
                image.save(png, format="PNG")
                key = f"{index:09d}"
                _add(tar, f"{key}.png", png.getvalue())
                _add(tar, f"{key}.json", json.dumps(meta, separators=(",", ":")).encode())
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # mtime, owner etc. stay 0: the bytes depend on the content only
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


@dataclass
class ReadStats:
    """What `iter_samples` read and what it skipped."""

    samples: int = 0  # samples yielded
    bad_samples: int = 0  # skipped: image or text missing or undecodable
    bad_shards: int = 0  # shards that failed to open or broke off (their earlier samples still count)
    errors: list[str] = field(default_factory=list)  # the first MAX_ERRORS_KEPT messages

    def _note(self, message: str) -> None:
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(message)


def shard_urls(urls: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand a directory (its *.tar files), a brace pattern (`shapes-{000000..000009}.tar`), or a list."""
    if isinstance(urls, (str, os.PathLike)):
        if Path(urls).is_dir():
            return [str(p) for p in sorted(Path(urls).glob("*.tar"))]
        return wds.shardlists.expand_urls(str(urls))
    return [str(u) for u in urls]


def iter_samples(
    urls: str | os.PathLike | Iterable[str | os.PathLike], *, stats: ReadStats | None = None
) -> Iterator[tuple[Image.Image, dict]]:
    """Yield (RGB PIL image, metadata) from webdataset shards, in order, skipping broken data.

    Metadata is the sample's json (a dict), plus `text` from a `txt` member, plus `__key__`
    and `__url__`. Pass a `ReadStats` to learn how many samples and shards were skipped.
    """
    stats = stats if stats is not None else ReadStats()
    for url in shard_urls(urls):
        failures: list[Exception] = []

        def keep_going(exn: Exception, failures: list[Exception] = failures) -> bool:
            failures.append(exn)
            return True

        opened = list(url_opener([{"url": url}], handler=keep_going))  # [] if it cannot be opened
        try:
            members = tar_file_expander(iter(opened), handler=keep_going)
            for raw in group_by_keys(members, handler=keep_going):
                try:
                    sample = decode_sample(raw)
                except Exception as exn:  # a broken sample must not stop a training run
                    stats.bad_samples += 1
                    stats._note(f"{url}: sample {raw.get('__key__')!r}: {exn}")
                    continue
                stats.samples += 1
                yield sample
        finally:
            for source in opened:  # webdataset leaves its streams open
                source["stream"].close()
        if failures:
            stats.bad_shards += 1
            stats._note(f"{url}: {failures[0]!r}")


def decode_sample(raw: dict) -> tuple[Image.Image, dict]:
    """A webdataset sample dict (member suffix -> bytes) -> (RGB image, metadata); raises if broken."""
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if image_key is None:
        raise ValueError(f"no image member (one of {IMAGE_KEYS}) among {sorted(raw)}")
    if "json" not in raw and "txt" not in raw:
        raise ValueError(f"no text member (json or txt) among {sorted(raw)}")
    with Image.open(io.BytesIO(raw[image_key])) as image:
        image = image.convert("RGB")  # forces a full decode: truncated files fail here
    meta = {}
    if "json" in raw:
        value = json.loads(raw["json"])
        meta.update(value if isinstance(value, dict) else {"json": value})
    if "txt" in raw:
        meta["text"] = raw["txt"].decode("utf-8")
    meta["__key__"], meta["__url__"] = raw.get("__key__"), raw.get("__url__")
    return image, meta
