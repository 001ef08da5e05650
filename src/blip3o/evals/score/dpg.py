"""DPG-Bench: a judge answers yes/no questions about each prompt's image; the score is the mean over prompts x 100.

The input is one JSON line a prompt, its questions from `dpg_bench.csv` in the order of its rows and the
judge's answer for each image tile (the official script cuts a 2x2 grid of the prompt's four samples into
four tiles):

    {"item_id": "partiprompts10",
     "questions": [{"proposition_id": 1, "dependency": [0], "tuple": "entity - whole (bridge)",
                    "answers": ["yes", "yes", "no", "yes"]},
                   {"proposition_id": 2, "dependency": [1], "tuple": "attribute - color (bridge, red)",
                    "answers": ["yes", "no", "no", "yes"]}]}

`dependency` is the CSV's column as a list: the ids of the parent questions, 0 for none. As
`compute_dpg_bench.py` scores a tile: a question counts 1 when its answer is exactly "yes", and 0 when
any parent counts 0 (questions taken in the order given, so a zero passes on to the questions after it);
the tile scores the mean over its questions, the prompt the mean over its tiles. The category figures are
the official ones too: each question's answer on the last tile, without the parent rule, pooled by the
category its `tuple` names ("entity - whole" before the parenthesis; "entity" before the dash).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .inputs import BadScoreInput, need, need_strings, read_jsonl


@dataclass(frozen=True)
class DPGQuestion:
    proposition_id: int
    parents: tuple[int, ...]  # proposition ids; 0 (no parent) left out
    category: str  # "entity - whole": the tuple's text before "("
    answers: tuple[str, ...]  # the judge's, one a tile


def tile_score(questions: list[DPGQuestion], tile: int) -> float:
    """One tile's score: the mean over questions of yes (1) or no (0), zero where a parent counts zero."""
    counts: dict[int, int] = {}
    for question in questions:
        counts[question.proposition_id] = int(question.answers[tile] == "yes")
    for question in questions:
        if any(counts[parent] == 0 for parent in question.parents):
            counts[question.proposition_id] = 0
    return sum(counts.values()) / len(counts)


def prompt_score(questions: list[DPGQuestion]) -> float:
    """The mean over tiles of `tile_score`."""
    tiles = len(questions[0].answers)
    return sum(tile_score(questions, tile) for tile in range(tiles)) / tiles


@dataclass(frozen=True)
class DPGScore:
    prompts: dict[str, float]  # item_id -> prompt score in [0, 1]
    categories: dict[str, list[int]]  # "entity - whole" -> each question's last-tile yes (1) or no (0)

    @property
    def overall(self) -> float:
        return sum(self.prompts.values()) / len(self.prompts) * 100

    def category_scores(self, level: int) -> dict[str, float]:
        """Per category x 100: level 1 pools "entity - whole" and "entity - part" into "entity", level 2 keeps
        them apart."""
        pooled: dict[str, list[int]] = {}
        for name, counts in self.categories.items():
            pooled.setdefault(name.split("-")[0].strip() if level == 1 else name, []).extend(counts)
        return {name: sum(counts) / len(counts) * 100 for name, counts in sorted(pooled.items())}

    def to_json(self) -> dict:
        return {"overall": self.overall, "categories": self.category_scores(1),
                "subcategories": self.category_scores(2), "prompts": len(self.prompts)}

    def report(self) -> str:
        lines = ["categories:"]
        lines += [f"  {name:<28}{value:>8.2f}" for name, value in self.category_scores(1).items()]
        lines.append("subcategories:")
        lines += [f"  {name:<28}{value:>8.2f}" for name, value in self.category_scores(2).items()]
        lines.append(f"DPG-Bench score over {len(self.prompts)} prompts: {self.overall:.2f}")
        return "\n".join(lines)


def read_prompt(where: str, record: dict) -> tuple[str, list[DPGQuestion]]:
    """(item_id, questions) of one line, checked: ids once each, parents among them, one answer a tile."""
    item_id = need(record, "item_id", str, where)
    items = need(record, "questions", list, where)
    if not items:
        raise BadScoreInput(f"{where}: field 'questions' is empty")
    questions = [_read_question(item, f"{where}, questions[{number}]") for number, item in enumerate(items, 1)]
    ids = [question.proposition_id for question in questions]
    for number, question in enumerate(questions, start=1):
        here = f"{where}, questions[{number}]"
        if ids.count(question.proposition_id) > 1:
            raise BadScoreInput(f"{here}: proposition_id {question.proposition_id} appears twice")
        missing = [parent for parent in question.parents if parent not in ids]
        if missing:
            raise BadScoreInput(f"{here}: dependency names proposition {missing[0]}, which this prompt lacks")
        if len(question.answers) != len(questions[0].answers):
            raise BadScoreInput(f"{here}: {len(question.answers)} answers, but questions[1] has "
                                f"{len(questions[0].answers)}: every question needs one answer a tile")
    return item_id, questions


def _read_question(item: object, where: str) -> DPGQuestion:
    if not isinstance(item, dict):
        raise BadScoreInput(f"{where}: must be a JSON object")
    dependency = need(item, "dependency", list, where)
    if not all(isinstance(parent, int) and not isinstance(parent, bool) for parent in dependency):
        raise BadScoreInput(f"{where}: field 'dependency' must be a list of proposition ids (0 for none)")
    tuple_text = need(item, "tuple", str, where)
    return DPGQuestion(need(item, "proposition_id", int, where), tuple(parent for parent in dependency if parent),
                       tuple_text.split("(")[0].strip(), tuple(need_strings(item, "answers", where)))


def score_dpg(path: str | Path) -> DPGScore:
    """The DPG-Bench score of a judge's answers file."""
    prompts: dict[str, float] = {}
    categories: dict[str, list[int]] = {}
    for where, record in read_jsonl(path):
        item_id, questions = read_prompt(where, record)
        if item_id in prompts:
            raise BadScoreInput(f"{where}: item_id {item_id!r} appears twice")
        prompts[item_id] = prompt_score(questions)
        for question in questions:
            categories.setdefault(question.category, []).append(int(question.answers[-1] == "yes"))
    return DPGScore(prompts, categories)
