"""VQA accuracy, as the VQA challenge (VQAv2) and TextVQA compute it.

A prediction scores min(1, matches / 3) against the human answers, averaged over the ten ways to leave one
human answer out (`agreement`); the benchmark's figure is the mean over questions, in percent, rounded to
two decimals as the official evaluation stores it.

Answers are compared after normalisation. VQAv2 (the official `vqaEval.py`): line breaks and tabs to
spaces, trimmed; only where the human answers differ, also punctuation (`strip_punctuation`) and then
number words, articles and contractions (`normalise_words`). TextVQA (the EvalAI answer processor):
always, after lower-casing, dropping commas and question marks and splitting off "'s".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .inputs import BadScoreInput, need, read_json, read_records

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# Apostrophe-less spellings and their standard forms, the official table (its keys with capitals never meet
# a word: words are lower-cased before the look-up).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}

# A period not followed by a digit. The official pattern, r"(?!<=\d)(\.)(?!\d)", opens with a look-ahead for
# "<=digit", which a period never starts, so it matches what this one does.
_PERIOD = re.compile(r"\.(?!\d)")
# The official call passes re.UNICODE (32) where `sub` takes its count: at most 32 periods go.
_PERIODS_REMOVED = 32
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def clean(text: str) -> str:
    """Line breaks and tabs to spaces, trimmed: what both evaluations do to every answer."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def strip_punctuation(text: str) -> str:
    """Each PUNCTUATION mark removed where the text has it beside a space or has a comma between digits (the
    test reads the text as given), else replaced by a space; then periods not followed by a digit removed."""
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        removed = glued or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if removed else " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED)


def normalise_words(text: str) -> str:
    """Lower-cased words, number words as digits, articles dropped, contractions spelled out, one space apart."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalise_textvqa(text: str) -> str:
    """The EvalAI answer processor: lower-cased, commas and question marks dropped, "'s" split off, cleaned,
    then `strip_punctuation` and `normalise_words`."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return normalise_words(strip_punctuation(clean(text)))


def agreement(prediction: str, answers: list[str]) -> float:
    """min(1, matches / 3) of the prediction among the human answers, averaged over leaving out each in turn."""
    scores = []
    for left_out in range(len(answers)):
        matches = sum(answer == prediction for i, answer in enumerate(answers) if i != left_out)
        scores.append(min(1, matches / 3))
    return sum(scores) / len(scores)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """One VQAv2 question's accuracy in [0, 1], as `vqaEval.py` computes it."""
    prediction, answers = clean(prediction), [clean(answer) for answer in answers]
    if len(set(answers)) > 1:
        prediction = normalise_words(strip_punctuation(prediction))
        answers = [normalise_words(strip_punctuation(answer)) for answer in answers]
    return agreement(prediction, answers)


def textvqa_accuracy(prediction: str, answers: list[str]) -> float:
    """One TextVQA question's accuracy in [0, 1], as the EvalAI evaluation computes it."""
    return agreement(normalise_textvqa(prediction), [normalise_textvqa(answer) for answer in answers])


@dataclass(frozen=True)
class Question:
    """One annotated question: its human answers and (VQAv2 only) its types."""

    answers: list[str]
    question_type: str | None = None
    answer_type: str | None = None


@dataclass(frozen=True)
class VQAScore:
    """Percentages rounded to two decimals, as the official evaluation stores them."""

    benchmark: str  # "vqav2" or "textvqa": which normalisation applied
    overall: float
    questions: int
    per_answer_type: dict[str, float] = field(default_factory=dict)  # VQAv2: yes/no, number, other
    per_question_type: dict[str, float] = field(default_factory=dict)  # VQAv2: "what color is the", ...

    def to_json(self) -> dict:
        return {"overall": self.overall, "per_answer_type": self.per_answer_type,
                "per_question_type": self.per_question_type, "questions": self.questions,
                "benchmark": self.benchmark}

    def report(self) -> str:
        lines = [f"{self.benchmark} accuracy over {self.questions} questions: {self.overall:.2f}"]
        for title, table in (("per answer type", self.per_answer_type), ("per question type", self.per_question_type)):
            if table:
                lines.append(f"{title}:")
                lines.extend(f"  {name:<32}{value:>7.2f}" for name, value in table.items())
        return "\n".join(lines)


def percent(accuracies: list[float]) -> float:
    """The mean of accuracies in [0, 1] as a percentage rounded to two decimals."""
    return round(100 * sum(accuracies) / len(accuracies), 2)


