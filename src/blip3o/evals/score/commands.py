"""`blip3o eval score BENCH`: a benchmark's official figures from its output or judge files.

    blip3o eval score geneval RESULTS.jsonl
    blip3o eval score dpg ANSWERS.jsonl
    blip3o eval score wise SCORES.jsonl [MORE.jsonl ...] [--verified]
    blip3o eval score mme DIR
    blip3o eval score vqa --annotations A.json --predictions P.json [--questions Q.json]
    blip3o eval score mmmu RESPONSES.json --answer-key KEY.json

Each prints a table, or with --json exactly one JSON object. A file that cannot be scored exits 2 with a
message naming the file, line and field.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from blip3o.cli.errors import EXIT_OK, BadInput
from blip3o.cli.table import Command, CommandTable, flag

from .dpg import score_dpg
from .geneval import score_geneval
from .inputs import BadScoreInput
from .mme import score_mme
from .mmmu import score_mmmu
from .vqa import score_vqa
from .wise import score_wise

JSON_FLAG = flag("--json", action="store_true", help="print the figures as one JSON object")


def scored(score: Callable[[argparse.Namespace], object]) -> Callable[[argparse.Namespace], int]:
    """A command's run: `score(args)` -> a result, printed as JSON or as its report; a bad file is BadInput."""
    def run(args: argparse.Namespace) -> int:
        try:
            result = score(args)
        except BadScoreInput as e:
            raise BadInput(str(e)) from e
        print(json.dumps(result.to_json()) if args.json else result.report())
        return EXIT_OK

    return run


def score_command(benchmark: str, help_: str, score: Callable[[argparse.Namespace], object], *flags,
                  epilog: str = "") -> Command:
    return Command(("eval", "score", benchmark), help_, scored(score), flags=(*flags, JSON_FLAG), epilog=epilog)


DPG_LINE = ('line layout:\n  {"item_id": "partiprompts10", "questions": [{"proposition_id": 1, "dependency": [0], '
            '"tuple": "entity - whole (bridge)", "answers": ["yes", "yes", "no", "yes"]}, ...]}')


def commands() -> list[Command]:
    return [
        score_command("geneval", "GenEval: the mean over task tags of the share of correct images",
                      lambda args: score_geneval(args.results),
                      flag("results", metavar="RESULTS.jsonl", help="the GenEval detector's output")),
        score_command("dpg", "DPG-Bench: the judge's yes/no answers, a question counting only where its parents do",
                      lambda args: score_dpg(args.answers),
                      flag("answers", metavar="ANSWERS.jsonl",
                           help="a line a prompt: its questions and the judge's answer for each image tile"),
                      epilog=DPG_LINE),
        score_command("wise", "WISE: the WiScore of the judge's scores, categories weighed as the official script",
                      lambda args: score_wise(args.scores, verified=args.verified),
                      flag("scores", nargs="+", metavar="SCORES.jsonl", help="the judge's scores, a line a prompt"),
                      flag("--verified", action="store_true",
                           help="WISE-Verified files: a binary score a prompt, and that release's weights")),
        score_command("mme", "MME: perception and cognition, each task scoring 100 acc + 100 acc+",
                      lambda args: score_mme(args.folder),
                      flag("folder", metavar="DIR", help="the eval tool's <task>.txt files, a prediction a line")),
        score_command("vqa", "VQAv2 or TextVQA accuracy: min(1, matching human answers / 3)",
                      lambda args: score_vqa(args.annotations, args.predictions, args.questions),
                      flag("--annotations", required=True,
                           help="VQAv2 annotations (`annotations`) or a TextVQA file (`data`)"),
                      flag("--predictions", required=True, help='a JSON list of {"question_id": int, "answer": str}'),
                      flag("--questions", default=None, help="VQAv2 questions, checked to be of the annotations' "
                                                             "split")),
        score_command("mmmu", "MMMU: responses parsed as the reference does, accuracy per subject",
                      lambda args: score_mmmu(args.responses, args.answer_key),
                      flag("responses", metavar="RESPONSES",
                           help='{"id", "response"} records (a JSON list or JSON lines), or {id: response}'),
                      flag("--answer-key", required=True,
                           help="records with id, question_type, answer and options")),
    ]


def register(table: CommandTable) -> None:
    """Add the `eval score` group and a command for each benchmark."""
    table.add_group(("eval", "score"), "score a benchmark's output files with its official formula")
    for command in commands():
        table.add(command)
