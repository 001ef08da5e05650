"""The benchmark runners' commands, targets of `blip3o eval`; `register` adds them to the command table:

    blip3o eval geneval --data evaluation_metadata.jsonl --out DIR     GenEval's folders (run/geneval.py)
    blip3o eval dpg --data dpg_bench/prompts --out DIR                 DPG-Bench's 2x2 grids (run/dpg.py)
    blip3o eval wise --data WISE/data --out DIR                        WISE's images (run/wise.py)
    blip3o eval wise-judge --data WISE/data --images DIR ...           WISE's judge (run/judge.py)
    blip3o eval mme --data MME_Benchmark_release_version --out DIR     eval_tool's files (run/mme.py)
    blip3o eval vqav2|textvqa --data QUESTIONS.json --images DIR ...   EvalAI's predictions (run/vqa.py)
    blip3o eval mmmu --data MMMU --out DIR                             MMMU's responses (run/mmmu.py)

Each runs on one process, or on every process of `torchrun --nproc_per_node N -m blip3o.cli eval ...`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from blip3o.cli.errors import EXIT_OK, BadInput
from blip3o.cli.files import check_output_folder
from blip3o.cli.generate import MAX_BATCH, MAX_IMAGES, parse_size
from blip3o.cli.models import SAMPLING_FLAGS, SPEED_FLAGS, model_flags
from blip3o.cli.numbers import count, seed
from blip3o.cli.table import Command, CommandTable, flag

MAX_TILE = 8192  # pixels a side of one DPG-Bench tile
MAX_NEW_TOKENS = 32_768  # tokens of one answer
TORCHRUN = "torchrun --nproc_per_node 8 -m blip3o.cli"
RESUME = ("a rerun with the same flags does only what is missing; under torchrun, steps of --batch-size\n"
          "items go to the processes in turn, and N processes write what one process writes")

# ------------------------------------------------------------------ generation


def generation_flags(batch_size: int) -> tuple:
    return (
        flag("--out", required=True, help="the folder the outputs go to, with settings.json"),
        seed("--seed", default=42, help="the seed of every prompt (default 42, as GenEval's script)"),
        count("--batch-size", high=MAX_BATCH, default=batch_size, help=f"prompts a model call (default {batch_size})"),
        *model_flags(), *SAMPLING_FLAGS, *SPEED_FLAGS,
    )


SIZE_FLAG = flag("--size", default=None, metavar="N|WxH",
                 help="image size: N for N x N, or WxH (default: the decoder's, 1024 for the official models)")


def run_geneval(args: argparse.Namespace) -> int:
    from .generation import run_generation
    from .geneval import geneval_prompts, write_geneval_folder

    size = parse_size(args.size)
    prompts = geneval_prompts(args.data, Path(args.out))
    check_output_folder(Path(args.out), "--out")
    if run_generation(args, "geneval", prompts, write_geneval_folder, num_images=args.num_images, size=size):
        print(f"{len(prompts)} prompts x {args.num_images} images in {args.out}/ (GenEval's layout); detect with "
              f"GenEval's evaluation/evaluate_images.py {args.out} --outfile results.jsonl, then blip3o eval score "
              f"geneval results.jsonl")
    return EXIT_OK


def run_dpg(args: argparse.Namespace) -> int:
    from .dpg import DPG_IMAGES, dpg_prompts, write_dpg_grid
    from .generation import run_generation

    prompts = dpg_prompts(args.data, Path(args.out))
    check_output_folder(Path(args.out), "--out")
    size = {} if args.tile_size is None else {"height": args.tile_size, "width": args.tile_size}
    if run_generation(args, "dpg", prompts, write_dpg_grid, num_images=DPG_IMAGES, size=size):
        print(f"{len(prompts)} 2x2 grids in {args.out}/; score them with DPG-Bench's dpg_bench/dist_eval.sh "
              f"{args.out} TILE (TILE: the height in {args.out}/settings.json)")
    return EXIT_OK


def run_wise(args: argparse.Namespace) -> int:
    from .generation import run_generation
    from .wise import wise_prompts, write_wise_image

    size = parse_size(args.size)
    prompts = wise_prompts(args.data, Path(args.out))
    check_output_folder(Path(args.out), "--out")
    if run_generation(args, "wise", prompts, write_wise_image, num_images=1, size=size):
        print(f"{len(prompts)} images in {args.out}/; judge them with blip3o eval wise-judge --images {args.out}")
    return EXIT_OK


def run_wise_judge(args: argparse.Namespace) -> int:
    try:
        from .judge import Judge, run_judge
    except ImportError as e:
        if e.name != "openai":
            raise
        raise BadInput("the judge client needs the openai package: pip install 'blip3o[eval]'") from e
    from .wise import read_wise

    by_file = read_wise(args.data, fields=("Prompt", "Explanation", "Subcategory"))
    images = Path(args.images)
    if not images.is_dir():
        raise BadInput(f"--images {args.images}: no such folder")
    api_key = os.environ.get(args.api_key_env, "")
    if not api_key:
        raise BadInput(f"--api-key-env: the environment variable {args.api_key_env} is not set; set it to the "
                       f"judge's API key (any value for an endpoint that takes none)")
    out = Path(args.out) if args.out else images / "Results"
    check_output_folder(out, "--out")
    run_judge(Judge(args.judge_url, args.judge_model, api_key), by_file, images, out, workers=args.workers)
    return EXIT_OK


def generation_commands() -> list[Command]:
    return [
        Command(("eval", "geneval"), "generate GenEval's images: a folder per prompt, as its scorer reads",
                run_geneval, flags=(
            flag("--data", required=True, help="GenEval's prompts/evaluation_metadata.jsonl"),
            count("--num-images", high=MAX_IMAGES, default=4, help="images a prompt (default 4)"),
            SIZE_FLAG, *generation_flags(1),
        ), epilog=(
            "writes OUT/00000/metadata.jsonl, OUT/00000/samples/0000.png ..., OUT/00000/grid.png per prompt\n"
            f"(each folder whole or not at all) and OUT/settings.json;\n{RESUME}\n\n"
            "examples:\n"
            "  blip3o eval geneval --data geneval/prompts/evaluation_metadata.jsonl --out geneval_out --model "
            "BLIP3o-Model-8B --device cuda\n"
            f"  {TORCHRUN} eval geneval --data evaluation_metadata.jsonl --out geneval_out --model BLIP3o-Model-8B "
            "--device cuda")),
        Command(("eval", "dpg"), "generate DPG-Bench's images: a 2x2 grid of 4 images per prompt file", run_dpg,
                flags=(
            flag("--data", required=True, help="DPG-Bench's dpg_bench/prompts folder (or the folder holding it)"),
            count("--tile-size", high=MAX_TILE, default=None,
                  help="each image's side, the scorer's --resolution (default: the decoder's, 1024 officially)"),
            *generation_flags(1),
        ), epilog=(
            f"writes OUT/<name>.png for prompts/<name>.txt and OUT/settings.json;\n{RESUME}\n\n"
            "example:\n"
            f"  {TORCHRUN} eval dpg --data ELLA/dpg_bench/prompts --out dpg_out --model BLIP3o-Model-8B "
            "--device cuda")),
        Command(("eval", "wise"), "generate WISE's images: one per prompt_id", run_wise, flags=(
            flag("--data", required=True, nargs="+", metavar="PATH",
                 help="WISE's data folder (its three prompt files) or prompt JSON files"),
            SIZE_FLAG, *generation_flags(4),
        ), epilog=(
            f"writes OUT/<prompt_id>.png and OUT/settings.json;\n{RESUME}\n\n"
            "example:\n"
            f"  {TORCHRUN} eval wise --data WISE/WISE_legacy/data --out wise_out --model BLIP3o-Model-8B "
            "--device cuda")),
        Command(("eval", "wise-judge"), "judge WISE's images with an OpenAI-compatible vision model",
                run_wise_judge, flags=(
            flag("--data", required=True, nargs="+", metavar="PATH",
                 help="WISE's data folder (its three prompt files) or prompt JSON files"),
            flag("--images", required=True, help="the folder `blip3o eval wise` wrote"),
            flag("--out", default=None, help="where the judgements go (default: IMAGES/Results)"),
            flag("--judge-url", required=True, help="the endpoint's base URL, e.g. https://api.openai.com/v1"),
            flag("--judge-model", required=True, help="the judging model, e.g. gpt-4o-2024-05-13 (WISE's)"),
            flag("--api-key-env", default="OPENAI_API_KEY",
                 help="the environment variable holding the API key (default OPENAI_API_KEY)"),
            count("--workers", high=256, default=8, help="images judged at a time (default 8)"),
        ), epilog=(
            "writes OUT/<file>_scores_results.jsonl and OUT/<file>_full_results.json per prompt file, as\n"
            "WISE's gpt_eval.py does; a rerun judges only the images they lack. Then:\n"
            "  python WISE_legacy/Calculate.py OUT/*_scores_results.jsonl --category all\n\n"
            "example:\n"
            "  blip3o eval wise-judge --data WISE/WISE_legacy/data --images wise_out "
            "--judge-url https://api.openai.com/v1 --judge-model gpt-4o-2024-05-13")),
    ]


# ------------------------------------------------------------------ understanding


def understanding_flags(max_new_tokens: int) -> tuple:
    return (
        flag("--out", required=True, help="the folder the outputs go to, with settings.json"),
        flag("--protocol", choices=["stock", "blip3o"], default="blip3o",
             help="the understanding inputs: blip3o (default) = the original's evaluation, which the paper's scores "
                  "come from; stock = the model's processor (docs/evaluation.md)"),
        count("--batch-size", high=MAX_BATCH, default=8,
              help="questions a step, answered and saved together (default 8): one model call under stock, one call "
                  "a question under blip3o"),
        count("--max-new-tokens", high=MAX_NEW_TOKENS, default=max_new_tokens,
              help=f"the longest answer in tokens (default {max_new_tokens}, as lmms-eval's task)"),
        *model_flags(),
    )


def run_mme(args: argparse.Namespace) -> int:
    from .mme import POST_PROMPT, YES_OR_NO, as_questions, mme_questions, write_mme
    from .understanding import run_understanding

    questions = mme_questions(args.data)
    check_output_folder(Path(args.out), "--out")
    answers = run_understanding(args, "mme", as_questions(questions),
                                prompting={"removed": YES_OR_NO, "post_prompt": POST_PROMPT})
    if answers is not None:
        files = write_mme(Path(args.out), questions, answers)
        print(f"{len(questions)} answers in {len(files)} task files in {args.out}/; score them with blip3o eval "
              f"score mme {args.out} (or eval_tool's calculation.py --results_dir {args.out})")
    return EXIT_OK


def run_vqa(args: argparse.Namespace) -> int:
    from .understanding import SHORT_ANSWER, run_understanding
    from .vqa import TEXTVQA, VQAV2, vqa_questions, write_predictions

    fmt = {"vqav2": VQAV2, "textvqa": TEXTVQA}[args.command.words[-1]]
    questions = vqa_questions(fmt, args.data, args.images)
    check_output_folder(Path(args.out), "--out")
    answers = run_understanding(args, fmt.name, questions,
                                prompting={"capitalize": fmt.capitalize, "post_prompt": "\n" + SHORT_ANSWER})
    if answers is not None:
        path = write_predictions(Path(args.out), questions, answers)
        print(f"{len(questions)} predictions in {path}: submit it to EvalAI, or score a split with annotations: "
              f"blip3o eval score vqa --annotations ANNOTATIONS --predictions {path}")
    return EXIT_OK


def run_mmmu(args: argparse.Namespace) -> int:
    from .mmmu import MULTIPLE_CHOICE, mmmu_questions, write_responses
    from .understanding import SHORT_ANSWER, run_understanding

    questions, key = mmmu_questions(args.data, args.split)
    check_output_folder(Path(args.out), "--out")
    answers = run_understanding(args, "mmmu", questions, prompting={
        "split": args.split, "multiple_choice": MULTIPLE_CHOICE, "open": SHORT_ANSWER, "images": "first"})
    if answers is not None:
        path = write_responses(Path(args.out), questions, answers, key)
        print(f"{len(questions)} responses in {path}; score them with blip3o eval score mmmu {path} --answer-key "
              f"{path.parent / 'answer_key.jsonl'}")
    return EXIT_OK


def vqa_command(name: str, data_help: str, images_help: str, max_new_tokens: int, example: str) -> Command:
    return Command(("eval", name), f"answer {'VQAv2' if name == 'vqav2' else 'TextVQA'}'s questions: EvalAI's "
                                   f"predictions file", run_vqa, flags=(
        flag("--data", required=True, help=data_help),
        flag("--images", required=True, help=images_help),
        *understanding_flags(max_new_tokens),
    ), epilog=(
        f"writes OUT/predictions.json ([{{\"question_id\", \"answer\"}}]) and OUT/settings.json;\n{RESUME}\n\n"
        f"example:\n  {TORCHRUN} {example}"))


def understanding_commands() -> list[Command]:
    return [
        Command(("eval", "mme"), "answer MME's questions: a file per task, as its eval_tool reads", run_mme, flags=(
            flag("--data", required=True, help="MME's folder as distributed (MME_Benchmark_release_version)"),
            *understanding_flags(16),
        ), epilog=(
            f"writes OUT/<task>.txt (image, question, answer, prediction a line) and OUT/settings.json;\n{RESUME}\n\n"
            "example:\n"
            f"  {TORCHRUN} eval mme --data MME_Benchmark_release_version --out mme_out --model BLIP3o-Model-8B "
            "--device cuda\n  then, in MME's eval_tool: python calculation.py --results_dir mme_out")),
        vqa_command("vqav2", "VQAv2's question file, e.g. v2_OpenEnded_mscoco_test-dev2015_questions.json",
                    "the folder of its COCO images, e.g. test2015", 16,
                    "eval vqav2 --data v2_OpenEnded_mscoco_test-dev2015_questions.json --images test2015 "
                    "--out vqav2_out --model BLIP3o-Model-8B --device cuda"),
        vqa_command("textvqa", "TextVQA's question file, e.g. TextVQA_0.5.1_val.json",
                    "the folder of its images, e.g. train_images", 128,
                    "eval textvqa --data TextVQA_0.5.1_val.json --images train_images --out textvqa_out "
                    "--model BLIP3o-Model-8B --device cuda"),
        Command(("eval", "mmmu"), "answer MMMU's questions: the responses file its scorer reads", run_mmmu, flags=(
            flag("--data", required=True,
                 help="MMMU's folder as downloaded (<Subject>/<split>-*.parquet), a .parquet file, or a .json/.jsonl "
                      "file of its rows with base64 images"),
            flag("--split", default="validation", choices=["dev", "validation", "test"],
                 help="which questions (default validation, the paper's)"),
            *understanding_flags(128),
        ), epilog=(
            f"writes OUT/responses.json ({{id: response}}), OUT/answer_key.jsonl and OUT/settings.json;\n{RESUME}\n\n"
            "example:\n"
            f"  {TORCHRUN} eval mmmu --data MMMU --out mmmu_out --model BLIP3o-Model-8B --device cuda")),
    ]


def register(table: CommandTable) -> None:
    """Add the benchmark runners to the `eval` group."""
    for command in (*generation_commands(), *understanding_commands()):
        table.add(command)
