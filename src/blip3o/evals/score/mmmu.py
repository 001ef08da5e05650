"""MMMU: a free-text response is parsed to an option letter or to candidate answers, then checked against the key.

Inputs: the responses (`{"id": "validation_Art_1", "response": "..."}` records, or `{id: response}`), and
the answer key, one record a question with the dataset's fields `id`, `question_type` ("multiple-choice",
else open), `answer` (an option letter, an open answer, or a list of accepted answers) and `options` (a
list of strings, or the dataset's string form of one; needed for multiple choice).

The parsing and checks are the MMMU reference's (`eval_utils.py`):

- multiple choice (`parse_multi_choice`): a bracketed letter "(B)" first, else a letter standing alone
  " B ", else, in a response of more than five words, an option's text; where several are found the one
  found last in the response wins; where none is, a letter drawn at random (`fallback_rng`).
- open (`parse_open`): the tail after a closing word ("so", "is", "therefore", "answer", ... or "=" in the
  last line) of each line, plus every number in them; numbers compare as floats rounded to 2 decimals,
  text by containment of the lower-cased answer.

Accuracy is counted per subject (`validation_Art_1` is in Art), per discipline, and over all questions.
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .inputs import BadScoreInput, need, read_records

DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}

FALLBACK_SEED = 42  # the reference seeds Python's random with 42 before parsing
_TRIMMED = (",", ".", "!", "?", ";", ":", "'")  # stripped from a multiple-choice response's ends, one after another
_CLOSING_WORDS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = (":", ",", ".", "!", "?", ";", "'")
_NUMBER_PATTERNS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # with thousands commas: 12,000
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # scientific: 1.5e-3
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),  # plain: 42, 3.14, .5
)


def fallback_rng() -> random.Random:
    """The random source of the reference's fallback: one generator seeded once, drawn from in the order questions
    are parsed (subjects by name, then question number)."""
    return random.Random(FALLBACK_SEED)


# ------------------------------------------------------------------ multiple choice


def parse_multi_choice(response: str, options: list[str], rng: random.Random) -> str:
    """The option letter a response picks; `rng` draws one where it names none."""
    letters = [chr(ord("A") + i) for i in range(len(options))]
    for mark in _TRIMMED:
        response = response.strip(mark)
    padded = f" {response} "  # so that " A " also finds a letter at either end
    found = [letter for letter in letters if f"({letter})" in padded]
    spots = {letter: padded.rfind(f"({letter})") for letter in found}
    if not found:
        found = [letter for letter in letters if f" {letter} " in padded]
        spots = {letter: padded.rfind(f" {letter} ") for letter in found}
    if not found and len(padded.split()) > 5:
        lowered = padded.lower()
        found = [letter for letter, text in zip(letters, options, strict=True) if text.lower() in lowered]
        spots = {letter: lowered.rfind(options[letters.index(letter)].lower()) for letter in found}
    if not found:
        return rng.choice(letters)
    return max(found, key=lambda letter: spots[letter])  # the last found; a tie goes to the earlier letter


def check_multi_choice(answer: str | list[str], letter: str) -> bool:
    return letter in answer if isinstance(answer, list) else letter == answer


# ------------------------------------------------------------------ open


def is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def normalise(text: str) -> list[str | float]:
    """A number as itself rounded to 2 decimals; text lower-cased, a single character as " x" and "x " (so that it
    matches only as a word's edge)."""
    text = text.strip()
    if is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def extract_numbers(text: str) -> list[str]:
    """Every number of the text: with thousands commas, in scientific notation, plain."""
    return [number for pattern in _NUMBER_PATTERNS for number in pattern.findall(text)]


def key_responses(response: str) -> list[str]:
    """The parts of a response likely to hold its answer: in each line, the shortest tail after a closing word
    (or "=" in the last line); the whole response, lower-cased, where no line has one."""
    response = response.strip().strip(".").lower()
    # The reference splits at ". " before a capital too, but after lower-casing only line breaks remain.
    lines = response.split("\n")
    keys = []
    for number, line in enumerate(lines):
        closing = _CLOSING_WORDS + (("=",) if number == len(lines) - 1 else ())
        tails = [line.split(word)[-1].strip() for word in closing if word in line]
        shortest = _shortest(tails)
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def _shortest(tails: list[str]) -> str | None:
    """The first of the shortest tails, where an empty tail is passed over as long as no other has been kept."""
    shortest = None
    for tail in tails:
        if not shortest or len(tail) < len(shortest):
            shortest = tail
    return shortest


def parse_open(response: str) -> list[str | float]:
    """The candidate answers of an open response: its key parts and their numbers, normalised, without repeats."""
    keys = key_responses(response)
    candidates = keys + [number for key in keys for number in extract_numbers(key)]
    return list(dict.fromkeys(value for candidate in candidates for value in normalise(candidate)))


def check_open(answer: str | list[str], candidates: list[str | float]) -> bool:
    """A candidate string containing a normalised text answer, or a candidate number equal to a numeric one."""
    accepted = [value for text in (answer if isinstance(answer, list) else [answer]) for value in normalise(text)]
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(value, str) and value in candidate for value in accepted):
                return True
        elif candidate in accepted:
            return True
    return False


# ------------------------------------------------------------------ the benchmark


