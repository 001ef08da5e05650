"""MME: yes/no questions, two an image; a task scores 100 acc + 100 acc+, perception and cognition sum their tasks.

The input is the MME eval tool's folder: one `<task>.txt` per task, each line
`image<TAB>question<TAB>answer<TAB>prediction`, the two questions of an image on consecutive lines.
As the tool's `calculation.py`: the answer (`Yes`/`No`, any case) against the prediction read as yes, no
or other (`parse_yes_no`); acc is the share of questions answered right, acc+ the share of images with
both answered right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .inputs import BadScoreInput, read_text

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


@dataclass(frozen=True)
class TaskScore:
    """One task's figures; `score` = 100 acc + 100 acc_plus (at most 200)."""

    acc: float  # share of questions answered right
    acc_plus: float  # share of images whose two questions are both answered right
    other: int  # predictions read as neither yes nor no (they count as wrong)

    @property
    def score(self) -> float:
        return self.acc * 100 + self.acc_plus * 100


@dataclass(frozen=True)
class MMEScore:
    tasks: dict[str, TaskScore]  # every task of PERCEPTION and COGNITION

    @property
    def perception(self) -> float:
        return sum(self.tasks[task].score for task in PERCEPTION)

    @property
    def cognition(self) -> float:
        return sum(self.tasks[task].score for task in COGNITION)

    def to_json(self) -> dict:
        return {"perception": self.perception, "cognition": self.cognition,
                "tasks": {task: score.score for task, score in self.tasks.items()}}

    def report(self) -> str:
        lines = [f"{'task':<24}{'acc':>8}{'acc+':>8}{'score':>9}{'other':>7}"]
        for title, tasks, total in (("perception", PERCEPTION, self.perception),
                                    ("cognition", COGNITION, self.cognition)):
            for task in tasks:
                s = self.tasks[task]
                lines.append(f"{task:<24}{s.acc * 100:>8.2f}{s.acc_plus * 100:>8.2f}{s.score:>9.2f}{s.other:>7}")
            lines.append(f"{title + ' total':<40}{total:>9.2f}")
        return "\n".join(lines)


def parse_yes_no(prediction: str) -> str:
    """"yes", "no" or "other", as the eval tool reads a prediction: the lower-cased prediction when it is exactly
    yes or no, else whichever of "yes" (first) or "no" its first four characters contain."""
    reply = prediction.lower()
    if reply in ("yes", "no"):
        return reply
    head = reply[:4]
    if "yes" in head:
        return "yes"
    return "no" if "no" in head else "other"


def score_task(path: str | Path) -> TaskScore:
    """One `<task>.txt` file's acc, acc+ and count of unreadable predictions."""
    rows = _read_rows(path)
    if not rows:
        raise BadScoreInput(f"{path}: holds no questions")
    if len(rows) % 2:
        raise BadScoreInput(f"{path}:{rows[-1][0]}: the last question has no partner (MME asks two an image)")
    for (line, image, _, _), (next_line, next_image, _, _) in zip(rows[::2], rows[1::2], strict=True):
        if image != next_image:
            raise BadScoreInput(f"{path}:{line}-{next_line}: consecutive lines must be the two questions of one "
                                f"image, got {image!r} and {next_image!r}")
    read = [parse_yes_no(prediction) for *_, prediction in rows]
    right = [reading == answer for reading, (_, _, answer, _) in zip(read, rows, strict=True)]
    both = [first and second for first, second in zip(right[::2], right[1::2], strict=True)]
    return TaskScore(acc=sum(right) / len(right), acc_plus=sum(both) / len(both), other=read.count("other"))


def _read_rows(path: str | Path) -> list[tuple[int, str, str, str]]:
    """(line number, image, answer lower-cased, prediction) of each non-blank line."""
    rows = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            raise BadScoreInput(f"{path}:{number}: needs 4 tab-separated fields (image, question, answer, "
                                f"prediction), got {len(fields)}; a prediction holds no tab or line break")
        image, _, answer, prediction = fields
        if answer.lower() not in ("yes", "no"):
            raise BadScoreInput(f"{path}:{number}: the answer (field 3) must be Yes or No, got {answer!r}")
        rows.append((number, image, answer.lower(), prediction))
    return rows


def score_mme(folder: str | Path) -> MMEScore:
    """Every task of FOLDER (one `<task>.txt` each, all 14 needed)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BadScoreInput(f"{folder}: no such folder")
    missing = [f"{task}.txt" for task in PERCEPTION + COGNITION if not (folder / f"{task}.txt").is_file()]
    if missing:
        raise BadScoreInput(f"{folder}: missing {', '.join(missing)} (MME scores all 14 tasks)")
    return MMEScore({task: score_task(folder / f"{task}.txt") for task in PERCEPTION + COGNITION})
