"""`blip3o data check`: read a data set once, in order, and say what a training run would get from it.

Per source and in total: good samples, bad ones by reason; the images (count, modes, shorter and longer side);
the captions' words; the conversations' turns and images; the edits' sources and instructions' words; the first
problems with file and line or key.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field

from .spec import Source, parse_spec
from .stats import MAX_PROBLEMS_KEPT, DataStats
from .stream import StreamingDataset


def spread(values: list[int]) -> dict | None:
    """{"min", "median", "max"} of some numbers; None for none."""
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


@dataclass
class CheckReport:
    """What `check_dataset` found."""

    sources: list[tuple[Source, DataStats]]
    short_sides: list[int] = field(default_factory=list)
    long_sides: list[int] = field(default_factory=list)
    modes: Counter = field(default_factory=Counter)
    caption_words: list[int] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)  # turns per conversation
    conversation_images: list[int] = field(default_factory=list)  # images per conversation
    edit_sources: list[int] = field(default_factory=list)  # source images per edit
    instruction_words: list[int] = field(default_factory=list)  # words per edit instruction

    @property
    def total(self) -> DataStats:
        total = DataStats()
        for _, stats in self.sources:
            total.good += stats.good
            total.bad.update(stats.bad)
            total.problems += stats.problems[: max(0, MAX_PROBLEMS_KEPT - len(total.problems))]
        return total

    def add(self, sample: dict) -> None:
        """Count one good sample's images and texts."""
        if "messages" in sample:
            images = [p["image"] for m in sample["messages"] for p in m["content"] if p["type"] == "image"]
            self.turns.append(len(sample["messages"]))
            self.conversation_images.append(len(images))
        elif "sources" in sample:
            images = [*sample["sources"], sample["image"]]
            self.edit_sources.append(len(sample["sources"]))
            self.instruction_words.append(len(sample["instruction"].split()))
        else:
            images = [sample["image"]] if "image" in sample else []  # a CLIP-target cache row holds tokens instead
            self.caption_words.append(len(sample["text"].split()))
        for image in images:
            self.short_sides.append(min(image.size))
            self.long_sides.append(max(image.size))
            self.modes[image.mode] += 1

    def to_dict(self) -> dict:
        total = self.total
        return {
            "sources": [{"name": s.name, "kind": s.kind, "files": len(s.paths), "good": st.good, "bad": dict(st.bad)}
                        for s, st in self.sources],
            "good": total.good, "bad": dict(total.bad),
            "images": {"count": len(self.short_sides), "modes": dict(self.modes),
                       "short_side": spread(self.short_sides), "long_side": spread(self.long_sides)},
            "captions": {"count": len(self.caption_words), "words": spread(self.caption_words)},
            "conversations": {"count": len(self.turns), "turns": spread(self.turns),
                              "images": spread(self.conversation_images)},
            "edits": {"count": len(self.edit_sources), "sources": spread(self.edit_sources),
                      "instruction_words": spread(self.instruction_words)},
            "problems": [asdict(p) for p in total.problems],
        }

    def lines(self) -> list[str]:
        """The report for a terminal."""
        d, total = self.to_dict(), self.total
        out = [f"{s.name} ({s.kind}, {len(s.paths)} file{'s' * (len(s.paths) != 1)}): {st.summary()}"
               for s, st in self.sources]
        out.append(f"total: {total.summary()}")
        images = d["images"]
        if images["count"]:
            modes = ", ".join(f"{m} {n}" for m, n in self.modes.most_common())
            out.append(f"images: {images['count']} (modes {modes}); shorter side {_spread(images['short_side'])}, "
                       f"longer side {_spread(images['long_side'])} px")
        if d["captions"]["count"]:
            out.append(f"captions: {d['captions']['count']}, words {_spread(d['captions']['words'])}")
        if d["conversations"]["count"]:
            c = d["conversations"]
            out.append(f"conversations: {c['count']}, turns {_spread(c['turns'])}, images {_spread(c['images'])}")
        if d["edits"]["count"]:
            e = d["edits"]
            out.append(f"edits: {e['count']}, sources {_spread(e['sources'])}, instruction words "
                       f"{_spread(e['instruction_words'])}")
        if total.problems:
            out.append(f"first problems ({len(total.problems)} of {total.bad_total}):")
            out += [f"  {p}" for p in total.problems]
        return out


def _spread(s: dict) -> str:
    return f"min {s['min']:g} / median {s['median']:g} / max {s['max']:g}"


def check_dataset(spec: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                  limit: int | None = None) -> CheckReport:
    """Read every source of `spec` once, in order, decoding every sample (with `limit`: a source's first records
    until `limit` of them are counted, good or bad)."""
    report = CheckReport([])
    for source in parse_spec(spec, image_root=image_root):
        dataset = StreamingDataset([source], epochs=1, shuffle=False, window=1)
        for sample in dataset:
            if len(sample) > 1:  # not a sample that only carries problems
                report.add(sample)
            if limit is not None and dataset.stats.good + dataset.stats.bad_total >= limit:
                break
        report.sources.append((source, dataset.stats))
    return report
