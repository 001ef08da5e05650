"""MMMU: its questions with their images inline in, the responses file its scorer reads out.

    DATA = MMMU's folder as downloaded (<Subject>/<split>-*.parquet, read with pyarrow), one such parquet file,
           or a JSON list / JSON lines file of the same rows with each image_N a base64 string of the image file
    OUT/responses.json     {id: response} for the split's questions (ids validation_<Subject>_<n>, ...)
    OUT/answer_key.jsonl   {id, question_type, answer, options} a question, as the rows hold them
    OUT/settings.json      how they were made;  OUT/parts/  the answers as they were saved

A row has id, question, options (a Python list literal, as MMMU stores it), question_type ("multiple-choice" or
"open") and image_1 .. image_7. The prompt is lmms-eval's: the question, then for multiple choice its options as
"A. ..." lines and "Answer with the option's letter from the given choices directly.", otherwise "Answer the
question using a single word or phrase."; the images its text names (<image 1> ...) come first, in number order;
at most 128 new tokens (lmms-eval's validation task).
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from blip3o.cli.errors import BadInput
from blip3o.evals.run.understanding import SHORT_ANSWER, Question
from blip3o.evals.run.work import read_json
from blip3o.files import write_text
from blip3o.images import ImageRejected, admit_image

MULTIPLE_CHOICE = "Answer with the option's letter from the given choices directly."
MAX_NEW_TOKENS = 128
IMAGE_TOKEN = re.compile(r"<image (\d+)>")


def mmmu_files(data: str, split: str) -> list[Path]:
    """The files --data names: a folder's <split>-*.parquet files (any depth), or one file."""
    path = Path(data)
    if path.is_dir():
        files = sorted(path.rglob(f"{split}-*.parquet"))
        if not files:
            raise BadInput(f"--data {data}: no {split}-*.parquet files in it (MMMU's folder as downloaded: "
                           f"<Subject>/{split}-00000-of-00001.parquet)")
        return files
    if not path.is_file():
        raise BadInput(f"--data {data}: no such file or folder")
    if path.suffix not in (".parquet", ".json", ".jsonl"):
        raise BadInput(f"--data {data}: expected MMMU's folder, a .parquet file, or a .json or .jsonl file")
    return [path]


def read_rows(path: Path) -> list[dict]:
    """The rows of one file, as dicts."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError as e:
            raise BadInput(f"{path}: reading parquet needs pyarrow: pip install 'blip3o[eval]'") from e
        return pyarrow.parquet.read_table(path).to_pylist()
    if path.suffix == ".json":
        rows = read_json(path)
        if not isinstance(rows, list):
            raise BadInput(f"{path}: expected a JSON list of questions")
        return rows
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}:{number}: not valid JSON ({e.msg})") from e
    return rows


def options_of(row: dict, where: str) -> list:
    """A multiple-choice row's options (MMMU stores the list as its Python literal)."""
    try:
        options = ast.literal_eval(row["options"])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise BadInput(f"{where}: options is not a list literal ({e})") from e
    if not isinstance(options, list):
        raise BadInput(f"{where}: options is not a list literal")
    return options


def mmmu_prompt(row: dict, where: str) -> str:
    """The question as lmms-eval's MMMU task asks it."""
    if row["question_type"] == "multiple-choice":
        choices = "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options_of(row, where)))
        return f"{row['question']}\n{choices}\n\n{MULTIPLE_CHOICE}"
    return f"{row['question']}\n\n{SHORT_ANSWER}"


def image_bytes(value, where: str) -> bytes:
    """An image field's encoded file: parquet's {"bytes": ...}, or JSON's base64 string (alone or as "bytes")."""
    data = value.get("bytes") if isinstance(value, dict) else value
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise BadInput(f"{where}: not a base64 string of an image file ({e})") from e
    raise BadInput(f"{where}: no image (expected the image file's bytes, or their base64 string in JSON)")


def image_loader(row: dict, where: str) -> Callable[[], list[Image.Image]]:
    """The images the row's prompt names (question and options), in number order, read when its step runs."""
    numbers = sorted({int(n) for n in IMAGE_TOKEN.findall(f"{row['question']} {row.get('options', '')}")})
    encoded = [(f"{where} image_{n}", image_bytes(row.get(f"image_{n}"), f"{where} image_{n}")) for n in numbers]

    def load() -> list[Image.Image]:
        try:
            return [admit_image(data, name=name) for name, data in encoded]
        except ImageRejected as e:
            raise BadInput(str(e)) from e

    return load


def check_row(row, where: str) -> None:
    if not isinstance(row, dict):
        raise BadInput(f"{where} is not a JSON object")
    for key in ("id", "question", "question_type"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise BadInput(f"{where} needs {key!r}, a non-empty string")


def mmmu_questions(data: str, split: str) -> tuple[list[Question], list[dict]]:
    """The split's questions (rows whose id starts with `<split>_`) of every file --data names, and their
    answer key: {id, question_type, answer, options} a question."""
    questions, key = [], []
    for path in mmmu_files(data, split):
        for number, row in enumerate(read_rows(path), start=1):
            check_row(row, f"{path}: row {number}")
            if row["id"].startswith(f"{split}_"):
                where = f"{path}: {row['id']}"
                questions.append(Question(row["id"], mmmu_prompt(row, where), image_loader(row, where)))
                key.append({name: row.get(name) for name in ("id", "question_type", "answer", "options")})
    if not questions:
        raise BadInput(f"--data {data}: no {split} questions (ids {split}_...) in it")
    return questions, key


def write_responses(out: Path, questions: list[Question], answers: dict[str, str], key: list[dict]) -> Path:
    """OUT/responses.json: {id: the model's response, as decoded}; beside it OUT/answer_key.jsonl, the questions'
    answers as the rows hold them (hidden ones included, as the test split's)."""
    write_text(out / "answer_key.jsonl", "".join(json.dumps(record) + "\n" for record in key))
    return write_text(out / "responses.json", json.dumps({q.key: answers[q.key] for q in questions}, indent=1))