def read_annotations(path: str | Path) -> tuple[str, dict[int, Question]]:
    """("vqav2", questions) from a VQA annotation file (`annotations`: question_id, answers of {answer},
    question_type, answer_type), or ("textvqa", questions) from a TextVQA file (`data`: question_id, answers)."""
    value = read_json(path)
    if isinstance(value, dict) and isinstance(value.get("annotations"), list):
        return "vqav2", _read_questions(path, value["annotations"], "annotation", _vqav2_question)
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        return "textvqa", _read_questions(path, value["data"], "data item", _textvqa_question)
    raise BadScoreInput(f"{path}: not a VQA annotation file (a list `annotations`) nor a TextVQA file (a list "
                        f"`data`)")


def _read_questions(path, items: list, noun: str, read_one) -> dict[int, Question]:
    questions: dict[int, Question] = {}
    for number, item in enumerate(items, start=1):
        where = f"{path}, {noun} {number}"
        if not isinstance(item, dict):
            raise BadScoreInput(f"{where}: must be a JSON object")
        question_id = need(item, "question_id", int, where)
        if question_id in questions:
            raise BadScoreInput(f"{where}: question_id {question_id} is annotated twice")
        questions[question_id] = read_one(item, where)
    if not questions:
        raise BadScoreInput(f"{path}: holds no questions")
    return questions


def _vqav2_question(item: dict, where: str) -> Question:
    answers = need(item, "answers", list, where)
    if not answers:
        raise BadScoreInput(f"{where}: field 'answers' is empty")
    texts = []
    for number, answer in enumerate(answers, start=1):
        if not isinstance(answer, dict):
            raise BadScoreInput(f"{where}: answers[{number}] must be an object with 'answer'")
        texts.append(need(answer, "answer", str, f"{where}, answers[{number}]"))
    return Question(texts, need(item, "question_type", str, where), need(item, "answer_type", str, where))


def _textvqa_question(item: dict, where: str) -> Question:
    answers = need(item, "answers", list, where)
    if not answers or not all(isinstance(answer, str) for answer in answers):
        raise BadScoreInput(f"{where}: field 'answers' must be a non-empty list of strings (a split with answers)")
    return Question(answers)


def read_predictions(path: str | Path, questions: dict[int, Question]) -> dict[int, str]:
    """question_id -> answer from a JSON list of {question_id, answer}: one for every annotated question, no
    other."""
    predictions: dict[int, str] = {}
    for where, record in read_records(path):
        question_id = need(record, "question_id", int, where)
        if question_id not in questions:
            raise BadScoreInput(f"{where}: question_id {question_id} is not in the annotations")
        if question_id in predictions:
            raise BadScoreInput(f"{where}: question_id {question_id} is predicted twice")
        predictions[question_id] = need(record, "answer", str, where)
    missing = [question_id for question_id in questions if question_id not in predictions]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise BadScoreInput(f"{path}: no prediction for {len(missing)} annotated questions (question_id {shown})")
    return predictions


def check_question_file(path: str | Path, questions: dict[int, Question]) -> None:
    """A VQA questions file (`questions`: question_id, ...) of the same questions as the annotations."""
    value = read_json(path)
    if not isinstance(value, dict) or not isinstance(value.get("questions"), list):
        raise BadScoreInput(f"{path}: not a VQA questions file (a list `questions`)")
    ids = set()
    for number, item in enumerate(value["questions"], start=1):
        if not isinstance(item, dict):
            raise BadScoreInput(f"{path}, question {number}: must be a JSON object")
        ids.add(need(item, "question_id", int, f"{path}, question {number}"))
    if ids != set(questions):
        raise BadScoreInput(f"{path}: its question ids differ from the annotations' ({len(ids)} against "
                            f"{len(questions)}): the two files must be of one split")


def score_vqa(annotations: str | Path, predictions: str | Path, questions: str | Path | None = None) -> VQAScore:
    """Score `predictions` against `annotations` (VQAv2 or TextVQA, told apart by their layout). A VQAv2
    questions file, given, is checked to be of the annotations' split."""
    benchmark, annotated = read_annotations(annotations)
    if questions is not None:
        if benchmark == "textvqa":
            raise BadScoreInput(f"{questions}: a TextVQA annotation file holds its questions; give no questions file")
        check_question_file(questions, annotated)
    predicted = read_predictions(predictions, annotated)
    accuracy = vqa_accuracy if benchmark == "vqav2" else textvqa_accuracy
    scores = {question_id: accuracy(predicted[question_id], q.answers) for question_id, q in annotated.items()}
    return VQAScore(benchmark, percent(list(scores.values())), len(scores),
                    per_answer_type=_per_type(annotated, scores, "answer_type"),
                    per_question_type=_per_type(annotated, scores, "question_type"))


def _per_type(questions: dict[int, Question], scores: dict[int, float], kind: str) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for question_id, question in questions.items():
        if getattr(question, kind) is not None:
            groups.setdefault(getattr(question, kind), []).append(scores[question_id])
    return {name: percent(values) for name, values in groups.items()}
