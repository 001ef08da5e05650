"""Readers: a source's raw records, piece by piece, and each record turned into a sample.

Reading is cut in two so that a shuffle window holds cheap raw records and only the samples it hands out
are decoded: `records(piece, skip)` reads a piece (a tar shard, a run of JSONL lines, a run of a folder's
images, a whole JSON array) from its record `skip` on, and `load(record)` makes the sample or raises
`Skip` with the reason. The samples:

    image-text    {"image": PIL.Image, "text": str, "json": dict, "where": str}
    conversation  {"messages": [{"role": "system"|"user"|"assistant",
                                 "content": [{"type": "image", "image": PIL.Image}, {"type": "text", "text": str}]}],
                   "json": dict, "where": str}
    edit          {"sources": [PIL.Image, ...] (one or more, in order), "instruction": str,
                   "image": PIL.Image (the target), "json": dict, "where": str}
    targets       {"targets": (64, C) tensor, "text": str, "json": dict, "where": str, "key": str, "encoder": str}
                  (a CLIP-target cache: blip3o.data.targets)

`json` is the record's own metadata (a shard's json member, the JSONL line); `where` names the file and the
line, key or item. Every image comes through `admit_image` and keeps its own mode and size, with its EXIF
orientation applied as transformers' `load_image` applies it (the processors convert the mode themselves).
"""

from __future__ import annotations

import functools
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from webdataset.tariterators import group_by_keys, tar_file_expander

from blip3o.images import ImageRejected, admit_image

from .spec import IMAGE_SUFFIXES, Source
from .stats import Problem, Skip

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")  # the image members of a shard sample, in order of preference
TEXT_FIELDS = ("caption", "prompt", "text")  # where an image-text record keeps its caption, in that order
SOURCE_MEMBER = re.compile(rf"src(\d*)\.({'|'.join(IMAGE_MEMBERS)})")  # an edit sample's source: src.png, src1.jpg
PIECE_LINES = 1000  # a JSONL file is read in pieces of this many lines
PIECE_IMAGES = 1000  # a folder in pieces of this many images
PLACEHOLDER = "<image>"
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}  # LLaVA's `from` -> the chat format's role
MAX_ITEM_CHARS = 64 << 20  # a JSON array item larger than this is taken for a syntax error

Report = Callable[[Problem], None]


@dataclass(frozen=True)
class Record:
    """One raw record of a piece, not yet decoded."""

    file: str
    at: str  # "line 12", "key 000123", "item 7", or "" (a folder's sample is its own file)
    data: Any  # a shard's members {suffix: bytes}, a JSONL line (bytes), an array item, a folder's {suffix: path}

    @property
    def where(self) -> str:
        return f"{self.file}, {self.at}" if self.at else self.file


class Reader(ABC):
    """How one source is read: its pieces, a piece's records, a record's sample."""

    def __init__(self, source: Source) -> None:
        self.source = source

    @abstractmethod
    def pieces(self) -> list:
        """The source's pieces, in a fixed order: what a unit of the stream reads whole."""

    @abstractmethod
    def records(self, piece, skip: int, report: Report) -> Iterator[Record]:
        """The piece's records from its record `skip` on; a piece that breaks off is reported, not raised."""

    @abstractmethod
    def load(self, record: Record) -> dict:
        """The record's sample; raises Skip when it cannot be one."""


def reader_for(source: Source) -> Reader:
    """The reader of a source of samples (images, captions, conversations). A CLIP-target cache is read by
    `blip3o.data.targets.TargetsReader`, which builds on this module (`blip3o.data.stream.source_reader` picks)."""
    if source.kind == "targets":
        raise ValueError(f"{source.name}: a CLIP-target cache is read by blip3o.data.targets.TargetsReader")
    if source.kind == "shards":
        return ShardReader(source)
    if source.kind == "edits" and source.paths[0].endswith(".tar"):
        return EditShardReader(source)
    if source.kind == "folder":
        return FolderReader(source)
    load = {"captions": caption_sample, "llava": conversation_sample, "edits": edit_sample}[source.kind]
    if source.paths[0].endswith(".jsonl"):
        return LinesReader(source, load)
    return ArrayReader(source, load)


# ------------------------------------------------------------------ webdataset shards


