"""Stage options: one frozen dataclass per stage (and per auxiliary), each field a checked kind.

A TrainConfig's `stage_options` dict becomes these dataclasses. A key that no dataclass of the stage
declares, and a value of the wrong kind, are refused with a ValueError naming the option:

    stage option prompt_share must be a share in [0, 1], got 1.5
    stage option dit_steps must be an integer >= 1 and at most 10000, got 1000000000
    stage option draws is not an option of the generation stage; its options: condition_drop, ...
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from blip3o.checkpoints.limits import MAX_STEPS


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _option(default: Any, must: str, valid: Callable[[Any], bool], convert: Callable[[Any], Any]) -> Any:
    return dataclasses.field(default=default, metadata={"must": must, "valid": valid, "convert": convert})


def weight(default: float = 0.0) -> Any:
    """A loss weight: a finite number >= 0."""
    return _option(default, "a weight >= 0", lambda v: _is_number(v) and v >= 0, float)


def nonnegative(default: float = 0.0) -> Any:
    """A finite number >= 0 (a standard deviation, a scale)."""
    return _option(default, "a number >= 0", lambda v: _is_number(v) and v >= 0, float)


def positive(default: float) -> Any:
    """A finite number > 0 (a scale that must act)."""
    return _option(default, "a number > 0", lambda v: _is_number(v) and v > 0, float)


def names(default: tuple[str, ...]) -> Any:
    """A non-empty list of non-empty strings (a JSON list or a tuple), kept as a tuple."""
    def valid(v: Any) -> bool:
        return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, str) and x for x in v)

    return _option(default, "a non-empty list of names", valid, tuple)


def share(default: float | None = None) -> Any:
    """A probability: a number in [0, 1] (None where the default is None: the option is off)."""
    return _option(default, "a share in [0, 1]", lambda v: (v is None and default is None)
                   or (_is_number(v) and 0.0 <= v <= 1.0), lambda v: v if v is None else float(v))


def count(default: int, minimum: int = 0, maximum: int = MAX_STEPS) -> Any:
    """An integer in [minimum, maximum] (bools are refused); the default maximum is a sampling step count's."""
    return _option(default, f"an integer >= {minimum} and at most {maximum}",
                   lambda v: isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= maximum, int)


def flag(default: bool = False) -> Any:
    """true or false."""
    return _option(default, "true or false", lambda v: isinstance(v, bool), bool)


def choice(default: str, *choices: str) -> Any:
    """One of the given strings."""
    return _option(default, " or ".join(repr(c) for c in (default, *choices)), lambda v: v in (default, *choices), str)


def time_range(default: tuple[float, float]) -> Any:
    """[lo, hi] with 0 < lo <= hi <= 1 (a JSON list or a tuple)."""
    def valid(v: Any) -> bool:
        return (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v)
                and 0.0 < v[0] <= v[1] <= 1.0)

    return _option(default, "[lo, hi] with 0 < lo <= hi <= 1", valid, lambda v: (float(v[0]), float(v[1])))


@dataclass(frozen=True)
class StageOptions:
    """Base of the options dataclasses: every field declared with one of the kinds above is checked on
    construction and converted (ints given for weights become floats, lists for ranges tuples)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.metadata["valid"](value):
                raise ValueError(f"stage option {f.name} must be {f.metadata['must']}, got {value!r}")
            object.__setattr__(self, f.name, f.metadata["convert"](value))

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def split_options(stage: str, options: Mapping[str, Any], groups: list[type[StageOptions]]) -> list[dict]:
    """The options dict split into one dict per group (the keys each group's dataclass declares); a key
    that no group declares is refused."""
    known = [name for group in groups for name in group.names()]
    if not isinstance(options, Mapping):
        raise ValueError(f"stage_options must be a mapping of option names to values, got {options!r}")
    for name in options:
        if name not in known:
            raise ValueError(f"stage option {name} is not an option of the {stage} stage; its options: "
                             f"{', '.join(sorted(known)) or 'none'}")
    return [{k: v for k, v in options.items() if k in group.names()} for group in groups]
