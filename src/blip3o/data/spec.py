"""Data specs: which sources a run reads, and how much of each.

A spec is one string of comma-separated entries `PATH[::WEIGHT]`, or a YAML/JSON spec file:

    data/{00000..00127}.tar          webdataset shards: a brace pattern, a glob, one .tar, or a folder of *.tar
    captions.jsonl                   {"image": path, "caption"|"prompt"|"text": str} a line
    photos/                          a folder of images with same-named .txt captions (searched recursively)
    llava_v1_5_mix665k.json          LLaVA conversations: a JSON array, or JSONL whose lines hold `conversations`
    edits/{000..015}.tar             edit triplets: shards whose samples hold src.* (src1.*, ...), tgt.* and txt
    edits.jsonl                      edit triplets: {"source": path | [paths], "instruction": str, "target": path}
    targets/                         a CLIP-target cache (`blip3o data clip-targets`: a folder with manifest.json)
    data/{00000..00127}.tar::0.7,llava.jsonl::0.3    a mixture: each sample comes from a source with
                                     probability weight / sum of weights (a weight left out is 1)
    mix.yaml                         a spec file:  sources: [{path, weight, kind, image_root}, ...]

In a spec file `path` and `image_root` are relative to the file's folder, `kind` (shards, captions, folder,
llava, edits, targets) overrides what the path's form says. Shards are `edits` when the first sample of the first
shard has a `src.*`, `srcN.*` or `tgt.*` member; a JSONL file is `edits` when its first JSON object has an
`instruction`, or both `source` and `target`. Image paths inside JSONL and LLaVA files resolve against the
source's image root: its own `image_root`, else the `image_root` argument (`--image-root`), else the file's
folder. Everything named must exist: a spec that cannot be read as asked raises SpecError naming the entry.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from braceexpand import braceexpand

KINDS = ("shards", "captions", "folder", "llava", "edits", "targets")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
TARGETS_MANIFEST = "manifest.json"  # what makes a folder a CLIP-target cache (blip3o.data.targets)
SPEC_FILE_FIELDS = ("path", "weight", "kind", "image_root")
SNIFF_LINES = 100  # a JSONL file's kind is read from the first JSON object among its first lines
SNIFF_MEMBERS = 16  # shards are edits when one of the first shard's first members is an edit member
EDIT_MEMBER = re.compile(r"(src\d*|tgt)\.")  # an edit sample's source or target image member (after the key)


class SpecError(ValueError):
    """A data spec that cannot be read as asked: a missing file, an empty pattern, a weight that is not a positive
    number, an image root that is not a folder. The message names the entry."""


@dataclass(frozen=True)
class Source:
    """One source of a spec."""

    name: str  # the entry as written, for messages
    kind: str  # one of KINDS
    paths: tuple[str, ...]  # shards: every shard; captions and llava: the file; folder: the folder; edits: either
    weight: float = 1.0  # its share of a mixture, before normalisation
    image_root: str | None = None  # where relative image paths resolve (captions, llava, edits from JSONL)


def parse_spec(spec: str | os.PathLike | Sequence[str | os.PathLike], *,
               image_root: str | os.PathLike | None = None) -> list[Source]:
    """The sources a spec names, checked (SpecError otherwise). A list is read as its entries joined by commas."""
    entries = [str(spec)] if isinstance(spec, (str, os.PathLike)) else [str(s) for s in spec]
    texts = [text for entry in entries for text in split_entries(entry)]
    if not texts:
        raise SpecError("the data spec names no source")
    root = _image_root(image_root, "--image-root") if image_root is not None else None
    if len(texts) == 1 and _is_spec_file(Path(texts[0])):
        sources = _read_spec_file(Path(texts[0]), root)
    else:
        sources = [_entry_source(text, root) for text in texts]
    if root is not None and not any(s.image_root is not None for s in sources):
        raise SpecError("--image-root applies to JSONL and LLaVA sources, and the spec names none")
    return sources


def _entry_source(text: str, root: str | None) -> Source:
    path, weight = _path_and_weight(text)
    if _is_spec_file(Path(path)):
        raise SpecError(f"{path} is a spec file: name it alone, not as one entry of a mixture")
    return make_source(path, weight=weight, default_root=root, name=text)


def split_entries(text: str) -> list[str]:
    """`a/{0..3}.tar::2,b.jsonl` -> ["a/{0..3}.tar::2", "b.jsonl"]: commas inside braces belong to the pattern."""
    entries, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            entries.append(text[start:i])
            start = i + 1
    entries.append(text[start:])
    return [e.strip() for e in entries if e.strip()]


def _path_and_weight(text: str) -> tuple[str, float]:
    path, sep, weight = text.rpartition("::")
    if not sep:
        return text, 1.0
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    return path, _check_weight(value, text, weight)


def _check_weight(value, entry: str, written) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise SpecError(f"the mixing weight of {entry!r} must be a positive number, got {written!r}")
    return float(value)


def make_source(path: str, *, weight: float = 1.0, kind: str | None = None, image_root: str | None = None,
                default_root: str | None = None, name: str | None = None) -> Source:
    """A checked Source for `path` (its kind read from the path's form unless given)."""
    name = name or path
    detected = kind is None
    kind = kind or detect_kind(path)
    if kind not in KINDS:
        raise SpecError(f"{name}: unknown kind {kind!r}; the kinds: {', '.join(KINDS)}")
    shards = kind == "shards" or (kind == "edits" and names_shards(path))
    paths = shard_paths(path) if shards else (_existing(path, kind, name),)
    if detected and kind == "shards" and holds_edits(paths[0]):
        kind = "edits"
    if kind in ("captions", "llava") or (kind == "edits" and not shards):
        root = image_root or default_root or str(Path(path).parent)
        return Source(name, kind, paths, weight, _image_root(root, name))
    if image_root is not None:
        what = "edit shards" if kind == "edits" else kind
        raise SpecError(f"{name}: image_root applies to JSONL and LLaVA sources, not to {what}")
    if kind == "targets" and not (Path(path) / TARGETS_MANIFEST).is_file():
        raise SpecError(f"{name}: the folder {path} holds no {TARGETS_MANIFEST}: not a CLIP-target cache")
    if kind == "folder" and not _has_image(path):
        raise SpecError(f"{name}: the folder {path} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    return Source(name, kind, paths, weight)


def detect_kind(path: str) -> str:
    """The kind a path's form says: tar shards, a folder, a JSONL or JSON file (SpecError for anything else)."""
    p = Path(path)
    if any(c in path for c in "{*?[") or p.suffix == ".tar":
        return "shards"
    if p.is_dir() and (p / TARGETS_MANIFEST).is_file():
        return "targets"
    if p.is_dir():
        return "shards" if any(p.glob("*.tar")) else "folder"
    if not p.exists():
        raise SpecError(f"{path} does not exist")
    if p.suffix == ".jsonl":
        return _sniff_jsonl(p)
    if p.suffix == ".json" and _first_char(p) == "[":
        return "llava"
    raise SpecError(f"cannot tell what {path} holds: expected .tar shards (a path, pattern or folder), a folder of "
                    f"images, a .jsonl file, a .json array of LLaVA records, or a .yaml/.json spec file")


def names_shards(path: str) -> bool:
    """Whether a path names tar shards by its form: a pattern, a .tar file or a folder."""
    return any(c in path for c in "{*?[") or path.endswith(".tar") or Path(path).is_dir()


def holds_edits(shard: str) -> bool:
    """Whether one of the shard's first members is an edit sample's image (`KEY.src.png`, `KEY.src1.jpg`,
    `KEY.tgt.webp`): read from the tar headers alone; False for a shard that does not open."""
    try:
        with tarfile.open(shard) as tar:
            for _, member in zip(range(SNIFF_MEMBERS), tar, strict=False):
                suffix = member.name.rsplit("/", 1)[-1].partition(".")[2].lower()  # webdataset's key ends at a dot
                if member.isfile() and EDIT_MEMBER.match(suffix):
                    return True
    except (OSError, EOFError, tarfile.TarError):
        return False
    return False


def shard_paths(pattern: str) -> tuple[str, ...]:
    """Every shard a pattern names: a folder's *.tar, a brace pattern, a glob or one path; each must exist."""
    if Path(pattern).is_dir():
        names = sorted(str(p) for p in Path(pattern).glob("*.tar"))
    elif "{" in pattern:
        names = list(braceexpand(pattern))
    elif any(c in pattern for c in "*?["):
        names = sorted(glob.glob(pattern))
    else:
        names = [pattern]
    if not names:
        raise SpecError(f"{pattern} names no shard")
    for name in names:
        if not name.endswith(".tar"):
            raise SpecError(f"{pattern}: {name} is not a .tar shard")
        if not Path(name).is_file():
            raise SpecError(f"{pattern}: the shard {name} does not exist")
    return tuple(names)


def _existing(path: str, kind: str, name: str) -> str:
    """`path`, if it is what a source of `kind` reads: a folder for `folder`, else a file."""
    is_folder = kind in ("folder", "targets")
    wanted, found = ("a folder", Path(path).is_dir()) if is_folder else ("a file", Path(path).is_file())
    if not found:
        raise SpecError(f"{name}: {path} is not {wanted}" if Path(path).exists() else f"{name}: {path} does not exist")
    return path


def _image_root(root: str | os.PathLike, name: str) -> str:
    if not Path(root).is_dir():
        raise SpecError(f"{name}: the image root {root} is not a folder")
    return str(root)


def _has_image(folder: str) -> bool:
    return any(f.lower().endswith(IMAGE_SUFFIXES) for _, _, files in os.walk(folder) for f in files)


def _first_char(path: Path) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(4096).lstrip()[:1]


def _sniff_jsonl(path: Path) -> str:
    """The kind the first JSON object among the first lines says: llava if it has `conversations`, edits if it
    has an `instruction` or both `source` and `target`, else captions."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for _, line in zip(range(SNIFF_LINES), f, strict=False):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                return _record_kind(record)
    return "captions"


def _record_kind(record: dict) -> str:
    if "conversations" in record:
        return "llava"
    if "instruction" in record or {"source", "target"} <= record.keys():
        return "edits"
    return "captions"


def _is_spec_file(path: Path) -> bool:
    if path.suffix in (".yaml", ".yml"):
        return True
    return path.suffix == ".json" and path.is_file() and _first_char(path) == "{"


def _read_spec_file(path: Path, image_root: str | None) -> list[Source]:
    """The sources of a YAML/JSON spec file: {"sources": [{path, weight, kind, image_root}, ...]}."""
    if not path.is_file():
        raise SpecError(f"the spec file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML reads JSON too
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SpecError(f"{path} is not valid YAML or JSON: {e}") from e
    entries = spec.get("sources") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise SpecError(f"{path}: expected an object with a non-empty list `sources`")
    return [_spec_file_source(entry, path, k, image_root) for k, entry in enumerate(entries)]


def _spec_file_source(entry, path: Path, k: int, image_root: str | None) -> Source:
    name = f"{path}: sources[{k}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        raise SpecError(f"{name} must be an object with a string `path`")
    unknown = sorted(set(entry) - set(SPEC_FILE_FIELDS))
    if unknown:
        raise SpecError(f"{name}: unknown field {unknown[0]!r}; the fields: {', '.join(SPEC_FILE_FIELDS)}")
    base = path.parent
    own_root = entry.get("image_root")
    if own_root is not None and not isinstance(own_root, str):
        raise SpecError(f"{name}: image_root must be a path")
    return make_source(str(base / entry["path"]), weight=_check_weight(entry.get("weight", 1.0), name,
                                                                       entry.get("weight")),
                       kind=entry.get("kind"), image_root=None if own_root is None else str(base / own_root),
                       default_root=image_root, name=f"{name} ({entry['path']})")