class ShardReader(Reader):
    """Webdataset tar shards: one piece a shard, one record a key (webdataset's grouping of members)."""

    def pieces(self) -> list[str]:
        return list(self.source.paths)

    def records(self, piece: str, skip: int, report: Report) -> Iterator[Record]:
        failures: list[Exception] = []

        def keep_going(exn: Exception) -> bool:
            failures.append(exn)
            return True

        try:
            stream = open(piece, "rb")  # noqa: SIM115  (closed below, after the generator's last record)
        except OSError as e:
            report(Problem(piece, "", "bad_shard", f"cannot open: {e.strerror or e}"))
            return
        try:
            members = tar_file_expander(iter([{"url": piece, "stream": stream}]), handler=keep_going)
            for k, raw in enumerate(group_by_keys(members, handler=keep_going)):
                if k >= skip:
                    yield Record(piece, f"key {raw.get('__key__')}", raw)
        finally:
            stream.close()
        if failures:
            report(Problem(piece, "", "bad_shard", f"breaks off: {failures[0]}"))

    def load(self, record: Record) -> dict:
        raw = record.data
        image_key = next((k for k in IMAGE_MEMBERS if k in raw), None)
        members = sorted(k for k in raw if not k.startswith("__"))
        if image_key is None:
            raise Skip("no_image", f"no image member ({', '.join(IMAGE_MEMBERS)}) among {members}")
        meta = json_object(raw["json"], "the json member") if "json" in raw else {}
        text = (raw["txt"].decode("utf-8", errors="replace").strip() if "txt" in raw else "") or caption_of(meta)
        if not text:
            raise Skip("no_text", f"no caption: no txt member and no {'/'.join(TEXT_FIELDS)} in json (members "
                                  f"{members})")
        image = open_image(raw[image_key], f"member {image_key}")
        return {"image": image, "text": text, "json": meta, "where": record.where}


class EditShardReader(ShardReader):
    """Webdataset shards of edit triplets: a sample's members `src.*` (then `src1.*`, `src2.*`, ...: the sources,
    in order), `tgt.*` (the target) and `txt` (the instruction; else the json member's `instruction`)."""

    def load(self, record: Record) -> dict:
        raw = record.data
        members = sorted(k for k in raw if not k.startswith("__"))
        sources = source_members(raw)
        target = next((f"tgt.{k}" for k in IMAGE_MEMBERS if f"tgt.{k}" in raw), None)
        if target is None:
            raise Skip("no_target", f"no target image member (tgt.{'/'.join(IMAGE_MEMBERS)}) among {members}")
        meta = json_object(raw["json"], "the json member") if "json" in raw else {}
        instruction = raw["txt"].decode("utf-8", errors="replace").strip() if "txt" in raw else ""
        instruction = instruction or _text(meta.get("instruction"))
        if not instruction:
            raise Skip("no_instruction", f"no instruction: no txt member and no `instruction` in json (members "
                                         f"{members})")
        images = [open_image(raw[k], f"member {k}") for k in sources]
        return {"sources": images, "instruction": instruction, "image": open_image(raw[target], f"member {target}"),
                "json": meta, "where": record.where}


def source_members(raw: dict) -> list[str]:
    """An edit sample's source members in order, `src.*` then `src1.*`, `src2.*`, ... (where a number has
    several images, the first of IMAGE_MEMBERS); Skip when `src.*` is missing or a number is left out."""
    found: dict[int, str] = {}
    matches = (m for m in map(SOURCE_MEMBER.fullmatch, raw) if m)
    for _, n, member in sorted((IMAGE_MEMBERS.index(m[2]), int(m[1] or 0), m[0]) for m in matches):
        found.setdefault(n, member)
    missing = [f"src{n or ''}.*" for n in range(max(found, default=0) + 1) if n not in found]
    if missing:
        members = sorted(k for k in raw if not k.startswith("__"))
        raise Skip("no_source", f"no source image member {missing[0]} (sources are src.*, then src1.*, src2.*, "
                                f"...: {'/'.join(IMAGE_MEMBERS)}) among {members}")
    return [found[n] for n in sorted(found)]


# ------------------------------------------------------------------ a folder of images with .txt captions


class FolderReader(Reader):
    """A folder (searched recursively) of images with same-named .txt captions: `a/b.jpg` + `a/b.txt`."""

    def pieces(self) -> list[tuple[int, int]]:
        n = len(_folder_samples(self.source.paths[0]))
        return [(start, min(start + PIECE_IMAGES, n)) for start in range(0, n, PIECE_IMAGES)]

    def records(self, piece: tuple[int, int], skip: int, report: Report) -> Iterator[Record]:
        samples = _folder_samples(self.source.paths[0])
        for stem, files in samples[piece[0] + skip:piece[1]]:
            yield Record(stem, "", files)

    def load(self, record: Record) -> dict:
        files: dict[str, str] = record.data
        image_path = next((files[s] for s in IMAGE_SUFFIXES if s in files), None)
        if image_path is None:
            raise Skip("no_image", f"{files['.txt']} has no image beside it ({', '.join(IMAGE_SUFFIXES)})")
        text = Path(files[".txt"]).read_text(encoding="utf-8", errors="replace").strip() if ".txt" in files else ""
        if not text:
            raise Skip("no_text", f"no caption: {Path(image_path).with_suffix('.txt')} is missing or empty")
        return {"image": open_image(Path(image_path), image_path), "text": text, "json": {}, "where": image_path}


