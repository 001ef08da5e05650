"""Part configs from plain dicts (saved JSON), for parts that come in several kinds."""

from __future__ import annotations

import dataclasses
from typing import Any


def config_from_dict(kinds: dict[str, type], d: Any, what: str) -> Any:
    """The config of the kind named by d["kind"] (a key of `kinds`, whose values are dataclasses).

    Fields left out keep that kind's defaults; a JSON list becomes a tuple where the field's default
    is one. An unknown kind or field raises ValueError naming what is known.
    """
    if not isinstance(d, dict) or "kind" not in d:
        raise ValueError(f"a {what} config is a dict with a 'kind' (one of {sorted(kinds)}), got {d!r}")
    kind = d["kind"]
    if kind not in kinds:
        raise ValueError(f"unknown {what} kind {kind!r}; known kinds: {sorted(kinds)}")
    fields = {f.name: f for f in dataclasses.fields(kinds[kind])}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown fields {unknown} for {what} kind {kind!r}; its fields: {sorted(fields)}")
    tuples = {n for n, f in fields.items() if isinstance(f.default, tuple)}
    return kinds[kind](**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in d.items()})
