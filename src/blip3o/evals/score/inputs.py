"""The files scorers read: JSON, JSON lines and plain text, each problem a `BadScoreInput` naming file, line and field.

A record comes with `where`, the place a message names: `PATH:LINE` for a JSON-lines record, `PATH, record N`
(counted from 1) for an item of a JSON list, `PATH, id ID` for a value of a JSON object keyed by id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blip3o.files import json_lines


class BadScoreInput(ValueError):
    """A benchmark file that cannot be scored as given; the message names the file, line and field."""


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file; universal newlines, so `\\r\\n` line ends read as `\\n`."""
    file = Path(path)
    if not file.is_file():
        raise BadScoreInput(f"{path}: no such file")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadScoreInput(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def read_json(path: str | Path) -> Any:
    """The value of a JSON file."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise BadScoreInput(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e


def read_jsonl(path: str | Path) -> list[tuple[str, dict]]:
    """(where, object) for each non-blank line of a JSON-lines file."""
    records = [(f"{path}:{number}", record) for number, record in json_lines(read_text(path), path, BadScoreInput)]
    if not records:
        raise BadScoreInput(f"{path}: holds no records")
    return records


def read_records(path: str | Path, value_field: str | None = None) -> list[tuple[str, dict]]:
    """(where, object) for each record of a JSON-lines file, of a JSON list of objects, or of a JSON object keyed
    by id: its values are the records (given `id`), or with `value_field` may be plain values too (`{ID: VALUE}`
    reads as `{"id": ID, value_field: VALUE}`)."""
    if Path(path).suffix == ".jsonl":
        return read_jsonl(path)
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError:  # an object a line
        return read_jsonl(path)
    if isinstance(value, list):
        items = [(f"{path}, record {number}", item) for number, item in enumerate(value, start=1)]
    elif isinstance(value, dict):
        items = [(f"{path}, id {key}", _keyed(key, item, value_field)) for key, item in value.items()]
    else:
        raise BadScoreInput(f"{path}: must hold a list of records or an object keyed by id")
    for where, item in items:
        if not isinstance(item, dict):
            raise BadScoreInput(f"{where}: each record must be a JSON object")
    if not items:
        raise BadScoreInput(f"{path}: holds no records")
    return items


def _keyed(key: str, item: Any, value_field: str | None) -> Any:
    if isinstance(item, dict):
        return {**item, "id": key}
    return {"id": key, value_field: item} if value_field else item


def need(record: dict, name: str, kinds: type | tuple[type, ...], where: str) -> Any:
    """record[name], checked to be of `kinds` (a bool is a number only where `kinds` names bool)."""
    if name not in record:
        raise BadScoreInput(f"{where}: missing field {name!r}")
    value = record[name]
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        shown = [kind for kind in kinds if not (kind is int and float in kinds)]  # a number covers whole ones
        names = " or ".join(_JSON_NAMES.get(kind, kind.__name__) for kind in shown)
        raise BadScoreInput(f"{where}: field {name!r} must be {names}, got {json.dumps(value)[:80]}")
    return value


def need_strings(record: dict, name: str, where: str) -> list[str]:
    """record[name] as a non-empty list of strings."""
    values = need(record, name, list, where)
    if not values or not all(isinstance(value, str) for value in values):
        raise BadScoreInput(f"{where}: field {name!r} must be a non-empty list of strings")
    return values


_JSON_NAMES = {str: "a string", int: "a whole number", float: "a number", bool: "true or false", list: "a list",
               dict: "an object"}