@functools.lru_cache(maxsize=16)
def _folder_samples(folder: str) -> list[tuple[str, dict[str, str]]]:
    """[(path without suffix, {suffix: path})] of every image or .txt under `folder`, sorted (once a process)."""
    groups: dict[str, dict[str, str]] = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            stem, suffix = os.path.splitext(os.path.join(parent, name))
            if suffix.lower() in IMAGE_SUFFIXES + (".txt",):
                groups.setdefault(stem, {})[suffix.lower()] = os.path.join(parent, name)
    return sorted(groups.items())


# ------------------------------------------------------------------ JSONL and JSON arrays


class LinesReader(Reader):
    """A JSONL file in pieces of PIECE_LINES lines; a record is a non-blank line."""

    def __init__(self, source: Source, load: Callable[[dict, Source, str], dict]) -> None:
        super().__init__(source)
        self._load = load

    def pieces(self) -> list[tuple[int, int, int]]:
        return _line_pieces(self.source.paths[0])

    def records(self, piece: tuple[int, int, int], skip: int, report: Report) -> Iterator[Record]:
        offset, first_line, count = piece
        path, n = self.source.paths[0], 0
        with open(path, "rb") as f:
            f.seek(offset)
            for k in range(count):
                line = f.readline()
                if not line.strip():
                    continue
                if n >= skip:
                    yield Record(path, f"line {first_line + k}", line)
                n += 1

    def load(self, record: Record) -> dict:
        return self._load(json_object(record.data, "the line"), self.source, record.where)


@functools.lru_cache(maxsize=16)
def _line_pieces(path: str) -> list[tuple[int, int, int]]:
    """[(byte offset, first line number, number of lines)] of PIECE_LINES lines each, from one scan for newlines
    (once a process; only every PIECE_LINES-th offset is kept)."""
    size = os.path.getsize(path)
    starts, lines, base = [0], 1 if size else 0, 0  # the line starts kept, the lines started so far
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            after = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + base + 1  # where a line starts
            after = after[after < size]
            starts += (after[(-lines) % PIECE_LINES::PIECE_LINES]).tolist()
            lines += len(after)
            base += len(chunk)
    return [(offset, 1 + k * PIECE_LINES, min(PIECE_LINES, lines - k * PIECE_LINES))
            for k, offset in enumerate(starts) if k * PIECE_LINES < lines]


class ArrayReader(LinesReader):
    """A JSON array file, streamed item by item as one piece (its items are not found without parsing it)."""

    def pieces(self) -> list[str]:
        return [self.source.paths[0]]

    def records(self, piece: str, skip: int, report: Report) -> Iterator[Record]:
        with open(piece, encoding="utf-8", errors="replace") as f:
            items = _ArrayItems(f)
            k = 0  # the item being read: where a syntax error stops the file
            try:
                for item in items:
                    if k >= skip:
                        yield Record(piece, f"item {k}", item)
                    k += 1
            except ValueError as e:
                report(Problem(piece, f"item {k}", "bad_json", f"not valid JSON from here on: {e}"))

    def load(self, record: Record) -> dict:
        return self._load(json_object(record.data, "the item"), self.source, record.where)


