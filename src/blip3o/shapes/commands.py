"""The Shapes world's commands; `register` adds them to the command table (blip3o/cli/table.py):

    blip3o data shapes --out DIR     training shards of Shapes examples (write_shards)
    blip3o train nano --out DIR      the whole nano recipe: its data, then its stages in order (train_nano)
    blip3o eval shapes --model M     GenEval-style generation accuracy, VQA accuracy and edit accuracy
                                     (evaluate_shapes)
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from blip3o.cli.errors import EXIT_OK, BadInput, interrupted_after, user_input
from blip3o.cli.files import check_output_folder
from blip3o.cli.models import SAMPLING_FLAGS, device_name, load_for_command, model_flags
from blip3o.cli.numbers import count, number, seed, whole
from blip3o.cli.table import Command, CommandTable, Refusal, flag

MAX_SAMPLES = 100_000_000  # Shapes examples a run draws
MAX_STEPS = 10_000_000  # optimizer steps of a stage

# ------------------------------------------------------------------ data shapes


def tag_weights_arg(text: str) -> dict[str, float]:
    """`position=3,color_attr=2` -> {"position": 3.0, "color_attr": 2.0} (argparse type of --tag-weights)."""
    weights = {}
    for part in text.split(","):
        tag, sep, value = part.partition("=")
        try:
            weights[tag.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise argparse.ArgumentTypeError(f"expected FAMILY=WEIGHT pairs separated by commas, got {part!r}")
        if not 0 <= weights[tag.strip()] <= 1e6:  # NaN and the infinities fail too
            raise argparse.ArgumentTypeError(f"{part!r}: a weight is a number from 0 to 1e6")
    return weights


def example_options(args: argparse.Namespace) -> dict:
    """make_example's options from the flags of `data shapes`."""
    return dict(prompt_first=args.prompt_first, ordered=args.ordered, canonical=args.canonical,
                tag_weights=args.tag_weights, canonical_jitter=args.canonical_jitter)


def run_data_shapes(args: argparse.Namespace) -> int:
    from .data import check_example_options, write_shards

    with user_input():
        check_example_options(**example_options(args))
    check_output_folder(Path(args.out), "--out")
    paths = write_shards(args.out, args.num, args.seed, shard_size=args.shard_size, **example_options(args))
    print(f"wrote {args.num} samples in {len(paths)} shards to {args.out}")
    return EXIT_OK


def data_command() -> Command:
    prompt_scenes = "applies to scenes drawn for a prompt only, and --prompt-first 0 draws none"
    return Command(("data", "shapes"), "write Shapes-world training data as webdataset shards", run_data_shapes,
                   flags=(
        flag("--out", required=True),
        count("--num", high=MAX_SAMPLES, default=40_000),
        seed("--seed", default=0),
        count("--shard-size", high=MAX_SAMPLES, default=1000),
        flag("--prompt-first", type=float, default=0.5,
             help="share of scenes drawn for a random GenEval prompt (the rest: random scenes of 1-4 objects)"),
        flag("--ordered", type=float, default=0.0,
             help="share of those prompt scenes laid out in the prompt's ordered layout (one region per named "
                  "object, in the order named; a relation's objects in the halves it names)"),
        flag("--canonical", type=float, default=0.0,
             help="share of those prompt scenes with each named object centred in its canonical cell (a few px "
                  "of jitter): the text decides the layout (at most 1 - --ordered)"),
        whole("--canonical-jitter", low=0, high=3, default=3, metavar="J",
             help="canonical layouts move each centre by up to J px (0..3) and draw sizes in 16-2J..16+J"),
        flag("--tag-weights", type=tag_weights_arg, default=None, metavar="FAMILY=W,...",
             help="how often each prompt family is drawn, e.g. position=3,color_attr=3 (unnamed families 1)"),
    ), refusals=(
        Refusal(("ordered", "canonical", "canonical_jitter", "tag_weights"), lambda a: a.prompt_first == 0,
                prompt_scenes),
        Refusal(("canonical_jitter",), lambda a: a.canonical == 0,
                "moves canonical layouts only, and --canonical 0 makes none"),
    ))


# ------------------------------------------------------------------ train nano


def recipe_stages() -> list[str]:
    """The nano recipe's stages, in the order it runs them."""
    from blip3o.train.recipe import NANO_STAGES

    return [stage.stage for stage in NANO_STAGES]


def stage_steps_arg(text: str) -> tuple[str, int]:
    """`understanding=2000` -> ("understanding", 2000) (argparse type of `train nano --steps`)."""
    stage, sep, value = text.partition("=")
    try:
        steps = int(value)
    except ValueError:
        sep = ""
    if not sep or not 1 <= steps <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"expected STAGE=STEPS with a whole number from 1 to {MAX_STEPS:,}, got "
                                         f"{text!r}")
    return stage.strip(), steps


