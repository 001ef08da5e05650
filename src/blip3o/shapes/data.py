"""Shapes-world training data as webdataset tar shards, and a reader for any image-text shards.

An example is one image with its texts. A shard `shapes-000000.tar` holds examples `{key}.png` +
`{key}.json`, the json being
`{scene, rasteriser, prompt, prompts: [{tag, prompt}], questions: [{type, question, answer}], caption}`
(`caption` answers `describe the image.` and lists every object). Half the examples are drawn
prompt-first: `prompt` ({tag, prompt}) is a random prompt of a random GenEval family and the scene
holds exactly the objects it names, so it describes the image whole (generation pairs with a sharp
target); the other half are random scenes (`prompt` null). Example `i` of seed `s` depends only on
(s, i), so shards are byte-identical for a seed however they are split.

`iter_examples` reads these or any webdataset-style image-text shards (`jpg`/`png`/`webp` +
`txt`/`json`, local paths, URLs or brace patterns) and skips broken data instead of failing,
counting what it skipped in a `ReadStats`.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from blip3o.images import admit_image

from .prompts import (
    SLOT_JITTER,
    TAGS,
    Prompt,
    canonical_scene,
    check_canonical_jitter,
    describe,
    prompts_from_scene,
    sample_prompt,
    scene_for,
)
from .questions import questions_for_scene
from .render import choose_rasteriser, render
from .world import Scene, sample_scene

SHARD_NAME = "shapes-{:06d}.tar"
IMAGE_KEYS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")
MAX_ERRORS_KEPT = 20  # ReadStats keeps the first messages only
PROMPT_FIRST = 0.5  # share of examples whose scene is drawn for a random prompt
T = TypeVar("T")


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


def check_example_options(prompt_first: float = PROMPT_FIRST, ordered: float = 0.0, canonical: float = 0.0,
                          tag_weights: dict[str, float] | None = None, canonical_jitter: int = SLOT_JITTER) -> None:
    """Refuse options of `make_example` that are out of range, naming the option."""
    if not 0.0 <= prompt_first <= 1.0:
        raise ValueError(f"prompt_first must be a share in [0, 1], got {prompt_first!r}")
    if not 0.0 <= ordered <= 1.0:
        raise ValueError(f"ordered must be a share in [0, 1], got {ordered!r}")
    if not 0.0 <= canonical <= 1.0 - ordered:
        raise ValueError(f"canonical must be a share in [0, 1 - ordered] = [0, {1.0 - ordered:g}], got {canonical!r}")
    tag_weights_of(tag_weights)
    check_canonical_jitter(canonical_jitter)


def make_example(seed: int, index: int, prompt_first: float = PROMPT_FIRST,
                 ordered: float = 0.0, canonical: float = 0.0,
                 tag_weights: dict[str, float] | None = None,
                 canonical_jitter: int = SLOT_JITTER) -> tuple[Image.Image, dict]:
    """Example `index` of the Shapes dataset for `seed`: (64x64 RGB image, metadata dict).

    `prompt_first` is the chance that the scene is drawn for a random prompt (0: always a random
    scene of 1 to 4 objects, as the evaluation's questions use). `canonical` is the chance that such a
    scene puts each named object in its canonical cell, up to `canonical_jitter` px (`canonical_scene`;
    meta["canonical"]), `ordered` the chance that it follows the prompt's ordered layout instead
    (`follows_layout`; meta["ordered"]); together at most 1. `tag_weights` ({family: weight}, unnamed
    families 1) draws the prompt's family unevenly (default: evenly).
    """
    check_example_options(prompt_first, ordered, canonical, tag_weights, canonical_jitter)
    weights = tag_weights_of(tag_weights)
    rng = random.Random(f"shapes-{seed}-{index}")  # str seeds hash with sha512: stable across runs
    prompt = None
    if rng.random() < prompt_first:
        prompt = sample_prompt(rng, None if weights is None else rng.choices(TAGS, weights)[0])
    layout = _layout(seed, index, prompt, ordered, canonical)
    scene = _draw_scene(prompt, layout, rng, canonical_jitter)
    rasteriser = choose_rasteriser(rng)
    meta = _metadata(scene, rasteriser, prompt, rng)
    if layout is not None:
        meta[layout] = True
    return render(scene, rasteriser=rasteriser), meta


def _layout(seed: int, index: int, prompt: Prompt | None, ordered: float, canonical: float) -> str | None:
    """How example `index` lays out its prompt's objects: "canonical", "ordered", or None (at random)."""
    if prompt is None:
        return None
    # a stream of its own, so that data written without `ordered` or `canonical` is unchanged
    draw = random.Random(f"shapes-{seed}-{index}-layout").random()
    if canonical > 0 and draw < canonical:
        return "canonical"
    if ordered > 0 and draw < canonical + ordered:
        return "ordered"
    return None


def _draw_scene(prompt: Prompt | None, layout: str | None, rng: random.Random, jitter: int) -> Scene:
    """A random scene of 1 to 4 objects without a prompt, else exactly the prompt's objects in `layout`."""
    if prompt is None:
        return sample_scene(rng)
    if layout == "canonical":
        return canonical_scene(prompt, rng, jitter=jitter)
    return scene_for(prompt, rng, extras=False, ordered=layout == "ordered")


def _metadata(scene: Scene, rasteriser: str, prompt: Prompt | None, rng: random.Random) -> dict:
    """The example's json: its scene, how it is drawn, and every text about it (questions, then prompts and
    caption: the order in which they consume `rng`)."""
    questions = questions_for_scene(scene, rng)
    return {
        "scene": scene.to_dict(),
        "rasteriser": rasteriser,
        "prompt": {"tag": prompt.tag, "prompt": prompt.text} if prompt else None,
        "prompts": [{"tag": p.tag, "prompt": p.text} for p in prompts_from_scene(scene, rng)],
        "questions": [{"type": q.type, "question": q.text, "answer": q.answer} for q in questions],
        "caption": describe(scene, rng),
    }


def write_shards(out_dir: str | os.PathLike, num: int, seed: int, shard_size: int = 1000,
                 prompt_first: float = PROMPT_FIRST, ordered: float = 0.0, canonical: float = 0.0,
                 tag_weights: dict[str, float] | None = None, canonical_jitter: int = SLOT_JITTER) -> list[Path]:
    """Write examples 0 .. `num` - 1 of `seed` as `shapes-000000.tar`, ... in `out_dir`; returns the shard paths.

    The options are `make_example`'s: `prompt_first` 1.0 makes every example pair a GenEval prompt with a
    scene it describes whole (e.g. for a generation stage that oversamples the prompts); `ordered` and
    `canonical` are the shares of those scenes laid out in the prompt's ordered layout or its canonical
    cells; `tag_weights` is how often each prompt family is drawn.
    """
    if num < 1 or shard_size < 1:
        raise ValueError(f"num and shard_size must be positive, got num={num}, shard_size={shard_size}")
    options = dict(prompt_first=prompt_first, ordered=ordered, canonical=canonical, tag_weights=tag_weights,
                   canonical_jitter=canonical_jitter)
    check_example_options(**options)  # refused before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, num, shard_size)):
        paths.append(out / SHARD_NAME.format(shard))
        _write_shard(paths[-1], seed, range(start, min(start + shard_size, num)), options)
    return paths


def _write_shard(path: Path, seed: int, indices: range, options: dict) -> None:
    """Examples `indices` of `seed` as one tar at `path`. It is written to a temporary name and renamed,
    so a reader never sees half a shard."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in indices:
            image, meta = make_example(seed, index, **options)
            png = io.BytesIO()
            image.save(png, format="PNG")
            key = f"{index:09d}"
            add_member(tar, f"{key}.png", png.getvalue())
            add_member(tar, f"{key}.json", json.dumps(meta, separators=(",", ":")).encode())
    os.replace(tmp, path)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # mtime, owner etc. stay 0: the bytes depend on the content only
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


@dataclass
class ReadStats:
    """What `iter_examples` read and what it skipped."""

    examples: int = 0  # examples yielded
    bad_examples: int = 0  # skipped: image or text missing or undecodable
    bad_shards: int = 0  # shards that failed to open or broke off (their earlier examples still count)
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


def iter_examples(
    urls: str | os.PathLike | Iterable[str | os.PathLike], *, stats: ReadStats | None = None,
    decode: Callable[[dict], T] | None = None,
) -> Iterator[T]:
    """Yield (RGB PIL image, metadata) from webdataset shards, in order, skipping broken data.

    Metadata is the example's json (a dict), plus `text` from a `txt` member, plus `__key__`
    and `__url__`. Pass a `ReadStats` to learn how many examples and shards were skipped.
    `decode` turns one sample's members (suffix -> bytes) into what is yielded, raising if the
    sample is broken (default `decode_example`; `edits.decode_edit` reads edit samples).
    """
    decode = decode if decode is not None else decode_example
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
                    example = decode(raw)
                except Exception as exn:  # a broken example must not stop a training run
                    stats.bad_examples += 1
                    stats._note(f"{url}: example {raw.get('__key__')!r}: {exn}")
                    continue
                stats.examples += 1
                yield example
        finally:
            for source in opened:  # webdataset leaves its streams open
                source["stream"].close()
        if failures:
            stats.bad_shards += 1
            stats._note(f"{url}: {failures[0]!r}")


def decode_example(raw: dict) -> tuple[Image.Image, dict]:
    """The members of one example as webdataset groups them (suffix -> bytes) -> (RGB image, metadata);
    raises if broken."""
    image_key = next((k for k in IMAGE_KEYS if k in raw), None)
    if image_key is None:
        raise ValueError(f"no image member (one of {IMAGE_KEYS}) among {sorted(raw)}")
    if "json" not in raw and "txt" not in raw:
        raise ValueError(f"no text member (json or txt) among {sorted(raw)}")
    image = admit_image(raw[image_key], name=f"member {image_key}").convert("RGB")  # bombs, truncation: refused
    meta = {}
    if "json" in raw:
        value = json.loads(raw["json"])
        meta.update(value if isinstance(value, dict) else {"json": value})
    if "txt" in raw:
        meta["text"] = raw["txt"].decode("utf-8")
    meta["__key__"], meta["__url__"] = raw.get("__key__"), raw.get("__url__")
    return image, meta

