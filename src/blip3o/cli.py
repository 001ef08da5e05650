"""The `blip3o` command line. Commands only parse arguments, check their input and call the library.

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input (argparse's convention), 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = """\
examples:
  blip3o generate "a red circle left of a blue square" --num-images 4 --seed 0 --outdir out/
  blip3o generate --prompts-file prompts.jsonl --outdir geneval_out/ --num-images 4 --seed 0
  blip3o ask out/0000.png "how many circles are there?"
  blip3o ask --questions-file questions.jsonl --out answers.jsonl
  blip3o chat --image out/0000.png
  blip3o serve --port 8000                 # then open http://127.0.0.1:8000/
  blip3o info --model blip3o-8b --meta

models:
  --model takes a preset (debug, nano, blip3o-4b, blip3o-8b) or a local checkpoint folder.
  Nothing is ever downloaded: for a hub model, download its folder first and pass the path.
  The default is nano once its trained weights ship, the random debug model until then.

exit codes:
  0 success, 1 runtime failure, 2 bad usage or bad input, 130 interrupted
  (set BLIP3O_DEBUG=1 to see the traceback of a failure)

Run `blip3o COMMAND --help` for a command's options."""


class BadInput(ValueError):
    """The user's input (arguments, files) is wrong: exit code 2."""


# ------------------------------------------------------------------ models


def load_model(name: str, device: str | None, dtype: str | None):
    """A preset name or a local checkpoint folder -> Blip3o. Hub ids are refused: nothing is downloaded."""
    import torch

    from blip3o import Blip3o

    check_model_name(name)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                   None: None}[dtype]
    path = Path(name).expanduser()
    if path.is_dir():
        return Blip3o.from_pretrained(path, device=device, dtype=torch_dtype)
    return Blip3o.from_preset(name, device=device, dtype=torch_dtype)


def check_model_name(name: str) -> None:
    """Raise BadInput unless `name` is a preset or a local folder (checked before any other work)."""
    from blip3o.presets import PRESETS

    path = Path(name).expanduser()
    if path.is_dir() or name in PRESETS:
        return
    if path.exists():
        raise BadInput(f"--model {name!r} is a file; pass a preset ({', '.join(PRESETS)}) or a checkpoint folder")
    hint = "pass a preset or the path of a checkpoint folder"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        hint = (f"it looks like a hub id, but blip3o downloads nothing: download the folder yourself (for example "
                f"`hf download {name} --local-dir DIR`) and pass --model DIR")
    raise BadInput(f"--model {name!r} is neither a preset ({', '.join(PRESETS)}) nor a local folder; {hint}")


def default_model() -> str:
    from blip3o.presets import DEFAULT_MODEL, preset_weights

    # nano is the default once its trained weights ship; until then the random debug model runs
    return DEFAULT_MODEL if preset_weights(DEFAULT_MODEL) is not None else "debug"


def _load(args):
    note(f"loading model {args.model}...")
    offload = getattr(args, "offload", False)
    model = load_model(args.model, None if offload else args.device, args.dtype)
    if offload:  # weights stay in CPU memory; each part visits the device only while it runs
        model.enable_offload(args.device or "cuda")
    overrides = {k: getattr(args, k) for k in ("sampler", "eta", "guidance", "steps")
                 if getattr(args, k, None) is not None}
    if overrides:  # sampling settings for this run (the saved model keeps its own)
        try:
            model.config = dataclasses.replace(model.config, **overrides)
        except ValueError as e:
            raise BadInput(str(e).replace("inconsistent Blip3oConfig: ", "")) from None
    if getattr(args, "compile", False):
        model.accelerate(compile=True)
    return model


def _add_speed_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offload", action="store_true", help="keep the model in CPU memory and move each part to "
                                                          "--device only while it runs (big models, small GPUs)")
    p.add_argument("--compile", action="store_true", help="GPU fast paths: the DiT loop and UNet step as CUDA "
                                                          "graphs, torch.compile, static KV cache (slow first call)")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=["euler", "heun", "stochastic"], default=None,
                   help="DiT sampler (default: the model's); stochastic = DDIM with --eta")
    p.add_argument("--eta", type=float, default=None, help="the stochastic sampler's noise, 0 (Euler) to 1 (DDPM)")


