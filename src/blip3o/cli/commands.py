"""The generic commands: any model, any world. Each checks its input, calls the library and prints the result.

`generate` lives in generate.py (its batching and writing), `edit` in edit.py; the Shapes world's commands
(`data shapes`, `train nano`, `eval shapes`) in blip3o/shapes/commands.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from blip3o.cli.edit import edit_command
from blip3o.cli.errors import EXIT_OK, BadInput, interrupted_after, user_input
from blip3o.cli.files import check_output_file, check_output_folder, open_image, read_jsonl, readable_file
from blip3o.cli.generate import generate_command
from blip3o.cli.models import SPEED_FLAGS, load_for_command, load_model, model_flags
from blip3o.cli.numbers import count, number, seed
from blip3o.cli.table import Command, CommandTable, Flag, Refusal, flag
from blip3o.cli.terminal import progress
from blip3o.files import atomic_file, save_image, write_text
from blip3o.images import MAX_PIXELS

MAX_NEW_TOKENS = 32_768  # a reply's tokens: past every model's context
MAX_BATCH = 1_024  # questions per model call


# ------------------------------------------------------------------ ask


def run_ask(args: argparse.Namespace) -> int:
    if args.questions_file:
        return ask_questions_file(args)
    if not (args.image and args.question):
        raise BadInput('give an image and a question, e.g. blip3o ask image.png "what is this?", '
                       "or --questions-file FILE")
    if not args.question.strip():
        raise BadInput("QUESTION is empty; ask something")
    image = open_image(Path(args.image), "IMAGE")
    protocol, bounds = ask_protocol(args), pixel_bounds(args)
    model = load_for_command(args)
    with user_input(f"IMAGE {args.image}"):  # the processor's own checks (an aspect ratio past 200, ...)
        (answer,) = protocol.answer(model, [image], [args.question], max_new_tokens=args.max_new_tokens, **bounds)
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
    if None not in (args.min_pixels, args.max_pixels) and args.min_pixels > args.max_pixels:
        raise BadInput(f"--min-pixels {args.min_pixels} is above --max-pixels {args.max_pixels}")
    return {k: getattr(args, k) for k in ("min_pixels", "max_pixels") if getattr(args, k) is not None}


PIXEL_FLAGS = (
    count("--min-pixels", high=MAX_PIXELS, default=None,
          help="resize each image to at least this many pixels (default: the model's processor's)"),
    count("--max-pixels", high=MAX_PIXELS, default=None,
         help="resize each image to at most this many pixels (default: the model's processor's; a Qwen2.5-VL "
              "folder's preprocessor_config.json sets it)"),
)


def ask_questions_file(args: argparse.Namespace) -> int:
    """--questions-file: each record's answer, as the record plus `answer`, to --out (written whole at the end,
    with the protocol beside it) or stdout (line by line)."""
    records = read_jsonl(args.questions_file, {"image": str, "question": str})
    paths = [question_image(args.questions_file, number, record) for number, record in enumerate(records, 1)]
    bounds, protocol = pixel_bounds(args), ask_protocol(args)
    if args.out:
        check_output_file(Path(args.out), "--out")
    model = load_for_command(args)
    lines = answer_lines(model, args.questions_file, records, paths, protocol=protocol,
                         batch_size=protocol.batch_size or args.batch_size, max_new_tokens=args.max_new_tokens,
                         **bounds)
    settings = json.dumps({**protocol.settings(model), **bounds, "max_new_tokens": args.max_new_tokens})
    if not args.out:
        written = 0
        with interrupted_after(lambda: f"{written} of {len(records)} answers printed"):
            for line in lines:
                print(line, flush=True)
                written += 1
        print(f"protocol: {settings}", file=sys.stderr)
        return EXIT_OK
    out, beside = Path(args.out), Path(args.out).with_suffix(".protocol.json")
    written = 0
    with interrupted_after(lambda: f"{written} of {len(records)} questions answered; {out} is not written (it is "
                                   f"written whole at the end)"), atomic_file(out) as tmp, open(tmp, "w") as file:
        for line in lines:
            file.write(line + "\n")
            written += 1
    write_text(beside, settings + "\n")  # the protocol beside the answers: which inputs produced them
    print(f"{len(records)} answers in {out}, their protocol in {beside}")
    return EXIT_OK


def answer_lines(model, questions_file: str, records: list[dict], paths: list[Path], *, protocol, batch_size: int,
                 **options) -> Iterator[str]:
    """Each record plus its `answer`, as a JSON line, `batch_size` questions a model call; a record whose
    image the reader or the processor refuses is bad input naming it."""
    numbered = list(enumerate(zip(records, paths, strict=True), start=1))
    for batch in progress(list(chunks(numbered, batch_size)), desc="ask", unit="batch"):
        images = [open_image(path, f"{questions_file}: record {number}:") for number, (_, path) in batch]
        where = f"{questions_file}: records {batch[0][0]}..{batch[-1][0]}"
        with user_input(where):
            answers = protocol.answer(model, images, [r["question"] for _, (r, _) in batch], batch_size=batch_size,
                                      **options)
        for (_, (record, _)), answer in zip(batch, answers, strict=True):
            yield json.dumps({**record, "answer": answer})


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
        count("--batch-size", high=MAX_BATCH, default=8, help="questions per model call (default 8)"),
        count("--max-new-tokens", high=MAX_NEW_TOKENS, default=64),
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
    """Send `line` (with the attached images) and print the reply word by word as the model writes it. A
    message the model's processor refuses (an image's shape, say) is taken back with a word of why: the chat
    goes on."""
    content = [{"type": "image", "image": im} for im in attached] + [{"type": "text", "text": line}]
    history.append({"role": "user", "content": content if attached else line})
    if args.temperature is None:  # the model's generation config decides
        sampling = {}
    else:
        sampling = dict(do_sample=True, temperature=args.temperature) if args.temperature > 0 else {"do_sample": False}
    print("blip3o> ", end="", flush=True)
    try:
        with user_input("this message"):  # the processor's own checks of its images (an aspect ratio past 200, ...)
            (reply,) = model.chat([history], max_new_tokens=args.max_new_tokens, seed=args.seed,
                                  **pixel_bounds(args), **sampling,
                                  on_text=stripped_stream(lambda piece: print(piece, end="", flush=True)))
    except BadInput as e:
        history.pop()
        print(f"\nerror: {e}; it is not sent (type it again, with another image if one was attached)")
        return
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
        count("--max-new-tokens", high=MAX_NEW_TOKENS, default=128),
        number("--temperature", low=0, high=100, default=None,
               help="0: greedy; above 0 (to 100): sampling; default: the model's generation config (greedy without "
                    "one)"),
        seed("--seed", default=None, help="seed of the sampled replies (--temperature above 0)"),
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
    out = Path(args.outdir)
    check_output_folder(out, "--outdir")
    model = load_for_command(args)
    targets = [out / name for name in reconstruction_names(args.images)]
    done = 0
    with interrupted_after(lambda: f"{done} of {len(images)} images reconstructed in {out}/; the rest is not "
                                   f"written"):
        for path, image, target in zip(args.images, progress(images, desc="reconstruct", unit="image"), targets,
                                       strict=True):
            (result,) = model.reconstruct([image], seed=args.seed)
            save_image(result, target)
            print(f"{path} -> {target}")
            done += 1
    return EXIT_OK


def reconstruction_names(paths: list[str]) -> list[str]:
    """An output file name per input: STEM_reconstructed.png, and STEM_2_reconstructed.png, ... for a name met
    again (a/x.png and b/x.png), so that no output overwrites another."""
    names: list[str] = []
    for path in paths:
        stem, again = Path(path).stem, 2
        name = f"{stem}_reconstructed.png"
        while name in names:
            name, again = f"{stem}_{again}_reconstructed.png", again + 1
        names.append(name)
    return names


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
    for name, text in (("--prompt", args.prompt), ("--question", args.question)):
        if not text.strip():
            raise BadInput(f"{name} is empty")
    path = Path(args.outdir) / "generated.png"
    check_output_folder(path.parent, "--outdir")
    model = load_model(args.model, args.device, args.dtype)
    with interrupted_after(lambda: f"{path} is not written"):
        (image,) = model.generate([args.prompt], seed=args.seed)
        save_image(image, path)
    print(f"[{args.model}] generated {path} for {args.prompt!r}")
    with interrupted_after(lambda: f"{path} is written; the answer is not"):
        (answer,) = model.answer([image], [args.question])
    print(f"[{args.model}] Q: {args.question}\n[{args.model}] A: {answer.strip()}")
    return EXIT_OK


def run_convert(args: argparse.Namespace) -> int:
    from blip3o import Blip3o

    weights = args.clip_encoder_weights
    if weights is not None and not Path(weights).is_dir():
        raise BadInput(f"--clip-encoder-weights {weights}: no such folder")
    check_output_folder(Path(args.out), "OUT")
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
            flag("images", nargs="+"), flag("--outdir", default="outputs"), seed("--seed", default=0),
            *model_flags()), epilog="each IMAGE becomes OUTDIR/STEM_reconstructed.png (STEM_2_reconstructed.png, ... "
                                    "for a name met again);\nthe command prints which input went where"),
        Command(("info",), "show a model's parts, parameter counts and device", run_info, flags=(
            flag("--meta", action="store_true", help="build on the meta device (no memory; any size)"),
            *model_flags(),
        ), refusals=(Refusal(("device",), lambda a: a.meta, "cannot go with --meta, which builds on the meta "
                                                             "device"),)),
        Command(("demo",), "generate an image from a prompt, then answer a question about it", run_demo, flags=(
            flag("--prompt", default="a photo of a red circle and a blue square"),
            flag("--question", default="how many circles are there?"),
            flag("--outdir", default="demo_out"),
            seed("--seed", default=0),
            *model_flags())),
        Command(("convert",), "convert an official BLIP3-o folder (BLIP3o/BLIP3o-Model-8B, -4B) to this "
                              "library's format", run_convert, flags=(
            flag("directory", help="the official folder, as downloaded"),
            flag("out", help="where to write the converted checkpoint"),
            flag("--clip-encoder-weights", default=None,
                 help="folder with the EVA-CLIP tower's safetensors, if the official folder lacks it"))),
    ]


# ------------------------------------------------------------------ train STAGE


TRAIN_FLAG_NAMES = {"out_dir": "--out"}  # TrainConfig fields whose flag is not --FIELD-NAME


def train_flag_name(field_name: str) -> str:
    return TRAIN_FLAG_NAMES.get(field_name, "--" + field_name.replace("_", "-"))


def train_config_flags() -> tuple[Flag, ...]:
    """A flag for every TrainConfig field but `stage` (the command names it), made from the field's type: the
    flags and the config never drift apart. A flag not typed leaves the field to --config or its default."""
    import dataclasses
    import typing

    from blip3o.train import TrainConfig

    hints, flags = typing.get_type_hints(TrainConfig), []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stage":
            continue
        hint = hints[f.name]
        kind = next((k for k in (bool, int, float, str) if hint is k or k in typing.get_args(hint)), None)
        if hint is bool:
            options = {"action": argparse.BooleanOptionalAction}
        elif typing.get_origin(hint) is list:
            options = {"action": "append", "metavar": "SPEC"}
        elif typing.get_origin(hint) is tuple:
            options = {"type": float, "nargs": len(typing.get_args(hint)), "metavar": "X"}
        elif hint is dict:
            options = {"type": json_object, "metavar": "JSON"}
        else:
            options = {"type": kind, "metavar": f.name.split("_")[-1].upper()}
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        flags.append(flag(train_flag_name(f.name), dest=f.name, help=f"TrainConfig.{f.name} (default {default!r})",
                          **options))
    return tuple(flags)


def json_object(text: str) -> dict:
    """argparse type: a JSON object (argparse names the flag when it refuses one)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at column {e.colno}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object is expected, e.g. '{{\"prompt_share\": 0.9}}', got {text}")
    return value