def check_recipe_flags(args: argparse.Namespace) -> None:
    """BadInput for a stage the recipe lacks (--stages, --steps), a --steps stage that --stages leaves out, a
    stage whose starting model (the stage before it) is neither run nor in --out, an --out that cannot be
    written and a --data that is not a folder."""
    out = Path(args.out)
    check_output_folder(out, "--out")
    if args.data is not None and Path(args.data).exists() and not Path(args.data).is_dir():
        raise BadInput(f"--data {args.data} is not a folder")
    known = recipe_stages()
    for flag_name, stages in (("--stages", args.stages or []), ("--steps", [stage for stage, _ in args.steps])):
        for stage in stages:
            if stage not in known:
                raise BadInput(f"{flag_name}: unknown stage {stage!r}; the recipe's stages: {', '.join(known)}")
    for stage, _ in args.steps:
        if args.stages is not None and stage not in args.stages:
            raise BadInput(f"--steps {stage}: --stages does not run {stage}")
    for before, stage in itertools.pairwise(known):
        starts_from = out / before / "model"
        if stage in (args.stages or []) and before not in args.stages and not (starts_from / "config.json").is_file():
            raise BadInput(f"--stages {stage} starts from the {before} stage's model, and {starts_from} holds none: "
                           f"run --stages {before} {stage}")


def auto_or_device(name: str) -> str:
    """argparse type of `train nano --device`: auto, or a device `device_name` accepts."""
    return name if name == "auto" else device_name(name)


def run_train_nano(args: argparse.Namespace) -> int:
    from blip3o.train.recipe import train_nano

    check_recipe_flags(args)
    final = train_nano(args.out, data=args.data, num_samples=args.num_samples, seed=args.seed, device=args.device,
                       scale=args.scale, stages=args.stages, steps=dict(args.steps))
    print(f"trained model: {final}")
    return EXIT_OK


def every_stage_run_has_steps(args: argparse.Namespace) -> bool:
    """--steps sets the steps of every stage this run trains, leaving --scale nothing to scale."""
    return set(args.stages or recipe_stages()) <= {stage for stage, _ in args.steps}


def train_command() -> Command:
    return Command(("train", "nano"), "train the nano model: Shapes data, then the recipe's stages in order",
                   run_train_nano, flags=(
        flag("--out", default="runs/nano"),
        flag("--data", default=None, help="Shapes shards folder (default: OUT/data, written if missing)"),
        count("--num-samples", high=MAX_SAMPLES, default=40_000),
        seed("--seed", default=0),
        flag("--device", type=auto_or_device, default="auto", help="auto (a GPU if there is one), cpu, cuda, ..."),
        number("--scale", low=0, high=100, low_open=True, default=1.0,
               help="multiply every stage's steps, in (0, 100] (quick runs)"),
        flag("--stages", nargs="+", default=None, metavar="STAGE",
             help="only these stages, each from the model of the stage before it (the others are reused)"),
        flag("--steps", nargs="+", type=stage_steps_arg, default=[], metavar="STAGE=N",
             help="set stages' steps outright, e.g. understanding=2000 (not scaled by --scale)"),
    ), refusals=(
        Refusal(("scale",), every_stage_run_has_steps, "has nothing to scale: --steps sets every stage this run "
                                                       "trains"),
    ))


# ------------------------------------------------------------------ eval shapes


def run_eval_shapes(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_shapes, format_results

    check_output_folder(Path(args.out), "--out")
    model = load_for_command(args)
    with interrupted_after(lambda: f"{args.out}/ has no new results.json, samples.png or edits.png (all are "
                                   f"written at the end)"):
        results = evaluate_shapes(model, args.out, eval_set=args.set, per_tag=args.per_tag,
                                  num_images=args.num_images, num_scenes=args.num_scenes, num_edits=args.num_edits,
                                  model_name=args.model)
    print(format_results(results))
    out = Path(args.out)
    edits = f"  edits: {out / 'edits.png'}" if results["editing"] is not None else ""
    print(f"results: {out / 'results.json'}  samples: {out / 'samples.png'}{edits}")
    return EXIT_OK


def eval_command() -> Command:
    from .evaluate import DEFAULT_SIZES, EVAL_SETS, HELD_OUT, TRAINING_WORLD

    held, world = DEFAULT_SIZES[HELD_OUT], DEFAULT_SIZES[TRAINING_WORLD]
    return Command(("eval", "shapes"), "evaluate in the Shapes world: GenEval-style generation accuracy, VQA and "
                                       "editing", run_eval_shapes, flags=(
        flag("--out", default="eval_out"),
        flag("--set", choices=EVAL_SETS, default=HELD_OUT,
             help=f"{HELD_OUT}: prompts, scenes and edits from streams no training draw uses, images drawn by a "
                  f"rasteriser training never uses, the same number of questions of each type; {TRAINING_WORLD}: "
                  f"prompts, scenes and edits from the training data's own generators and rasterisers at the "
                  f"evaluation seed, questions in the training data's mix"),
        count("--per-tag", high=10_000, default=None,
              help=f"prompts of each GenEval family (default {held.per_tag}; {world.per_tag} with --set "
                   f"{TRAINING_WORLD})"),
        count("--num-images", high=64, default=None,
              help=f"images per prompt, 1 to 64 (default {held.num_images}; {world.num_images} with --set "
                   f"{TRAINING_WORLD})"),
        count("--num-scenes", high=100_000, default=None,
              help=f"scenes asked about: {HELD_OUT}, this many for each question type and for captions, one "
                   f"question each (default {held.num_scenes}); {TRAINING_WORLD}, this many in all, every question "
                   f"each allows (default {world.num_scenes})"),
        count("--num-edits", high=10_000, default=None,
              help=f"edits of each of the six edit types, for a model that can edit (default {held.num_edits}, "
                   f"either set)"),
        *model_flags(), *SAMPLING_FLAGS,
    ))


def register(table: CommandTable) -> None:
    """Add `data shapes`, `train nano` and `eval shapes` to the table's groups."""
    for command in (data_command(), train_command(), eval_command()):
        table.add(command)
