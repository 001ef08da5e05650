"""Answering a benchmark's questions under an understanding protocol, a step at a time, resumably.

    answers = run_understanding(args, "mme", questions, prompting={...})  # {key: answer} on rank 0

Each question is one user turn: its images first, then its text, as the original's lmms-eval model sends them;
replies are greedy and cut at the protocol's stop tokens (`blip3o.protocols`). Each step's answers are saved as
one part, OUT/parts/<index of the step's first question>.json holding {key: answer}, written atomically: a rerun
reads the parts and asks only the questions no part answers. Rank 0 gets every answer back to write the
benchmark's own file; the other ranks get None.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from blip3o.cli.commands import ask_protocol
from blip3o.cli.errors import BadInput
from blip3o.cli.models import load_for_command
from blip3o.evals.run.work import finish, item_file, join_world, my_steps, place_device, start_outputs, step_bar
from blip3o.images import ImageRejected, admit_image

# the post-prompt lmms-eval's tasks add to a short-answer question (MME, VQAv2, TextVQA, MMMU's open questions)
SHORT_ANSWER = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class Question:
    key: str  # where its answer is filed: unique within the benchmark
    prompt: str  # the text the model reads, after the images
    images: Callable[[], list[Image.Image]]  # loads its images (none for a text-only question)


def image_file(path: Path) -> Callable[[], list[Image.Image]]:
    """A question's one image, read when its step runs; a file that is no readable image is bad input."""

    def load() -> list[Image.Image]:
        try:
            return [admit_image(path, name=str(path))]
        except ImageRejected as e:
            raise BadInput(str(e)) from e

    return load


def ask(model, protocol, questions: Sequence[Question], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, as decoded, under `protocol` (its image preparation, pixel bounds, stop tokens and batch)."""
    conversations = [[{"role": "user", "content": [
        *({"type": "image", "image": protocol.prepare(image)} for image in question.images()),
        {"type": "text", "text": question.prompt}]}] for question in questions]
    size = protocol.batch_size or batch_size
    answers = []
    for start in range(0, len(conversations), size):
        answers += model.chat(conversations[start:start + size], max_new_tokens=max_new_tokens, do_sample=False,
                              **protocol.options())
    return answers


class AnswerParts:
    """The answers found so far: OUT/parts/*.json, each {key: answer} for one step's questions."""

    def __init__(self, out: Path) -> None:
        self.folder = out / "parts"

    def load(self) -> dict[str, str]:
        answers: dict[str, str] = {}
        for path in sorted(self.folder.glob("[!.]*.json")):
            try:
                answers.update(json.loads(path.read_text()))
            except (ValueError, TypeError) as e:  # not JSON, not UTF-8, not an object
                raise BadInput(f"{path} is not a part this runner wrote ({e}): remove it to answer its questions "
                               f"again") from e
        return answers

    def save(self, first: int, answers: dict[str, str]) -> None:
        with item_file(self.folder / f"{first:08d}.json") as tmp:
            tmp.write_text(json.dumps(answers))


def check_keys(questions: Sequence[Question], source: str) -> None:
    """Each question's answer needs a place of its own: BadInput for a key two questions share."""
    seen: set[str] = set()
    for question in questions:
        if question.key in seen:
            raise BadInput(f"{source}: two questions share the id {question.key}")
        seen.add(question.key)


def answer_all(model, protocol, questions: Sequence[Question], out: Path, world, *, batch_size: int,
               max_new_tokens: int, desc: str) -> dict[str, str] | None:
    """Answer this rank's questions not answered yet; rank 0 returns every answer once all ranks are done."""
    parts = AnswerParts(out)
    done = parts.load()
    steps = my_steps(list(enumerate(questions)), batch_size, world, lambda item: item[1].key in done)
    with step_bar(world, steps, desc) as update:
        for step in steps:
            answers = ask(model, protocol, [q for _, q in step], max_new_tokens=max_new_tokens, batch_size=batch_size)
            parts.save(step[0][0], {q.key: a for (_, q), a in zip(step, answers, strict=True)})
            update(len(step))
    finish(world)
    if not world.is_main:
        return None
    answers = parts.load()
    missing = [q.key for q in questions if q.key not in answers]
    if missing:
        raise RuntimeError(f"{len(missing)} questions have no answer in {parts.folder} (e.g. {missing[0]})")
    return {q.key: answers[q.key] for q in questions}


def run_understanding(args: argparse.Namespace, benchmark: str, questions: Sequence[Question], *,
                      prompting: dict) -> dict[str, str] | None:
    """Load the model of `args` on this rank's device, record the settings in OUT/settings.json, answer every
    question; rank 0 returns {key: answer} in the questions' order, the other ranks None. `prompting` records how
    the benchmark's questions became prompts."""
    out = Path(args.out)
    world = join_world()
    args.device = place_device(args.device, world)
    protocol = ask_protocol(args)
    model = load_for_command(args)
    protocol_settings = protocol.settings(model)
    settings = {"benchmark": benchmark, "model": args.model, "questions": len(questions),
                "protocol": {k: v for k, v in protocol_settings.items() if k != "device"},
                "max_new_tokens": args.max_new_tokens, "do_sample": False, "prompting": prompting,
                "device": protocol_settings["device"], "batch_size": args.batch_size}
    start_outputs(out, settings, world)
    return answer_all(model, protocol, questions, out, world, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, desc=benchmark)


def one_line(answer: str) -> str:
    """An answer as one field of a line: tabs and line breaks (any `str.splitlines` splits at) become spaces,
    edges trimmed."""
    return " ".join(answer.replace("\t", " ").splitlines()).strip()