def train_config(args: argparse.Namespace, stage: str):
    """The TrainConfig of `blip3o train STAGE`: --config's fields, the typed flags over them; a bad value is
    refused naming its flag (or the file it came from)."""
    import dataclasses
    import typing

    from blip3o.checkpoints.limits import TRAIN_BOUNDS, check_value, field_values
    from blip3o.train import TrainConfig

    fields = {}
    if args.config:
        readable_file(args.config, f"--config {args.config}")
        with user_input(args.config):
            fields = field_values(TrainConfig.from_json(args.config))
        if fields["stage"] != stage:
            raise BadInput(f"{args.config} trains the {fields['stage']} stage, not {stage}: run "
                           f"`blip3o train {fields['stage']} --config {args.config}`")
    hints = typing.get_type_hints(TrainConfig)
    typed = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if f.name != "stage" and getattr(args, f.name, None) is not None}
    if "betas" in typed:
        typed["betas"] = tuple(typed["betas"])
    for name, value in typed.items():
        check_value(train_flag_name(name), value, hints[name], TRAIN_BOUNDS.get(name), error=BadInput)
    try:
        return TrainConfig(**{**fields, **typed, "stage": stage})
    except ValueError as e:
        word = str(e).split()[0]
        name = "stage_options" if word == "stage" else word
        raise BadInput(f"{train_flag_name(name) if name in typed else args.config or 'TrainConfig'}: {e}") from None


