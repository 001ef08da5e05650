"""What reading a data set skipped, and why: the counts a trainer logs and `blip3o data check` prints.

A sample that cannot be used is skipped, never fatal and never silent: it becomes a `Problem` (which file,
which line, member key or item, the reason, the message) counted under its reason in `DataStats`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

MAX_PROBLEMS_KEPT = 20  # DataStats keeps the first problems whole; the rest are counted only

# Every reason a sample or a shard is skipped for, and what it means.
REASONS: dict[str, str] = {
    "bad_json": "a line, member or array item that is not a JSON object",
    "no_image": "an image-text sample without an image (tar member, `image` field or image file)",
    "no_text": "an image-text sample without a caption (`txt` member, or `caption`, `prompt` or `text`)",
    "image_missing": "an image path that does not exist",
    "image_invalid": "an image that does not decode (corrupt, truncated, a mode or size the model cannot read)",
    "image_too_large": "an image past the byte or pixel limit (a decompression bomb is refused unread)",
    "image_unsupported": "a file that is not an image in an accepted format",
    "no_conversations": "a conversation record without a non-empty `conversations` list",
    "bad_turn": "a turn that is not {\"from\": human|gpt|system, \"value\": str}, or no gpt turn at all",
    "image_count": "`<image>` placeholders that do not match the record's images one to one",
    "no_source": "an edit triplet without its source images (`src.*` member, or a `srcN.*` left out; `source`)",
    "no_target": "an edit triplet without its target image (`tgt.*` member, `target` path)",
    "no_instruction": "an edit triplet without an instruction (`txt` member or `instruction`, empty or missing)",
    "bad_shard": "a tar shard that cannot be opened or breaks off (the samples before the break count)",
}


class Skip(Exception):
    """A raw record that cannot become a sample; `reason` is a key of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Problem:
    """One skipped sample or shard."""

    file: str  # the shard, JSONL/JSON file or image file
    at: str  # where in it: "line 12", "key 000123", "item 7"; "" for the file as a whole
    reason: str  # a key of REASONS
    message: str

    def __str__(self) -> str:
        where = f"{self.file}, {self.at}" if self.at else self.file
        return f"{where}: {self.reason}: {self.message}"


@dataclass
class DataStats:
    """Samples read and problems met: counts by reason, and the first MAX_PROBLEMS_KEPT problems whole."""

    good: int = 0
    bad: Counter = field(default_factory=Counter)  # reason -> count
    problems: list[Problem] = field(default_factory=list)

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())

    def add(self, problem: Problem) -> None:
        self.bad[problem.reason] += 1
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(problem)

    def summary(self) -> str:
        """`1200 good, 3 bad (image_invalid 2, no_text 1)`."""
        if not self.bad:
            return f"{self.good} good, 0 bad"
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.bad.items()))
        return f"{self.good} good, {self.bad_total} bad ({reasons})"

    def state_dict(self) -> dict:
        """Plain values only: a checkpoint loads it with torch.load(weights_only=True)."""
        return {"good": self.good, "bad": dict(self.bad), "problems": [asdict(p) for p in self.problems]}

    def load_state_dict(self, state: dict) -> None:
        self.good = int(state["good"])
        self.bad = Counter({str(k): int(v) for k, v in state["bad"].items()})
        self.problems = [Problem(**p) for p in state["problems"]]
