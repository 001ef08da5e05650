"""Numeric flags with a range: argparse refuses a value out of range (NaN and the infinities included) while it
parses, naming the flag and the range, so nothing loads or runs for a number the command cannot use.

    count("--num-images", high=MAX_IMAGES, default=1)     # a whole number from 1 to high
    whole("--canonical-jitter", low=0, high=3)            # a whole number from low to high
    number("--guidance", low=0, high=100)                 # a finite float in [low, high]
    number("--scale", low=0, high=100, low_open=True)     # ... in (low, high]
    seed("--seed", default=0)                             # what torch.Generator.manual_seed takes, from 0
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from blip3o.cli.table import Flag, flag

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's largest seed


@dataclass(frozen=True)
class Bounds:
    """The values a numeric flag takes: low..high, low itself excluded when `low_open`."""

    low: float
    high: float
    low_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return (value > self.low if self.low_open else value >= self.low) and value <= self.high

    def __str__(self) -> str:
        high = "2**64 - 1" if self.high == MAX_SEED else f"{self.high:g}"
        return f"{'(' if self.low_open else '['}{self.low:g}, {high}]"

    def refusal(self, name: str, value: float) -> str:
        """What the user is told: `--steps must be positive ...` for a count, else `--eta 2.0 is not in [0, 1]`."""
        if isinstance(value, int) and self.low == 1:
            return f"{name} must be positive and at most {self.high:,}, got {value}"
        return f"{name} {value} is not in {self}"


class InRange(argparse.Action):
    """argparse action: store the value (already converted by the flag's `type`) if `bounds` hold it, else a
    usage error (exit 2) naming the flag and the bounds."""

    def __init__(self, option_strings: list[str], dest: str, *, bounds: Bounds, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.bounds = bounds

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        if value not in self.bounds:
            parser.error(self.bounds.refusal(option_string or self.dest, value))
        setattr(namespace, self.dest, value)


def bounded(*names: str, kind: type, bounds: Bounds, **options: Any) -> Flag:
    """A flag of `kind` (int or float) whose values `bounds` holds; `options` as for `flag`."""
    return flag(*names, type=kind, action=InRange, bounds=bounds, **options)


def count(*names: str, high: int, **options: Any) -> Flag:
    """A whole number from 1 to `high` (images, steps, tokens, batch sizes, ...)."""
    return bounded(*names, kind=int, bounds=Bounds(1, high), metavar="N", **options)


def whole(*names: str, low: int, high: int, **options: Any) -> Flag:
    """A whole number from `low` to `high`."""
    return bounded(*names, kind=int, bounds=Bounds(low, high), **options)


def number(*names: str, low: float, high: float, low_open: bool = False, **options: Any) -> Flag:
    """A finite number in [low, high] ((low, high] when `low_open`)."""
    return bounded(*names, kind=float, bounds=Bounds(low, high, low_open), **options)


def seed(*names: str, **options: Any) -> Flag:
    """A random seed: a whole number from 0 to 2**64 - 1, as a torch generator takes it."""
    return whole(*names, low=0, high=MAX_SEED, **options)