def run_train_stage(args: argparse.Namespace) -> int:
    from blip3o.distributed import shutdown
    from blip3o.train import Trainer

    config = train_config(args, args.command.words[-1])
    if not config.data:
        raise BadInput("give the training data: --data SPEC (shards, JSONL, an image folder, LLaVA; "
                       "see `blip3o data check`), or `data` in --config")
    with user_input("--data" if args.data else args.config):
        from blip3o.data.spec import parse_spec

        parse_spec(config.data)  # every file the spec names exists, before the model loads
    with user_input():
        trainer = Trainer(config)
    model = trainer.fit()
    if trainer.world.is_main:
        print(f"trained model: {model}")
    shutdown(trainer.world)
    return EXIT_OK


def train_stage_command(stage: str) -> Command:
    return Command(("train", stage), f"train the {stage} stage on a data spec", run_train_stage,
                   flags=(flag("--config", help="TrainConfig JSON: its fields, under the flags typed"),
                          *train_config_flags()),
                   epilog=f"examples:\n  blip3o train {stage} --init MODEL_DIR --data captions.jsonl "
                          f"--out runs/{stage} --steps 1000 --batch-size 32\n"
                          f"  torchrun --nproc_per_node 8 -m blip3o.cli train {stage} --config {stage}.json "
                          f"--out runs/{stage}")


def register(table: CommandTable) -> None:
    """Add the generic commands to `table`, and the groups that other modules add targets to."""
    from blip3o.train import STAGES

    for command in (generate_command(), edit_command(), ask_command(), chat_command(), serve_command(),
                    *small_commands()):
        table.add(command)
    table.add_group("data", "training data: write Shapes shards, check a data set")
    table.add_group("train", "train a model: a recipe, or one stage from its --config file")
    for stage in STAGES:
        table.add(train_stage_command(stage))
    table.add_group("eval", "evaluate a model")
