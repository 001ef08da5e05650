"""VQAv2 and TextVQA: the official question JSON and its images folder in, EvalAI's predictions file out.

    VQAv2     v2_OpenEnded_mscoco_<subset>_questions.json: {"questions": [{"question_id", "image_id", "question"}]}
              with images COCO_<folder>_<image_id as 12 digits>.jpg (test2015/ holds test-dev's)
    TextVQA   TextVQA_0.5.1_<split>.json: {"data": [{"question_id", "image_id", "question", ...}]}
              with images <image_id>.jpg (train_images/ holds train's and val's)

    OUT/predictions.json    [{"question_id": int, "answer": str}, ...] in the file's order: EvalAI's submission
    OUT/settings.json       how they were made;  OUT/parts/  the answers as they were saved

The prompts are lmms-eval's: the question (TextVQA's capitalised, as its task does) then "\\nAnswer the question
using a single word or phrase."; at most 16 new tokens for VQAv2 (its task's limit) and 128 for TextVQA (the
original's model default, which its task keeps). Each answer is written on one line, trimmed; EvalAI normalises
answers further (punctuation, number words, articles) as it scores them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blip3o.cli.errors import BadInput
from blip3o.evals.run.understanding import SHORT_ANSWER, Question, image_file, one_line
from blip3o.evals.run.work import read_json
from blip3o.files import write_text


@dataclass(frozen=True)
class VqaFormat:
    name: str
    list_key: str  # the key of the question list in the JSON file
    image_id: type  # int (COCO ids) or str (TextVQA's hex ids)
    image_key: Callable[[str], object]  # image file name without suffix -> its image_id (None: not an image of it)
    capitalize: bool  # the question's first letter upper-cased, the rest lower-cased (str.capitalize)
    max_new_tokens: int


def coco_id(stem: str) -> int | None:
    """COCO_test2015_000000262144 -> 262144."""
    match = re.search(r"(\d+)$", stem)
    return int(match.group(1)) if match else None


VQAV2 = VqaFormat("vqav2", "questions", int, coco_id, capitalize=False, max_new_tokens=16)
TEXTVQA = VqaFormat("textvqa", "data", str, str, capitalize=True, max_new_tokens=128)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def image_index(folder: Path, image_key: Callable[[str], object]) -> dict:
    """image_id -> image file, for every image of `folder`."""
    if not folder.is_dir():
        raise BadInput(f"--images {folder}: no such folder")
    index = {}
    for path in folder.iterdir():
        key = image_key(path.stem) if path.suffix.lower() in IMAGE_SUFFIXES else None
        if key is not None:
            index[key] = path
    return index


def check_entry(fmt: VqaFormat, path: Path, number: int, entry) -> None:
    """BadInput naming the entry unless it has a whole-number question_id, an image_id and a question."""
    where = f"{path}: {fmt.list_key}[{number}]"
    if not isinstance(entry, dict):
        raise BadInput(f"{where} is not a JSON object")
    for key, kind in (("question_id", int), ("image_id", fmt.image_id), ("question", str)):
        value = entry.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is str and not value.strip()):
            raise BadInput(f"{where} needs {key!r}, a {'whole number' if kind is int else 'non-empty string'}")


def vqa_questions(fmt: VqaFormat, questions_file: str, images: str) -> list[Question]:
    """The file's questions as prompts, each with its image; a question whose image is missing is bad input."""
    path = Path(questions_file)
    document = read_json(path)
    entries = document.get(fmt.list_key) if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise BadInput(f"{path}: expected a JSON object whose {fmt.list_key!r} lists the questions ({fmt.name}'s "
                       f"question file)")
    index = image_index(Path(images), fmt.image_key)
    questions = []
    for number, entry in enumerate(entries):
        check_entry(fmt, path, number, entry)
        image = index.get(entry["image_id"])
        if image is None:
            raise BadInput(f"{path}: question {entry['question_id']} asks about image {entry['image_id']}, which "
                           f"is not in --images {images}")
        text = entry["question"].capitalize() if fmt.capitalize else entry["question"]
        questions.append(Question(str(entry["question_id"]), f"{text}\n{SHORT_ANSWER}", image_file(image)))
    if not questions:
        raise BadInput(f"{path} holds no questions")
    return questions


def write_predictions(out: Path, questions: list[Question], answers: dict[str, str]) -> Path:
    """OUT/predictions.json: [{"question_id", "answer"}] in the questions' order."""
    predictions = [{"question_id": int(q.key), "answer": one_line(answers[q.key])} for q in questions]
    return write_text(out / "predictions.json", json.dumps(predictions))