class _ArrayItems:
    """The items of a JSON array file, decoded one at a time from a sliding window of its text."""

    def __init__(self, file) -> None:
        self.file, self.text, self.pos, self.eof = file, "", 0, False
        self.decoder = json.JSONDecoder()

    def _more(self) -> bool:
        chunk = self.file.read(1 << 20)
        self.text, self.pos, self.eof = self.text[self.pos:] + chunk, 0, not chunk
        return bool(chunk)

    def _next_char(self) -> str:
        """The next character that is not white space ("" at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.text) or not self._more():
                return self.text[self.pos:self.pos + 1]

    def _expect(self, chars: str) -> str:
        char = self._next_char()
        if not char or char not in chars:
            raise ValueError(f"expected {' or '.join(map(repr, chars))} at character {self.pos}, got {char!r}")
        self.pos += 1
        return char

    def _item(self):
        self._next_char()  # raw_decode reads from a value's first character
        while True:
            try:
                item, end = self.decoder.raw_decode(self.text, self.pos)
                if end < len(self.text) or self.eof:
                    self.pos = end
                    return item
            except json.JSONDecodeError:
                if self.eof or len(self.text) - self.pos > MAX_ITEM_CHARS:
                    raise
            self._more()

    def __iter__(self):
        self._expect("[")
        if self._next_char() == "]":
            return
        while True:
            yield self._item()
            if self._expect(",]") == "]":
                return


# ------------------------------------------------------------------ samples


def caption_sample(record: dict, source: Source, where: str) -> dict:
    """{"image": path, "caption"|"prompt"|"text": str} -> an image-text sample."""
    path = record.get("image")
    if not isinstance(path, str) or not path:
        raise Skip("no_image", f"no `image` path (keys {sorted(record)})")
    text = caption_of(record)
    if not text:
        raise Skip("no_text", f"no caption: none of {', '.join(TEXT_FIELDS)} is a non-empty string")
    image = open_image(Path(source.image_root or ".") / path, path)
    return {"image": image, "text": text, "json": record, "where": where}


def conversation_sample(record: dict, source: Source, where: str) -> dict:
    """A LLaVA record {"image": path | [paths], "conversations": [{"from", "value"}]} -> a conversation sample:
    its turns in the chat format, each image where its `<image>` placeholder stood."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise Skip("no_conversations", "no `conversations` list of turns" if turns is None
                   else f"`conversations` must be a non-empty list, got {type(turns).__name__}")
    _check_turns(turns)
    paths = _image_paths(record)
    placeholders = sum(t["value"].count(PLACEHOLDER) for t in turns)
    if placeholders != len(paths) or any(PLACEHOLDER in t["value"] for t in turns if t["from"] == "gpt"):
        raise Skip("image_count", f"{placeholders} {PLACEHOLDER} placeholders for {len(paths)} images"
                   + ("" if placeholders != len(paths) else " (a placeholder in a gpt turn)"))
    images = iter([open_image(Path(source.image_root or ".") / p, p) for p in paths])
    messages = [{"role": ROLES[t["from"]], "content": _content(t["value"], images)} for t in turns]
    return {"messages": messages, "json": record, "where": where}


def edit_sample(record: dict, source: Source, where: str) -> dict:
    """{"source": path | [paths], "instruction": str, "target": path} -> an edit sample (the sources in order)."""
    paths = record.get("source")
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
        raise Skip("no_source", f"`source` must be a path or a non-empty list of paths, got "
                                f"{json.dumps(record.get('source'))[:120]}")
    target = record.get("target")
    if not isinstance(target, str) or not target:
        raise Skip("no_target", f"`target` must be a path, got {json.dumps(target)[:120]}")
    instruction = _text(record.get("instruction"))
    if not instruction:
        raise Skip("no_instruction", "`instruction` must be a non-empty string")
    root = Path(source.image_root or ".")
    images = [open_image(root / p, p) for p in paths]
    return {"sources": images, "instruction": instruction, "image": open_image(root / target, target),
            "json": record, "where": where}


def _text(value) -> str:
    """A string value stripped; "" for anything else."""
    return value.strip() if isinstance(value, str) else ""


def _check_turns(turns: list) -> None:
    for k, turn in enumerate(turns):
        if not (isinstance(turn, dict) and turn.get("from") in ROLES and isinstance(turn.get("value"), str)):
            raise Skip("bad_turn", f"turn {k} must be {{\"from\": {'|'.join(ROLES)}, \"value\": str}}, got "
                                   f"{json.dumps(turn)[:120]}")
    if not any(t["from"] == "gpt" for t in turns):
        raise Skip("bad_turn", "no gpt turn: nothing to learn from")


def _image_paths(record: dict) -> list[str]:
    paths = record.get("image", [])
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise Skip("no_image", f"`image` must be a path or a list of paths, got {json.dumps(record['image'])[:120]}")
    return paths


def _content(value: str, images: Iterator[Image.Image]) -> list[dict]:
    """A turn's text -> its parts: each `<image>` becomes the next image, the text between them stripped."""
    parts = []
    for k, text in enumerate(value.split(PLACEHOLDER)):
        if k:
            parts.append({"type": "image", "image": next(images)})
        if text.strip():
            parts.append({"type": "text", "text": text.strip()})
    return parts or [{"type": "text", "text": ""}]


def caption_of(record: dict) -> str:
    """The first of TEXT_FIELDS that is a non-empty string, stripped; "" if none."""
    for field in TEXT_FIELDS:
        value = record.get(field)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def json_object(data: bytes | str | Any, what: str) -> dict:
    """A raw line or member parsed (an item already parsed passes), which must be a JSON object."""
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except ValueError as e:
            raise Skip("bad_json", f"{what} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise Skip("bad_json", f"{what} is a JSON {type(data).__name__}, not an object")
    return data


def open_image(source: bytes | Path, name: str) -> Image.Image:
    """Image bytes or a path -> the checked image in its own mode, EXIF orientation applied; Skip if refused."""
    if isinstance(source, Path) and not source.exists():
        raise Skip("image_missing", f"{source} does not exist")
    try:
        image = admit_image(source, name=name)
    except ImageRejected as e:
        raise Skip(f"image_{e.reason}", str(e)) from None
    ImageOps.exif_transpose(image, in_place=True)
    return image