@dataclass(frozen=True)
class KeyEntry:
    question_type: str
    answer: str | list[str]
    options: list[str] | None  # multiple choice only


@dataclass(frozen=True)
class MMMUScore:
    subjects: dict[str, tuple[int, int]]  # subject -> (right, questions), by name
    key_size: int  # questions in the answer key (the responses may cover fewer, as the reference allows)

    def accuracy(self, subjects: list[str] | tuple[str, ...]) -> float:
        """The share of right answers over the questions of `subjects` (those answered)."""
        right = sum(self.subjects[s][0] for s in subjects if s in self.subjects)
        return right / sum(self.subjects[s][1] for s in subjects if s in self.subjects)

    @property
    def overall(self) -> float:
        return self.accuracy(tuple(self.subjects))

    @property
    def disciplines(self) -> dict[str, float]:
        return {name: self.accuracy(subjects) for name, subjects in DISCIPLINES.items()
                if any(s in self.subjects for s in subjects)}

    def to_json(self) -> dict:
        return {"overall": self.overall, "subjects": {s: self.accuracy([s]) for s in self.subjects},
                "disciplines": self.disciplines, "questions": sum(n for _, n in self.subjects.values()),
                "counts": {s: n for s, (_, n) in self.subjects.items()}}

    def report(self) -> str:
        lines = [f"{'subject':<38}{'questions':>10}{'acc':>8}"]
        for discipline, subjects in DISCIPLINES.items():
            present = [s for s in subjects if s in self.subjects]
            if present:
                questions = sum(self.subjects[s][1] for s in present)
                lines.append(f"{'Overall-' + discipline:<38}{questions:>10}{self.accuracy(present):>8.3f}")
                lines += [f"  {s:<36}{self.subjects[s][1]:>10}{self.accuracy([s]):>8.3f}" for s in present]
        questions = sum(n for _, n in self.subjects.values())
        lines.append(f"{'Overall':<38}{questions:>10}{self.overall:>8.3f}")
        if questions < self.key_size:
            lines.append(f"(responses for {questions} of the answer key's {self.key_size} questions)")
        return "\n".join(lines)


def subject_of(question_id: str, where: str) -> tuple[str, int]:
    """("Art_Theory", 12) for "validation_Art_Theory_12"."""
    parts = question_id.split("_")
    if len(parts) < 3 or not parts[-1].isdigit():
        raise BadScoreInput(f"{where}: id must read SPLIT_SUBJECT_NUMBER (validation_Art_1), got {question_id!r}")
    return "_".join(parts[1:-1]), int(parts[-1])


def read_key(path: str | Path) -> dict[str, KeyEntry]:
    """id -> KeyEntry of an answer key file."""
    key: dict[str, KeyEntry] = {}
    for where, record in read_records(path):
        question_id = need(record, "id", str, where)
        subject_of(question_id, where)
        if question_id in key:
            raise BadScoreInput(f"{where}: id {question_id!r} appears twice")
        question_type = need(record, "question_type", str, where)
        answer = need(record, "answer", (str, list), where)
        if isinstance(answer, list) and not (answer and all(isinstance(a, str) for a in answer)):
            raise BadScoreInput(f"{where}: field 'answer' must be a string or a non-empty list of strings")
        options = _read_options(record, where) if question_type == "multiple-choice" else None
        key[question_id] = KeyEntry(question_type, answer, options)
    return key


def _read_options(record: dict, where: str) -> list[str]:
    options = need(record, "options", (list, str), where)
    if isinstance(options, str):  # the dataset's column: "['$6', '$7', '$8', '$9']"
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError) as e:
            raise BadScoreInput(f"{where}: field 'options' is a string but not a list's text ({e})") from e
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise BadScoreInput(f"{where}: field 'options' must be a non-empty list of strings")
    return options


def read_responses(path: str | Path, key: dict[str, KeyEntry]) -> dict[str, str]:
    """id -> response, each id in the key and answered once."""
    responses: dict[str, str] = {}
    for where, record in read_records(path, value_field="response"):
        question_id = need(record, "id", str, where)
        if question_id not in key:
            raise BadScoreInput(f"{where}: id {question_id!r} is not in the answer key")
        if question_id in responses:
            raise BadScoreInput(f"{where}: id {question_id!r} is answered twice")
        responses[question_id] = need(record, "response", str, where)
    return responses


def is_right(entry: KeyEntry, response: str, rng: random.Random) -> bool:
    """One response parsed and checked as the reference does."""
    if entry.question_type == "multiple-choice":
        return check_multi_choice(entry.answer, parse_multi_choice(response, entry.options, rng))
    return check_open(entry.answer, parse_open(response))


def score_mmmu(responses: str | Path, answer_key: str | Path) -> MMMUScore:
    """The accuracy of a responses file against an answer key; questions in the reference's order (subject by
    name, then number), which decides the fallback's draws."""
    key = read_key(answer_key)
    answered = read_responses(responses, key)
    rng = fallback_rng()
    subjects: dict[str, tuple[int, int]] = {}
    for question_id in sorted(answered, key=lambda i: subject_of(i, str(responses))):
        subject, _ = subject_of(question_id, str(responses))
        right, total = subjects.get(subject, (0, 0))
        subjects[subject] = (right + is_right(key[question_id], answered[question_id], rng), total + 1)
    return MMMUScore(subjects, len(key))
