"""The generic commands: any model, any world. Each checks its input, calls the library and prints the result.

The Shapes world's commands (`data shapes`, `train nano`, `eval shapes`) live in blip3o/shapes/commands.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from blip3o.cli.errors import EXIT_OK, BadInput, user_input
from blip3o.cli.files import open_image, read_jsonl, save_samples
from blip3o.cli.models import SAMPLING_FLAGS, SPEED_FLAGS, load_for_command, load_model, model_flags
from blip3o.cli.table import Command, CommandTable, Refusal, flag
from blip3o.cli.terminal import progress


def check_positive(args: argparse.Namespace, *dests: str) -> None:
    """BadInput unless each of these flags is unset (None) or above 0."""
    for dest in dests:
        value = getattr(args, dest)
        if value is not None and value <= 0:
            raise BadInput(f"--{dest.replace('_', '-')} must be positive, got {value}")


# ------------------------------------------------------------------ generate


def run_generate(args: argparse.Namespace) -> int:
    if args.prompts_file:
        records = read_jsonl(args.prompts_file, {"prompt": str})
    elif args.prompt:
        records = [{"prompt": p} for p in args.prompt]
    else:
        raise BadInput("give a prompt, e.g. blip3o generate \"a red circle\", or --prompts-file FILE")
    check_positive(args, "num_images", "steps", "batch_size")
    size = parse_size(args.size)
    model = load_for_command(args)
    if size:
        with user_input(f"--size {args.size}"):
            model.decoder.check_size(size["height"], size["width"])
    settings = dict(num_images=args.num_images, steps=args.steps, guidance=args.guidance, **size)
    if args.prompt and len(args.prompt) == 1:
        with progress(None, total=1, desc="generate", unit="prompt") as bar:
            images = model.generate(args.prompt, seed=args.seed, **settings)
            bar.update()
        print(save_samples(images, Path(args.outdir)))
    else:
        generate_geneval_layout(model, records, Path(args.outdir), args.seed, args.batch_size, settings)
        print(f"{len(records)} prompts x {args.num_images} images in {args.outdir}/ (GenEval layout)")
    return EXIT_OK


def parse_size(text: str | None) -> dict[str, int]:
    """--size N (an N x N square) or WxH (width x height, as OpenAI writes sizes) -> generate's height and
    width; {} when not given."""
    if text is None:
        return {}
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip().lower())
    if not match:
        raise BadInput(f"--size must be N (an N x N square) or WxH (width x height, e.g. 1344x768), got {text!r}")
    width = int(match[1])
    return {"height": int(match[2] or width), "width": width}


def generate_geneval_layout(model, records: list[dict], out: Path, seed: int, batch_size: int,
                            settings: dict) -> None:
    """GenEval's layout: OUT/00000/{metadata.jsonl, samples/0000.png, ..., grid.png}, a folder per record.

    Every prompt gets the same seed, so each folder holds what `blip3o generate PROMPT --seed S` makes;
    `batch_size` prompts share a model call (one seed per prompt keeps that true).
    """
    n = settings["num_images"]
    with progress(None, total=len(records), desc="generate", unit="prompt") as bar:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            images = model.generate([r["prompt"] for r in chunk], seed=[seed] * len(chunk), **settings)
            for offset, record in enumerate(chunk):
                folder = out / f"{start + offset:05d}"
                save_samples(images[offset * n:(offset + 1) * n], folder / "samples", grid=folder / "grid.png")
                (folder / "metadata.jsonl").write_text(json.dumps(record) + "\n")
            bar.update(len(chunk))


def generate_command() -> Command:
    return Command(("generate",), "generate images from text prompts", run_generate, flags=(
        flag("prompt", nargs="*", help="one or more prompts"),
        flag("--prompts-file", help="JSON lines, one object with a `prompt` per line (GenEval's "
                                    "evaluation_metadata.jsonl); every field is kept in metadata.jsonl"),
        flag("--outdir", default="outputs"),
        flag("--num-images", type=int, default=1, help="images per prompt (default 1)"),
        flag("--seed", type=int, default=0, help="random seed (default 0); same seed, same images"),
        flag("--size", default=None, metavar="N|WxH",
             help="image size in pixels: N for an N x N square, or WxH (width x height, e.g. 1344x768); each side "
                  "a multiple of the decoder's (32 for SDXL); default: the decoder's square"),
        flag("--batch-size", type=int, default=8, help="prompts per model call (default 8)"),
        *model_flags(), *SAMPLING_FLAGS, *SPEED_FLAGS,
    ), refusals=(
        Refusal(("prompt",), lambda a: bool(a.prompts_file),
                "cannot go with --prompts-file: give prompts on the command line or in the file, not both"),
    ), epilog=(
        "one prompt writes DIR/0000.png, 0001.png, ... and DIR/grid.png; several prompts or --prompts-file\n"
        "write GenEval's layout: DIR/00000/metadata.jsonl, DIR/00000/samples/0000.png, ..., DIR/00000/grid.png\n"
        "(each prompt is generated with the same --seed; --batch-size prompts share a model call)\n\n"
        "examples:\n"
        '  blip3o generate "two red circles" --num-images 4 --seed 0 --outdir out/\n'
        '  blip3o generate "a lighthouse at dusk" --model my-blip3o --size 1344x768   # 1344 wide, 768 high\n'
        "  blip3o generate --prompts-file evaluation_metadata.jsonl --outdir geneval_out/ --num-images 4"))


# ------------------------------------------------------------------ ask


def run_ask(args: argparse.Namespace) -> int:
    if args.questions_file:
        return ask_questions_file(args)
    if not (args.image and args.question):
        raise BadInput('give an image and a question, e.g. blip3o ask image.png "what is this?", '
                       "or --questions-file FILE")
    image = open_image(Path(args.image), "IMAGE")
    protocol = ask_protocol(args)
    model = load_for_command(args)
    (answer,) = protocol.answer(model, [image], [args.question], max_new_tokens=args.max_new_tokens,
                                **pixel_bounds(args))
    print(answer.strip())  # the answer as decoded may begin or end with whitespace: not shown
    return EXIT_OK


def ask_protocol(args: argparse.Namespace):
    """--protocol's UnderstandingProtocol; on a GPU its dtype unless --dtype names one."""
    from blip3o.protocols import PROTOCOLS

    protocol = PROTOCOLS[args.protocol]
    if protocol.gpu_dtype and args.dtype is None and str(args.device or "cpu").startswith("cuda"):
        args.dtype = protocol.gpu_dtype
    return protocol


