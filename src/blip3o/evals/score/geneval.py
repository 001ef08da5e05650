"""GenEval: the share of correct images per task tag; the score is the mean of the tags' shares.

The input is the official detector's output (`evaluate_images.py --outfile results.jsonl`): one JSON
line an image with `tag` (single_object, two_object, counting, colors, position, color_attr), `correct`
(true when the detector found what the prompt asks) and `metadata` (the prompt's metadata line as a
string, which tells prompts apart), as `summary_scores.py` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .inputs import need, read_jsonl


@dataclass(frozen=True)
class TagScore:
    correct: int  # images judged correct
    images: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.images


@dataclass(frozen=True)
class GenEvalScore:
    tags: dict[str, TagScore]  # in the order the results first name them
    images: int
    prompts: int
    correct_images: float  # share of all images judged correct
    correct_prompts: float  # share of prompts with at least one image judged correct

    @property
    def overall(self) -> float:
        """The mean over tags of each tag's share of correct images."""
        return sum(tag.accuracy for tag in self.tags.values()) / len(self.tags)

    def to_json(self) -> dict:
        return {"overall": self.overall, "tags": {name: tag.accuracy for name, tag in self.tags.items()},
                "images": self.images, "prompts": self.prompts, "correct_images": self.correct_images,
                "correct_prompts": self.correct_prompts}

    def report(self) -> str:
        lines = [f"images: {self.images}  prompts: {self.prompts}",
                 f"correct images: {self.correct_images:.2%}  correct prompts: {self.correct_prompts:.2%}", ""]
        lines += [f"{name:<16} = {tag.accuracy:.2%} ({tag.correct} / {tag.images})" for name, tag in self.tags.items()]
        lines += ["", f"overall score (mean over tags): {self.overall:.5f}"]
        return "\n".join(lines)


def score_geneval(path: str | Path) -> GenEvalScore:
    """The summary of a GenEval results file."""
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, list[bool]] = {}
    for where, record in read_jsonl(path):
        correct = need(record, "correct", bool, where)
        by_tag.setdefault(need(record, "tag", str, where), []).append(correct)
        by_prompt.setdefault(need(record, "metadata", str, where), []).append(correct)
    images = [correct for results in by_tag.values() for correct in results]
    return GenEvalScore(
        tags={tag: TagScore(sum(results), len(results)) for tag, results in by_tag.items()},
        images=len(images), prompts=len(by_prompt), correct_images=sum(images) / len(images),
        correct_prompts=sum(any(results) for results in by_prompt.values()) / len(by_prompt))