def note(message: str) -> None:
    """Progress chatter for people: stderr, and only on a terminal."""
    if sys.stderr.isatty():
        print(message, file=sys.stderr, flush=True)


def progress(iterable, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, disable=None, file=sys.stderr, **kwargs)  # disable=None: bars only on a terminal


# ------------------------------------------------------------------ input files


def read_jsonl(path: str, required: dict[str, type]) -> list[dict]:
    """Objects of a JSON-lines file, each checked for the `required` keys and their types."""
    file = Path(path)
    if not file.is_file():
        raise BadInput(f"{path}: no such file")
    records = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise BadInput(f"{path}:{number}: each line must be a JSON object")
        for key, kind in required.items():
            if not isinstance(record.get(key), kind) or (kind is str and not record[key].strip()):
                raise BadInput(f"{path}:{number}: needs {key!r}, a non-empty {kind.__name__}")
        records.append(record)
    if not records:
        raise BadInput(f"{path} holds no records")
    return records


def open_image(path: Path, where: str):
    """A readable image file -> RGB PIL image; anything else is bad input naming `where`."""
    from PIL import Image, UnidentifiedImageError

    from blip3o.images import check_images

    if not path.is_file():
        raise BadInput(f"{where}: no image file {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return check_images([image], name=str(path))[0]
    except (UnidentifiedImageError, OSError) as e:
        raise BadInput(f"{where}: {path} is not an image this build can read ({e})") from e


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _positive(name: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        raise BadInput(f"{name} must be positive, got {value}")


# ------------------------------------------------------------------ commands


def cmd_generate(args) -> int:
    if args.prompt and args.prompts_file:
        raise BadInput("give prompts on the command line or --prompts-file, not both")
    if args.prompts_file:
        records = read_jsonl(args.prompts_file, {"prompt": str})
    elif args.prompt:
        records = [{"prompt": p} for p in args.prompt]
    else:
        raise BadInput("give a prompt, e.g. blip3o generate \"a red circle\", or --prompts-file FILE")
    for name in ("num_images", "steps", "size", "batch_size"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    model = _load(args)
    if args.size is not None:
        model.decoder.check_size(args.size)
    out = Path(args.outdir)
    settings = dict(num_images=args.num_images, steps=args.steps, guidance=args.guidance, seed=args.seed,
                    size=args.size)
    if args.prompt and len(args.prompt) == 1:
        # one prompt: DIR/0000.png, 0001.png, ... and DIR/grid.png
        with progress(None, total=1, desc="generate", unit="prompt") as bar:
            images = model.generate(args.prompt, **settings)
            bar.update()
        print(_save_samples(images, out))
        return EXIT_OK
    # several prompts: GenEval's layout, DIR/00000/{metadata.jsonl, samples/0000.png, ..., grid.png}; every
    # prompt gets the same seed, so each folder holds what `blip3o generate PROMPT --seed S` makes, and
    # --batch-size prompts share a model call (one seed per prompt keeps that true)
    settings.pop("seed")
    n = args.num_images
    with progress(None, total=len(records), desc="generate", unit="prompt") as bar:
        for start in range(0, len(records), args.batch_size):
            chunk = records[start:start + args.batch_size]
            images = model.generate([r["prompt"] for r in chunk], seed=[args.seed] * len(chunk), **settings)
            for offset, record in enumerate(chunk):
                folder = out / f"{start + offset:05d}"
                _save_samples(images[offset * n:(offset + 1) * n], folder / "samples", grid=folder / "grid.png")
                (folder / "metadata.jsonl").write_text(json.dumps(record) + "\n")
            bar.update(len(chunk))
    print(f"{len(records)} prompts x {args.num_images} images in {out}/ (GenEval layout)")
    return EXIT_OK


def _save_samples(images: list, folder: Path, grid: Path | None = None) -> Path:
    from blip3o.evaluate import image_grid

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:04d}.png")
    grid = grid or folder / "grid.png"
    image_grid([("", image) for image in images], columns=min(4, len(images))).save(grid)
    return grid


def cmd_ask(args) -> int:
    if args.questions_file:
        if args.image or args.question:
            raise BadInput("give IMAGE QUESTION or --questions-file, not both")
        return _ask_file(args)
    if not (args.image and args.question):
        raise BadInput('give an image and a question, e.g. blip3o ask image.png "what is this?", '
                       "or --questions-file FILE")
    image = open_image(Path(args.image), "IMAGE")
    model = _load(args)
    (answer,) = model.answer([image], [args.question], max_new_tokens=args.max_new_tokens)
    print(answer)
    return EXIT_OK


def _ask_file(args) -> int:
    records = read_jsonl(args.questions_file, {"image": str, "question": str})
    base = Path(args.questions_file).parent
    paths = []
    for number, record in enumerate(records, start=1):
        path = Path(record["image"]).expanduser()  # relative: to the working folder, else to the file's folder
        if not path.is_absolute() and not path.exists():
            path = base / path
        if not path.is_file():
            raise BadInput(f"{args.questions_file}: record {number}: no image file {record['image']}")
        paths.append(path)
    _positive("--batch-size", args.batch_size)
    model = _load(args)
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 - stdout must stay open
    try:
        batches = list(_chunks(list(zip(records, paths, strict=True)), args.batch_size))
        for batch in progress(batches, desc="ask", unit="batch"):
            images = [open_image(path, f"{args.questions_file}: {path}") for _, path in batch]
            answers = model.answer(images, [r["question"] for r, _ in batch], max_new_tokens=args.max_new_tokens)
            for (record, _), answer in zip(batch, answers, strict=True):
                out.write(json.dumps({**record, "answer": answer}) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if args.out:
        print(f"{len(records)} answers in {args.out}")
    return EXIT_OK


CHAT_HELP = "type a message; /image PATH attaches an image to your next message, /reset starts over, /quit leaves"


def cmd_chat(args) -> int:
    from blip3o.backbone import stripped_stream

    attached = [open_image(Path(p), "--image") for p in args.image]
    model = _load(args)
    interactive = sys.stdin.isatty()
    print(f"chatting with {args.model}: {CHAT_HELP}")
    history: list[dict] = []
    sampling = dict(do_sample=True, temperature=args.temperature) if args.temperature > 0 else {}
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return EXIT_OK
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            if command in ("/quit", "/exit"):
                return EXIT_OK
            if command == "/reset":
                history, attached = [], []
                print("(a new conversation)")
            elif command == "/image" and rest.strip():
                try:
                    attached.append(open_image(Path(rest.strip()).expanduser(), "/image"))
                    print(f"(attached {rest.strip()}; it goes with your next message)")
                except BadInput as e:
                    print(f"error: {e}")
            else:
                print(CHAT_HELP)
            continue
        content = [{"type": "image", "image": im} for im in attached] + [{"type": "text", "text": line}]
        history.append({"role": "user", "content": content if attached else line})
        attached = []
        print("blip3o> ", end="", flush=True)  # the reply follows word by word as the model writes it
        (reply,) = model.chat([history], max_new_tokens=args.max_new_tokens, seed=args.seed,
                              on_text=stripped_stream(lambda piece: print(piece, end="", flush=True)), **sampling)
        history.append({"role": "assistant", "content": reply})
        print(flush=True)


def cmd_reconstruct(args) -> int:
    images = [open_image(Path(p), "IMAGES") for p in args.images]
    model = _load(args)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    for path, image in zip(args.images, progress(images, desc="reconstruct", unit="image"), strict=True):
        (result,) = model.reconstruct([image], seed=args.seed)
        target = out / f"{Path(path).stem}_reconstructed.png"
        result.save(target)
        print(target)
    return EXIT_OK


def cmd_info(args) -> int:
    model = load_model(args.model, "meta" if args.meta else args.device, args.dtype)
    cfg = model.config
    print(f"model: {args.model}")
    print(f"device: {model.device}  dtype: {model.queries.dtype}")
    print(f"sampling: {cfg.steps} steps ({cfg.sampler}), guidance {cfg.guidance}; "
          f"images {model.decoder.default_size}x{model.decoder.default_size}")
    print("parts:")
    kinds = {"backbone": "Qwen2.5-VL", "dit": "Lumina-Next DiT", "clip_encoder": cfg.clip_encoder.kind,
             "decoder": cfg.decoder.kind, "queries": f"{cfg.num_queries} learnable queries"}
    for part, n in model.num_parameters().items():
        print(f"  {part:<13} {n:>15,d} parameters  {kinds.get(part, '')}".rstrip())
    return EXIT_OK


def cmd_serve(args) -> int:
    from blip3o.server import Blip3oService, ServerConfig, create_app, serve

    config = ServerConfig(allow_dirs=args.allow_dir, max_queue=args.max_queue, max_batch_images=args.max_batch_images,
                          batch_window_ms=args.batch_window_ms, request_timeout_s=args.timeout)
    for folder in config.allow_dirs:
        if not folder.is_dir():
            raise BadInput(f"--allow-dir {folder}: no such folder")
    model = _load(args)
    model_id = Path(args.model).name if Path(args.model).is_dir() else args.model
    print(f"serving {model_id} at http://{args.host}:{args.port}/ (web page) and http://{args.host}:{args.port}/v1 "
          f"(OpenAI API); Ctrl-C stops", flush=True)
    serve(create_app(Blip3oService(model, model_id, config)), host=args.host, port=args.port,
          log_level=args.log_level)
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
    return weights


def stage_steps_arg(text: str) -> tuple[str, int]:
    """`understanding=2000` -> ("understanding", 2000) (argparse type of `train nano --steps`)."""
    stage, sep, value = text.partition("=")
    try:
        steps = int(value)
    except ValueError:
        sep = ""
    if not sep or steps < 1:
        raise argparse.ArgumentTypeError(f"expected STAGE=STEPS with a positive whole number, got {text!r}")
    return stage.strip(), steps


def cmd_data(args) -> int:
    from blip3o.shapes import write_shards

    paths = write_shards(args.out, args.num, args.seed, shard_size=args.shard_size, prompt_first=args.prompt_first,
                         ordered=args.ordered, canonical=args.canonical, tag_weights=args.tag_weights,
                         canonical_jitter=args.canonical_jitter)
    print(f"wrote {args.num} samples in {len(paths)} shards to {args.out}")
    return EXIT_OK


def cmd_train(args) -> int:
    from blip3o.train.recipe import train_nano, train_stage

    if args.what == "nano":
        final = train_nano(args.out, data=args.data, num_samples=args.num_samples, seed=args.seed,
                           device=args.device, scale=args.scale, stages=args.stages, steps=dict(args.steps or []))
    else:
        if not args.config:
            raise BadInput(f"`blip3o train {args.what}` needs --config FILE (a TrainConfig JSON)")
        final = train_stage(args.config)
    print(f"trained model: {final}")
    return EXIT_OK


def cmd_eval(args) -> int:
    from blip3o.evaluate import evaluate_shapes, format_results

    _positive("--steps", args.steps)
    model = _load(args)
    results = evaluate_shapes(model, args.out, per_tag=args.per_tag, num_images=args.num_images,
                              num_scenes=args.num_scenes)
    print(format_results(results))
    print(f"results: {Path(args.out) / 'results.json'}  samples: {Path(args.out) / 'samples.png'}")
    return EXIT_OK


# ------------------------------------------------------------------ the parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip3o", description="BLIP3-o: understand and generate images.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_: str, epilog: str = "", model: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        if model:
            p.add_argument("--model", default=None, help="preset name or local checkpoint folder (default: nano, "
                                                         "or debug until nano's weights ship)")
            p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
            p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
        return p

    p = add("generate", cmd_generate, "generate images from text prompts", epilog=(
        "one prompt writes DIR/0000.png, 0001.png, ... and DIR/grid.png; several prompts or --prompts-file\n"
        "write GenEval's layout: DIR/00000/metadata.jsonl, DIR/00000/samples/0000.png, ..., DIR/00000/grid.png\n"
        "(each prompt is generated with the same --seed; --batch-size prompts share a model call)\n\n"
        "examples:\n"
        '  blip3o generate "two red circles" --num-images 4 --seed 0 --outdir out/\n'
        "  blip3o generate --prompts-file evaluation_metadata.jsonl --outdir geneval_out/ --num-images 4"))
    p.add_argument("prompt", nargs="*", help="one or more prompts")
    p.add_argument("--prompts-file", help="JSON lines, one object with a `prompt` per line (GenEval's "
                                          "evaluation_metadata.jsonl); every field is kept in metadata.jsonl")
    p.add_argument("--outdir", default="outputs")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed, same images")
    p.add_argument("--steps", type=int, default=None, help="DiT sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="DiT CFG scale (default: the model's)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels, where the decoder allows it")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per model call (default 8)")
    _add_speed_flags(p)
    _add_sampling_flags(p)

    p = add("ask", cmd_ask, "answer questions about images", epilog=(
        "--questions-file: JSON lines with `image` (a path: relative to the working folder, else to the file's\n"
        "folder) and `question`; each output line is the same object plus `answer`.\n\n"
        "examples:\n"
        '  blip3o ask photo.png "how many circles are there?"\n'
        "  blip3o ask --questions-file questions.jsonl --out answers.jsonl"))
    p.add_argument("image", nargs="?", help="an image file")
    p.add_argument("question", nargs="?", help="a question about it")
    p.add_argument("--questions-file", help="JSON lines, each with `image` and `question`")
    p.add_argument("--out", help="where --questions-file's answers go (JSON lines; default: standard output)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per model call (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64)

    p = add("chat", cmd_chat, "chat about images in the terminal", epilog=(
        "in the chat: /image PATH attaches an image to your next message, /reset starts a new conversation,\n"
        "/quit (or Ctrl-D) leaves.\n\nexample:\n  blip3o chat --image photo.png"))
    p.add_argument("--image", action="append", default=[], help="attach an image to the first message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; above 0: sampling")
    p.add_argument("--seed", type=int, default=None)

    p = add("reconstruct", cmd_reconstruct, "encode images to CLIP tokens and decode them back")
    p.add_argument("images", nargs="+")
    p.add_argument("--outdir", default="outputs")
    p.add_argument("--seed", type=int, default=0)

    p = add("serve", cmd_serve, "serve the model: an OpenAI-compatible API and a web page", epilog=(
        "routes: POST /v1/images/generations, POST /v1/chat/completions, GET /v1/models, GET /health,\n"
        "GET /metrics (Prometheus), GET / (the web page)\n\n"
        "example:\n  blip3o serve --model nano --port 8000 --allow-dir ~/pictures"))
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-dir", action="append", default=[], metavar="DIR",
                   help="a folder whose images chat requests may name by path (repeatable; default: none)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting past this get 429 (default 64)")
    p.add_argument("--max-batch-images", type=int, default=16, help="images per generate call (default 16)")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="time to gather a batch (default 10)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before a request gets 504 (default 120)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _add_speed_flags(p)

    p = add("info", cmd_info, "show a model's parts, parameter counts and device")
    p.add_argument("--meta", action="store_true", help="build on the meta device (no memory; any size)")

    p = add("demo", cmd_demo, "generate an image from a prompt, then answer a question about it")
    p.add_argument("--prompt", default="a photo of a red circle and a blue square")
    p.add_argument("--question", default="how many circles are there?")
    p.add_argument("--outdir", default="demo_out")
    p.add_argument("--seed", type=int, default=0)

    p = add("convert", cmd_convert, "convert an official BLIP3-o folder (BLIP3o/BLIP3o-Model-8B, -4B) to this "
                                    "library's format", model=False)
    p.add_argument("directory", help="the official folder, as downloaded")
    p.add_argument("out", help="where to write the converted checkpoint")
    p.add_argument("--clip-encoder-weights", default=None,
                   help="folder with the EVA-CLIP tower's safetensors, if the official folder lacks it")

    p = add("data", cmd_data, "write Shapes-world training data as webdataset shards", model=False)
    p.add_argument("world", choices=["shapes"])
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=40_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--prompt-first", type=float, default=0.5,
                   help="share of scenes drawn for a random GenEval prompt (the rest: random scenes of 1-4 objects)")
    p.add_argument("--ordered", type=float, default=0.0,
                   help="share of those prompt scenes laid out in the prompt's ordered layout (one region per "
                        "named object, in the order named; a relation's objects in the halves it names)")
    p.add_argument("--canonical", type=float, default=0.0,
                   help="share of those prompt scenes with each named object centred in its canonical cell (a few "
                        "px of jitter): the text decides the layout (at most 1 - --ordered)")
    p.add_argument("--canonical-jitter", type=int, default=3, metavar="J",
                   help="canonical layouts move each centre by up to J px (0..3) and draw sizes in 16-2J..16+J")
    p.add_argument("--tag-weights", type=tag_weights_arg, default=None, metavar="FAMILY=W,...",
                   help="how often each prompt family is drawn, e.g. position=3,color_attr=3 (unnamed families 1)")

    p = add("train", cmd_train, "train: `nano` runs the whole recipe (data + 4 stages); a stage name runs one "
                                "stage from --config", model=False)
    p.add_argument("what", choices=["nano", "clip", "understanding", "decoder", "generation"])
    p.add_argument("--config", help="TrainConfig JSON (for a single stage)")
    p.add_argument("--out", default="runs/nano")
    p.add_argument("--data", default=None, help="Shapes shards folder (default: OUT/data, written if missing)")
    p.add_argument("--num-samples", type=int, default=40_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (quick runs)")
    p.add_argument("--stages", nargs="*", default=None, help="only these stages (the others are reused)")
    p.add_argument("--steps", nargs="*", type=stage_steps_arg, default=None, metavar="STAGE=N",
                   help="set stages' steps outright, e.g. understanding=2000 (not scaled by --scale)")

    p = add("eval", cmd_eval, "evaluate in the Shapes world: GenEval-style generation accuracy and VQA")
    p.add_argument("world", choices=["shapes"])
    p.add_argument("--out", default="eval_out")
    p.add_argument("--per-tag", type=int, default=25)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--num-scenes", type=int, default=200)
    p.add_argument("--steps", type=int, default=None, help="DiT sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="DiT CFG scale (default: the model's)")
    _add_sampling_flags(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or bad usage (2): returned, so callers and tests see the code
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
    if getattr(args, "model", None) is None and args.command != "demo":
        args.model = default_model()
    from blip3o.allocator import keep_freed_memory

    keep_freed_memory()  # CPU work reuses its freed activations instead of faulting in fresh pages (allocator.py)
    try:
        if getattr(args, "model", None) is not None:
            check_model_name(args.model)
        return args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, FileNotFoundError) as e:  # BadInput and the library's input checks
        return _fail(args, e, EXIT_BAD_INPUT)
    except Exception as e:
        return _fail(args, e, EXIT_FAILURE)


def _fail(args, error: Exception, code: int) -> int:
    if os.environ.get("BLIP3O_DEBUG"):
        raise error
    kind = "error" if code == EXIT_BAD_INPUT else f"failed ({type(error).__name__})"
    print(f"blip3o {args.command}: {kind}: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
