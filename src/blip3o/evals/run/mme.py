"""MME: the benchmark's folder as distributed (MME_Benchmark_release_version) in, its eval_tool's files out.

    DATA/<task>/images/*.jpg + DATA/<task>/questions_answers_YN/*.txt     artwork, celebrity, landmark, posters, scene
    DATA/<task>/*.jpg|*.png + DATA/<task>/*.txt                           the other nine tasks

Each question file holds its image's questions, a line each: `question<TAB>Yes|No`. Out, per task found:

    OUT/<task>.txt        a line per question, image by image in name order: image, question, answer, prediction,
                          separated by tabs (the prediction on one line)
    OUT/settings.json     how they were made;  OUT/parts/  the answers as they were saved

which eval_tool's calculation.py scores: `python calculation.py --results_dir OUT`. The model reads each question
as lmms-eval's MME task gives it: " Please answer yes or no." replaced by its post-prompt, "\\nAnswer the question
using a single word or phrase.", at most 16 new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blip3o.cli.errors import BadInput
from blip3o.cli.files import read_text
from blip3o.evals.run.understanding import SHORT_ANSWER, Question, image_file, one_line
from blip3o.files import write_text

TASKS = {
    "Perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                   "OCR"),
    "Cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}
ALL_TASKS = TASKS["Perception"] + TASKS["Cognition"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
YES_OR_NO = " Please answer yes or no."
POST_PROMPT = "\n" + SHORT_ANSWER
MAX_NEW_TOKENS = 16  # lmms-eval's MME task


@dataclass(frozen=True)
class MmeQuestion:
    task: str
    image: Path
    question: str  # as the question file has it
    answer: str  # Yes or No, as the question file has it
    key: str  # task/file/line: where its answer is filed


def mme_root(data: str) -> Path:
    """The folder holding MME's task folders: DATA, or DATA/MME_Benchmark as some copies nest it."""
    root = Path(data)
    if not root.is_dir():
        raise BadInput(f"--data {data}: no such folder (MME_Benchmark_release_version, as distributed)")
    if not any((root / task).is_dir() for task in ALL_TASKS) and (root / "MME_Benchmark").is_dir():
        root = root / "MME_Benchmark"
    if not any((root / task).is_dir() for task in ALL_TASKS):
        raise BadInput(f"--data {data}: none of MME's task folders ({', '.join(ALL_TASKS)}) is in it")
    return root


def task_questions(root: Path, task: str) -> list[MmeQuestion]:
    """A task's questions, image by image in name order, each image's in file order."""
    folder = root / task
    split = (folder / "questions_answers_YN").is_dir()
    question_folder, image_folder = (folder / "questions_answers_YN", folder / "images") if split else (folder, folder)
    images = {p.stem: p for p in sorted(image_folder.glob("*")) if p.suffix.lower() in IMAGE_SUFFIXES}
    questions = []
    for file in sorted(question_folder.glob("*.txt")):
        if file.stem not in images:
            raise BadInput(f"{file}: no image {file.stem}{{{','.join(IMAGE_SUFFIXES)}}} in {image_folder}")
        questions += read_question_file(file, task, images[file.stem])
    return questions


def read_question_file(file: Path, task: str, image: Path) -> list[MmeQuestion]:
    text = read_text(file)
    questions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.strip().split("\t")
        if len(fields) != 2 or fields[1].strip().lower() not in ("yes", "no"):
            raise BadInput(f"{file}:{number}: expected a question, a tab, then Yes or No; got {line.strip()!r}")
        questions.append(MmeQuestion(task, image, fields[0], fields[1].strip(), f"{task}/{file.stem}/{number}"))
    return questions


def mme_questions(data: str) -> list[MmeQuestion]:
    """Every question of every MME task the folder holds, task by task in MME's order."""
    root = mme_root(data)
    return [q for task in ALL_TASKS if (root / task).is_dir() for q in task_questions(root, task)]


def mme_prompt(question: str) -> str:
    """The question as lmms-eval's MME task asks it: its yes-or-no request replaced by the post-prompt."""
    return question.strip().replace(YES_OR_NO, "") + POST_PROMPT


def as_questions(questions: list[MmeQuestion]) -> list[Question]:
    return [Question(q.key, mme_prompt(q.question), image_file(q.image)) for q in questions]


def write_mme(out: Path, questions: list[MmeQuestion], answers: dict[str, str]) -> list[Path]:
    """OUT/<task>.txt for each task answered."""
    lines: dict[str, list[str]] = {}
    for q in questions:
        lines.setdefault(q.task, []).append(f"{q.image.name}\t{q.question}\t{q.answer}\t{one_line(answers[q.key])}\n")
    return [write_text(out / f"{task}.txt", "".join(task_lines)) for task, task_lines in lines.items()]