def pixel_bounds(args: argparse.Namespace) -> dict:
    """--min-pixels/--max-pixels as `answer`/`chat` options (checked before the model loads); {} if not given."""
    check_positive(args, "min_pixels", "max_pixels")
    if None not in (args.min_pixels, args.max_pixels) and args.min_pixels > args.max_pixels:
        raise BadInput(f"--min-pixels {args.min_pixels} is above --max-pixels {args.max_pixels}")
    return {k: getattr(args, k) for k in ("min_pixels", "max_pixels") if getattr(args, k) is not None}


PIXEL_FLAGS = (
    flag("--min-pixels", type=int, default=None,
         help="resize each image to at least this many pixels (default: the model's processor's)"),
    flag("--max-pixels", type=int, default=None,
         help="resize each image to at most this many pixels (default: the model's processor's; a Qwen2.5-VL "
              "folder's preprocessor_config.json sets it)"),
)


def ask_questions_file(args: argparse.Namespace) -> int:
    """--questions-file: each record's answer, as the record plus `answer`, to --out or stdout."""
    records = read_jsonl(args.questions_file, {"image": str, "question": str})
    paths = [question_image(args.questions_file, number, record) for number, record in enumerate(records, 1)]
    check_positive(args, "batch_size")
    bounds, protocol = pixel_bounds(args), ask_protocol(args)
    model = load_for_command(args)
    size = protocol.batch_size or args.batch_size
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115 - stdout must stay open
    try:
        batches = list(chunks(list(zip(records, paths, strict=True)), size))
        for batch in progress(batches, desc="ask", unit="batch"):
            images = [open_image(path, f"{args.questions_file}: {path}") for _, path in batch]
            answers = protocol.answer(model, images, [r["question"] for r, _ in batch], batch_size=size,
                                      max_new_tokens=args.max_new_tokens, **bounds)
            for (record, _), answer in zip(batch, answers, strict=True):
                out.write(json.dumps({**record, "answer": answer}) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    settings = json.dumps({**protocol.settings(model), **bounds, "max_new_tokens": args.max_new_tokens})
    if args.out:  # the protocol beside the answers: which inputs produced them
        Path(args.out).with_suffix(".protocol.json").write_text(settings + "\n")
        print(f"{len(records)} answers in {args.out}, their protocol in {Path(args.out).with_suffix('.protocol.json')}")
    else:
        print(f"protocol: {settings}", file=sys.stderr)
    return EXIT_OK


def question_image(questions_file: str, number: int, record: dict) -> Path:
    """A record's image: relative paths to the working folder, else to the questions file's folder."""
    path = Path(record["image"]).expanduser()
    if not path.is_absolute() and not path.exists():
        path = Path(questions_file).parent / path
    if not path.is_file():
        raise BadInput(f"{questions_file}: record {number}: no image file {record['image']}")
    return path


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def ask_command() -> Command:
    file_only = "applies to --questions-file only (one question's answer is printed)"
    return Command(("ask",), "answer questions about images", run_ask, flags=(
        flag("image", nargs="?", help="an image file"),
        flag("question", nargs="?", help="a question about it"),
        flag("--questions-file", help="JSON lines, each with `image` and `question`"),
        flag("--out", help="where --questions-file's answers go (JSON lines; default: standard output)"),
        flag("--batch-size", type=int, default=8, help="questions per model call (default 8)"),
        flag("--max-new-tokens", type=int, default=64),
        flag("--protocol", choices=["stock", "blip3o"], default="stock",
             help="the inputs: stock (default) = the model's processor; blip3o = the original's evaluation "
                  "(RGB + JPEG round trip, 200,704..1,605,632 pixels, float16 on a GPU, stop at <|im_end|>, one "
                  "question a call; docs/evaluation.md)"),
        *PIXEL_FLAGS, *model_flags(),
    ), refusals=(
        Refusal(("min_pixels", "max_pixels"), lambda a: a.protocol == "blip3o",
                "cannot go with --protocol blip3o, which sets the original's pixel bounds"),
        Refusal(("batch_size",), lambda a: a.protocol == "blip3o",
                "cannot go with --protocol blip3o, which asks one question a call as the original's evaluation"),
        Refusal(("image", "question"), lambda a: bool(a.questions_file),
                "cannot go with --questions-file: give IMAGE QUESTION or --questions-file, not both"),
        Refusal(("out", "batch_size"), lambda a: not a.questions_file, file_only),
    ), epilog=(
        "--questions-file: JSON lines with `image` (a path: relative to the working folder, else to the file's\n"
        "folder) and `question`; each output line is the same object plus `answer` (as decoded), and the\n"
        "protocol's settings go beside --out (answers.jsonl -> answers.protocol.json).\n\n"
        "examples:\n"
        '  blip3o ask photo.png "how many circles are there?"\n'
        "  blip3o ask --questions-file questions.jsonl --out answers.jsonl\n"
        "  blip3o ask --questions-file questions.jsonl --out answers.jsonl --protocol blip3o --device cuda"))


# ------------------------------------------------------------------ chat

CHAT_HELP = "type a message; /image PATH attaches an image to your next message, /reset starts over, /quit leaves"


def run_chat(args: argparse.Namespace) -> int:
    attached = [open_image(Path(p), "--image") for p in args.image]
    pixel_bounds(args)
    model = load_for_command(args)
    print(f"chatting with {args.model}: {CHAT_HELP}")
    history: list[dict] = []
    for line in typed_lines():
        command, _, rest = line.partition(" ")
        if command in ("/quit", "/exit"):
            break
        if command == "/reset":
            history, attached = [], []
            print("(a new conversation)")
        elif command == "/image" and rest.strip():
            attached += attach(rest.strip())
        elif line.startswith("/"):
            print(CHAT_HELP)
        else:
            chat_turn(model, history, attached, line, args)
            attached = []
    return EXIT_OK


def typed_lines() -> Iterator[str]:
    """The user's non-empty lines, until end of input; a prompt only when a person types them."""
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except EOFError:
            return
        if line:
            yield line


def attach(path: str) -> list:
    """/image PATH: the image, or none and a word of why (the chat goes on)."""
    try:
        image = open_image(Path(path).expanduser(), "/image")
    except BadInput as e:
        print(f"error: {e}")
        return []
    print(f"(attached {path}; it goes with your next message)")
    return [image]


def chat_turn(model, history: list[dict], attached: list, line: str, args: argparse.Namespace) -> None:
    """Send `line` (with the attached images) and print the reply word by word as the model writes it."""
    content = [{"type": "image", "image": im} for im in attached] + [{"type": "text", "text": line}]
    history.append({"role": "user", "content": content if attached else line})
    if args.temperature is None:  # the model's generation config decides
        sampling = {}
    else:
        sampling = dict(do_sample=True, temperature=args.temperature) if args.temperature > 0 else {"do_sample": False}
    print("blip3o> ", end="", flush=True)
    (reply,) = model.chat([history], max_new_tokens=args.max_new_tokens, seed=args.seed, **pixel_bounds(args),
                          on_text=stripped_stream(lambda piece: print(piece, end="", flush=True)), **sampling)
    history.append({"role": "assistant", "content": reply})  # as decoded: the model reads its own words back
    print(flush=True)


def stripped_stream(on_text: Callable[[str], None]) -> Callable[[str], None]:
    """Wrap a streaming callback for display: the pieces it receives concatenate to the reply without the
    whitespace at its edges (leading whitespace dropped, other whitespace held back until text follows)."""
    started, held = False, ""

    def forward(piece: str) -> None:
        nonlocal started, held
        text = held + piece if started else (held + piece).lstrip()
        body = text.rstrip()
        held, started = text[len(body):], started or bool(body)
        if body:
            on_text(body)

    return forward


def chat_command() -> Command:
    return Command(("chat",), "chat about images in the terminal", run_chat, flags=(
        flag("--image", action="append", default=[], help="attach an image to the first message"),
        flag("--max-new-tokens", type=int, default=128),
        flag("--temperature", type=float, default=None,
             help="0: greedy; above 0: sampling; default: the model's generation config (greedy without one)"),
        flag("--seed", type=int, default=None, help="seed of the sampled replies (--temperature above 0)"),
        *PIXEL_FLAGS, *model_flags(),
    ), refusals=(
        Refusal(("seed",), lambda a: a.temperature is None or a.temperature <= 0,
                "applies to sampled replies only (--temperature above 0)"),
    ), epilog=(
        "in the chat: /image PATH attaches an image to your next message, /reset starts a new conversation,\n"
        "/quit (or Ctrl-D) leaves.\n\nexample:\n  blip3o chat --image photo.png"))


# ------------------------------------------------------------------ reconstruct, info, serve, demo, convert


def run_reconstruct(args: argparse.Namespace) -> int:
    images = [open_image(Path(p), "IMAGES") for p in args.images]
    model = load_for_command(args)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    for path, image in zip(args.images, progress(images, desc="reconstruct", unit="image"), strict=True):
        (result,) = model.reconstruct([image], seed=args.seed)
        target = out / f"{Path(path).stem}_reconstructed.png"
        result.save(target)
        print(target)
    return EXIT_OK


def run_info(args: argparse.Namespace) -> int:
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


def run_serve(args: argparse.Namespace) -> int:
    from blip3o.server import Blip3oService, ServerConfig, create_app, listen_socket, serve

    pixel_bounds(args)  # checked here, so that a bad bound is named by its flag
    if not 0 <= args.port <= 65535:
        raise BadInput(f"--port must be between 0 and 65535, got {args.port}")
    with user_input():
        config = ServerConfig(allow_dirs=args.allow_dir, max_queue=args.max_queue,
                              max_batch_images=args.max_batch_images, batch_window_ms=args.batch_window_ms,
                              request_timeout_s=args.timeout, chat_min_pixels=args.min_pixels,
                              chat_max_pixels=args.max_pixels, docs=args.docs)
    for folder in config.allow_dirs:
        if not folder.is_dir():
            raise BadInput(f"--allow-dir {folder}: no such folder")
    try:  # before the model loads and anything is printed: a port in use is the user's to change
        sock = listen_socket(args.host, args.port)
    except OSError as e:
        raise BadInput(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another --port "
                       "or --host") from e
    with sock:
        model = load_for_command(args)
        model_id = Path(args.model).name if Path(args.model).is_dir() else args.model
        url = f"http://{args.host}:{sock.getsockname()[1]}"
        docs = f", {url}/docs (API reference)" if args.docs else ""
        print(f"serving {model_id} at {url}/ (web page) and {url}/v1 (OpenAI API){docs}; Ctrl-C stops", flush=True)
        serve(create_app(Blip3oService(model, model_id, config)), sock, log_level=args.log_level)
    return EXIT_OK


def run_demo(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.device, args.dtype)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    (image,) = model.generate([args.prompt], seed=args.seed)
    path = out / "generated.png"
    image.save(path)
    print(f"[{args.model}] generated {path} for {args.prompt!r}")
    (answer,) = model.answer([image], [args.question])
    print(f"[{args.model}] Q: {args.question}\n[{args.model}] A: {answer.strip()}")
    return EXIT_OK


def run_convert(args: argparse.Namespace) -> int:
    from blip3o import Blip3o

    weights = args.clip_encoder_weights
    if weights is not None and not Path(weights).is_dir():
        raise BadInput(f"--clip-encoder-weights {weights}: no such folder")
    model = Blip3o.from_pretrained(args.directory, clip_encoder_weights=weights)  # converted on load
    print(model.save_pretrained(args.out))
    return EXIT_OK


def serve_command() -> Command:
    return Command(("serve",), "serve the model: an OpenAI-compatible API and a web page", run_serve, flags=(
        flag("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: loopback only)"),
        flag("--port", type=int, default=8000),
        flag("--allow-dir", action="append", default=[], metavar="DIR",
             help="a folder whose images chat requests may name by path (repeatable; default: none)"),
        flag("--max-queue", type=int, default=64, help="requests waiting past this get 429 (default 64)"),
        flag("--max-batch-images", type=int, default=16, help="images per generate call (default 16)"),
        flag("--batch-window-ms", type=float, default=10.0, help="time to gather a batch (default 10)"),
        flag("--timeout", type=float, default=120.0, help="seconds before a request gets 504 (default 120)"),
        flag("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]),
        flag("--docs", action="store_true", help="also serve the API reference pages: /docs, /redoc, /openapi.json"),
        *PIXEL_FLAGS, *model_flags(), *SPEED_FLAGS,
    ), epilog=(
        "routes: POST /v1/images/generations, POST /v1/chat/completions, GET /v1/models, GET /health,\n"
        "GET /metrics (Prometheus), GET / (the web page); with --docs, GET /docs, /redoc, /openapi.json\n\n"
        "example:\n  blip3o serve --model nano --port 8000 --allow-dir ~/pictures"))


def small_commands() -> list[Command]:
    """reconstruct, info, demo, convert: a few flags each."""
    return [
        Command(("reconstruct",), "encode images to CLIP tokens and decode them back", run_reconstruct, flags=(
            flag("images", nargs="+"), flag("--outdir", default="outputs"), flag("--seed", type=int, default=0),
            *model_flags())),
        Command(("info",), "show a model's parts, parameter counts and device", run_info, flags=(
            flag("--meta", action="store_true", help="build on the meta device (no memory; any size)"),
            *model_flags(),
        ), refusals=(Refusal(("device",), lambda a: a.meta, "cannot go with --meta, which builds on the meta "
                                                             "device"),)),
        Command(("demo",), "generate an image from a prompt, then answer a question about it", run_demo, flags=(
            flag("--prompt", default="a photo of a red circle and a blue square"),
            flag("--question", default="how many circles are there?"),
            flag("--outdir", default="demo_out"),
            flag("--seed", type=int, default=0),
            *model_flags())),
        Command(("convert",), "convert an official BLIP3-o folder (BLIP3o/BLIP3o-Model-8B, -4B) to this "
                              "library's format", run_convert, flags=(
            flag("directory", help="the official folder, as downloaded"),
            flag("out", help="where to write the converted checkpoint"),
            flag("--clip-encoder-weights", default=None,
                 help="folder with the EVA-CLIP tower's safetensors, if the official folder lacks it"))),
    ]


# ------------------------------------------------------------------ train STAGE


def run_train_stage(args: argparse.Namespace) -> int:
    from blip3o.train import TrainConfig
    from blip3o.train.recipe import train_stage

    stage = args.command.words[-1]
    if not Path(args.config).is_file():
        raise BadInput(f"--config {args.config}: no such file")
    with user_input(args.config):
        config = TrainConfig.from_json(args.config)
    if config.stage != stage:
        raise BadInput(f"{args.config} trains the {config.stage} stage, not {stage}: run "
                       f"`blip3o train {config.stage} --config {args.config}`")
    if not config.data:
        raise BadInput(f"{args.config}: `data` must list the training shards")
    print(f"trained model: {train_stage(args.config)}")
    return EXIT_OK


def train_stage_command(stage: str) -> Command:
    return Command(("train", stage), f"train the {stage} stage as its --config file says", run_train_stage,
                   flags=(flag("--config", required=True, help="TrainConfig JSON: the stage, its data, "
                                                               "out_dir, steps, seed, device, ..."),),
                   other_options="a stage takes every setting (out_dir, data, seed, device, steps, ...) from its "
                                 "--config file; set it there",
                   epilog=f"example:\n  torchrun --nproc_per_node 2 -m blip3o.cli train {stage} --config {stage}.json")


def register(table: CommandTable) -> None:
    """Add the generic commands to `table`, and the groups that other modules add targets to."""
    from blip3o.train import STAGES

    for command in (generate_command(), ask_command(), chat_command(), serve_command(), *small_commands()):
        table.add(command)
    table.add_group("data", "training data: write Shapes shards, check a data set")
    table.add_group("train", "train a model: a recipe, or one stage from its --config file")
    for stage in STAGES:
        table.add(train_stage_command(stage))
    table.add_group("eval", "evaluate a model")
