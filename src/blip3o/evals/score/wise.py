"""WISE: a judge scores each prompt's image; the WiScore weighs the categories' means by their share of prompts.

The input is the judge's scores file(s) (`gpt_eval.py --result_scores`), one JSON line a prompt:

- WISE: `{"prompt_id": 17, "consistency": 2, "realism": 1, "aesthetic_quality": 1}`, each in 0..2 (the judge
  gives 0, 1 or 2); a prompt scores (0.7 consistency + 0.2 realism + 0.1 aesthetic_quality) / 2, in [0, 1].
- WISE-Verified (`--verified`): `{"prompt_id": 17, "score": 1}`, 0 or 1; a prompt scores its score.

As `Calculate.py` (and `calculate_verified.py`): the prompt ids 1..1000 fall into six categories by range,
each category scores its prompts' mean, and the overall WiScore is the weighted sum of the six, given only
when every prompt id has a score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .inputs import BadScoreInput, need, read_jsonl

PROMPT_IDS = range(1, 1001)


@dataclass(frozen=True)
class Variant:
    """A WISE release: its categories' prompt id ranges and weights, and how a judge line scores."""

    name: str
    categories: dict[str, tuple[range, float]]  # category -> (its prompt ids, its weight in the overall)
    fields: tuple[str, ...]  # the judge's figures on a line
    top: int  # each figure lies in 0..top
    whole: bool  # each figure is a whole number
    other_flag: str  # what to pass for the other release's files

    def prompt_score(self, figures: dict[str, float]) -> float:
        if self.fields == ("score",):
            return float(figures["score"])
        return (0.7 * figures["consistency"] + 0.2 * figures["realism"] + 0.1 * figures["aesthetic_quality"]) / 2

    def category(self, prompt_id: int) -> str:
        return next(name for name, (ids, _) in self.categories.items() if prompt_id in ids)


WISE = Variant("WISE", {
    "cultural": (range(1, 401), 0.4),
    "time": (range(401, 568), 0.167),
    "space": (range(568, 701), 0.133),
    "biology": (range(701, 801), 0.1),
    "physics": (range(801, 901), 0.1),
    "chemistry": (range(901, 1001), 0.1),
}, fields=("consistency", "realism", "aesthetic_quality"), top=2, whole=False, other_flag="--verified")

WISE_VERIFIED = Variant("WISE-Verified", {
    "cultural": (range(1, 401), 0.4),
    "time": (range(401, 521), 0.12),
    "space": (range(521, 641), 0.12),
    "biology": (range(641, 761), 0.12),
    "physics": (range(761, 881), 0.12),
    "chemistry": (range(881, 1001), 0.12),
}, fields=("score",), top=1, whole=True, other_flag="no --verified")


@dataclass(frozen=True)
class WISEScore:
    variant: Variant
    scores: dict[str, list[float]]  # category -> its prompts' scores
    missing: list[int] = field(default_factory=list)  # prompt ids of 1..1000 with no score

    @property
    def categories(self) -> dict[str, float]:
        """Each category with a score: the mean of its prompts' scores."""
        return {name: sum(self.scores[name]) / len(self.scores[name]) for name in self.variant.categories
                if self.scores.get(name)}

    @property
    def overall(self) -> float | None:
        """The categories' means weighed by the variant's weights; None while prompts lack a score."""
        if self.missing:
            return None
        means = self.categories
        return sum(weight * means[name] for name, (_, weight) in self.variant.categories.items())

    def to_json(self) -> dict:
        return {"overall": self.overall, "categories": self.categories,
                "counts": {name: len(self.scores.get(name, [])) for name in self.variant.categories},
                "missing_prompt_ids": self.missing, "variant": self.variant.name}

    def report(self) -> str:
        lines = [f"{self.variant.name}", f"{'category':<12}{'WiScore':>9}{'prompts':>9}"]
        lines += [f"{name:<12}{mean:>9.2f}{len(self.scores[name]):>9}" for name, mean in self.categories.items()]
        if self.overall is None:
            shown = ", ".join(map(str, self.missing[:10])) + (", ..." if len(self.missing) > 10 else "")
            lines.append(f"overall: needs a score for every prompt id 1..1000; {len(self.missing)} have none ({shown})")
        else:
            lines.append(f"{'overall':<12}{self.overall:>9.2f}")
        return "\n".join(lines)


def score_wise(paths: list[str | Path], verified: bool = False) -> WISEScore:
    """The WiScore of one or more judge score files (WISE-Verified's binary scores with `verified`)."""
    variant = WISE_VERIFIED if verified else WISE
    scores: dict[str, list[float]] = {}
    seen: dict[int, str] = {}
    for path in paths:
        for where, record in read_jsonl(path):
            prompt_id = need(record, "prompt_id", int, where)
            if prompt_id not in PROMPT_IDS:
                raise BadScoreInput(f"{where}: prompt_id must be in 1..1000, got {prompt_id}")
            if prompt_id in seen:
                raise BadScoreInput(f"{where}: prompt_id {prompt_id} is scored twice (first at {seen[prompt_id]})")
            seen[prompt_id] = where
            figures = {name: _figure(record, name, variant, where) for name in variant.fields}
            scores.setdefault(variant.category(prompt_id), []).append(variant.prompt_score(figures))
    return WISEScore(variant, scores, [prompt_id for prompt_id in PROMPT_IDS if prompt_id not in seen])


def _figure(record: dict, name: str, variant: Variant, where: str) -> float:
    if name not in record and any(other in record for other in (WISE.fields + WISE_VERIFIED.fields)):
        raise BadScoreInput(f"{where}: missing field {name!r}: a {variant.name} file has "
                            f"{', '.join(variant.fields)} (for the other release's files, pass {variant.other_flag})")
    value = need(record, name, (int, float), where)
    if not 0 <= value <= variant.top or (variant.whole and value != int(value)):
        allowed = " or ".join(map(str, range(variant.top + 1))) if variant.whole else f"in 0..{variant.top}"
        raise BadScoreInput(f"{where}: field {name!r} must be {allowed}, got {value}")
    return value
