"""The `blip3o` command line. Commands only parse arguments and call the library.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input (argparse's convention).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


def load_model(name: str, device: str | None, dtype: str | None):
    """A preset name or a local checkpoint folder -> Blip3o."""
    import torch

    from blip3o import PRESETS, Blip3o

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                   None: None}[dtype]
    if Path(name).is_dir():
        return Blip3o.from_pretrained(name, device=device, dtype=torch_dtype)
    if name in PRESETS:
        return Blip3o.from_preset(name, device=device, dtype=torch_dtype)
    raise ValueError(
        f"--model {name!r} is neither a preset ({', '.join(PRESETS)}) nor a local checkpoint folder; "
        "this build loads no models from a hub: download the folder first and pass its path"
    )


def default_model() -> str:
    from blip3o.presets import DEFAULT_MODEL, preset_weights

    # nano is the default once its trained weights ship; until then the random debug model runs
    return DEFAULT_MODEL if preset_weights(DEFAULT_MODEL) is not None else "debug"


def cmd_generate(args) -> int:
    model = load_model(args.model, args.device, args.dtype)
    prompts = list(args.prompt)
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text().splitlines()
        prompts += [json.loads(line)["prompt"] for line in lines if line.strip()]
    if not prompts:
        raise ValueError("give a prompt or --prompts-file")
    images = model.generate(prompts, num_images=args.num_images, steps=args.steps, guidance=args.guidance,
                            seed=args.seed, size=args.size)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        path = out / f"{i // args.num_images:05d}_{i % args.num_images:02d}.png"
        image.save(path)
        print(path)
    return EXIT_OK


def cmd_ask(args) -> int:
    from PIL import Image

    model = load_model(args.model, args.device, args.dtype)
    answers = model.answer([Image.open(args.image)], [args.question], max_new_tokens=args.max_new_tokens)
    print(answers[0])
    return EXIT_OK


def cmd_reconstruct(args) -> int:
    from PIL import Image

    model = load_model(args.model, args.device, args.dtype)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        (image,) = model.reconstruct([Image.open(path)], seed=args.seed)
        target = out / f"{Path(path).stem}_reconstructed.png"
        image.save(target)
        print(target)
    return EXIT_OK


def cmd_info(args) -> int:
    model = load_model(args.model, "meta" if args.meta else args.device, args.dtype)
    counts = model.num_parameters()
    print(f"model: {args.model}")
    print(f"device: {model.device}  dtype: {model.queries.dtype}")
    for part, n in counts.items():
        print(f"  {part:<13} {n:>15,d} parameters")
    return EXIT_OK


def cmd_demo(args) -> int:
    model_name = args.model or default_model()
    if model_name == "debug":
        print("note: the trained `nano` model is not shipped yet; running the random `debug` preset, "
              "so the image is noise and the answer gibberish: the point is the whole path running.")
    model = load_model(model_name, args.device, None)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    (image,) = model.generate([args.prompt], seed=args.seed)
    path = out / "generated.png"
    image.save(path)
    print(f"[{model_name}] generated {path} for {args.prompt!r}")
    (answer,) = model.answer([image], [args.question])
    print(f"[{model_name}] Q: {args.question}\n[{model_name}] A: {answer}")
    return EXIT_OK


def cmd_convert(args) -> int:
    from blip3o.checkpoints.official import convert

    print(convert(args.directory, args.out, clip_encoder_weights=args.clip_encoder_weights))
    return EXIT_OK


def cmd_data(args) -> int:
    from blip3o.shapes import write_shards

    paths = write_shards(args.out, args.num, args.seed, shard_size=args.shard_size)
    print(f"wrote {args.num} samples in {len(paths)} shards to {args.out}")
    return EXIT_OK


def cmd_train(args) -> int:
    from blip3o.train.recipe import train_nano, train_stage

    if args.what == "nano":
        final = train_nano(args.out, data=args.data, num_samples=args.num_samples, seed=args.seed,
                           device=args.device, scale=args.scale, stages=args.stages)
    else:
        if not args.config:
            raise ValueError(f"`blip3o train {args.what}` needs --config FILE (a TrainConfig JSON)")
        final = train_stage(args.config)
    print(f"trained model: {final}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from blip3o.evaluate import evaluate_shapes, format_results

    model = load_model(args.model, args.device, args.dtype)
    results = evaluate_shapes(model, args.out, per_tag=args.per_tag, num_images=args.num_images,
                              num_scenes=args.num_scenes)
    print(format_results(results))
    print(f"results: {Path(args.out) / 'results.json'}  samples: {Path(args.out) / 'samples.png'}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip3o", description="BLIP3-o: understand and generate images.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        p.add_argument("--model", default=None, help="preset name or local checkpoint folder (default: nano, "
                                                     "or debug until nano's weights ship)")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
        p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
        return p

    p = add("generate", cmd_generate, "generate images from text prompts")
    p.add_argument("prompt", nargs="*", help="one or more prompts")
    p.add_argument("--prompts-file", help="JSONL file, one object with a `prompt` per line")
    p.add_argument("--outdir", default="outputs")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="DiT sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="DiT CFG scale (default: the model's)")
    p.add_argument("--size", type=int, default=None, help="output size, where the decoder allows it")

    p = add("ask", cmd_ask, "answer a question about an image")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--max-new-tokens", type=int, default=64)

    p = add("reconstruct", cmd_reconstruct, "encode images to CLIP tokens and decode them back")
    p.add_argument("images", nargs="+")
    p.add_argument("--outdir", default="outputs")
    p.add_argument("--seed", type=int, default=0)

    p = add("info", cmd_info, "show a model's parts and parameter counts")
    p.add_argument("--meta", action="store_true", help="build on the meta device (no memory; any size)")

    p = add("demo", cmd_demo, "generate an image from a prompt, then answer a question about it")
    p.add_argument("--prompt", default="a photo of a red circle left of a blue square")
    p.add_argument("--question", default="how many circles are there?")
    p.add_argument("--outdir", default="demo_out")
    p.add_argument("--seed", type=int, default=0)

    help_ = "convert an official BLIP3-o folder (BLIP3o/BLIP3o-Model-8B, -4B) to this library's format"
    p = sub.add_parser("convert", help=help_, description=help_)
    p.set_defaults(func=cmd_convert)
    p.add_argument("directory", help="the official folder, as downloaded")
    p.add_argument("out", help="where to write the converted checkpoint")
    p.add_argument("--clip-encoder-weights", default=None,
                   help="folder with the EVA-CLIP tower's safetensors, if the official folder lacks it")

    help_ = "write Shapes-world training data as webdataset shards"
    p = sub.add_parser("data", help=help_, description=help_)
    p.set_defaults(func=cmd_data)
    p.add_argument("world", choices=["shapes"])
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=40_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000)

    help_ = "train: `nano` runs the whole recipe (data + 4 stages); a stage name runs one stage from --config"
    p = sub.add_parser("train", help=help_, description=help_)
    p.set_defaults(func=cmd_train)
    p.add_argument("what", choices=["nano", "clip", "understanding", "decoder", "generation"])
    p.add_argument("--config", help="TrainConfig JSON (for a single stage)")
    p.add_argument("--out", default="runs/nano")
    p.add_argument("--data", default=None, help="Shapes shards folder (default: OUT/data, written if missing)")
    p.add_argument("--num-samples", type=int, default=40_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (quick runs)")
    p.add_argument("--stages", nargs="*", default=None, help="only these stages (the others are reused)")

    p = add("eval", cmd_eval, "evaluate in the Shapes world: GenEval-style generation accuracy and VQA")
    p.add_argument("world", choices=["shapes"])
    p.add_argument("--out", default="eval_out")
    p.add_argument("--per-tag", type=int, default=25)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--num-scenes", type=int, default=200)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "model", None) is None and args.command != "demo":
        args.model = default_model()
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"blip3o {args.command}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
