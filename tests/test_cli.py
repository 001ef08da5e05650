"""The `blip3o` command line end to end on the debug model: layouts, files, refusals, exit codes, help."""

import importlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o import Blip3o
from blip3o.cli import commands as generic_commands
from blip3o.cli import main
from blip3o.cli.entry import COMMAND_MODULES, command_table
from blip3o.cli.table import Command, CommandTable, Refusal, flag
from blip3o.shapes import commands as shapes_commands


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved debug model: a folder gives every command the same weights (a preset is random each load)."""
    torch.manual_seed(0)
    return Blip3o.from_preset("debug").save_pretrained(tmp_path_factory.mktemp("cli") / "debug-model")


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "circle.png"
    Image.new("RGB", (32, 32), (220, 40, 40)).save(path)
    return path


def same_pixels(a: Path, b: Path) -> bool:
    return Image.open(a).tobytes() == Image.open(b).tobytes()


def near_pixels(a: Path, b: Path, levels: int = 2) -> bool:
    """Equal up to floating-point rounding between batch sizes (a level or two of 255)."""
    x, y = (np.asarray(Image.open(p), dtype=np.int16) for p in (a, b))
    return x.shape == y.shape and int(np.abs(x - y).max()) <= levels


def test_help_names_every_command_examples_and_exit_codes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("generate", "ask", "chat", "reconstruct", "serve", "info", "train", "eval", "data", "convert"):
        assert command in out
    assert "examples:" in out and "exit codes:" in out and "2 bad usage or bad input" in out
    for command in ("generate", "ask", "chat", "serve"):
        assert main([command, "--help"]) == 0
        assert "example" in capsys.readouterr().out
    assert main(["generate", "--no-such-flag"]) == 2
    assert main([]) == 2


def test_generate_one_prompt_writes_pngs_and_a_grid(checkpoint, tmp_path, capsys):
    out = tmp_path / "one"
    args = ["generate", "--model", str(checkpoint), "a red circle", "--num-images", "2", "--seed", "3"]
    assert main([*args, "--outdir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000.png", "0001.png", "grid.png"]
    assert Image.open(out / "grid.png").size == (64, 32)
    assert main([*args, "--outdir", str(tmp_path / "again")]) == 0  # same seed, same images
    assert same_pixels(out / "0001.png", tmp_path / "again" / "0001.png")


def test_generate_size_is_a_square_side_or_width_x_height(checkpoint, tmp_path):
    # 32x56 is 768x1344's 4:7 portrait at the debug decoder's scale; WxH is width x height, as OpenAI writes it
    args = ["generate", "--model", str(checkpoint), "a red circle", "--seed", "3"]
    assert main([*args, "--size", "32x56", "--outdir", str(tmp_path / "tall")]) == 0
    assert main([*args, "--size", "56x32", "--outdir", str(tmp_path / "wide")]) == 0
    assert main([*args, "--size", "32", "--outdir", str(tmp_path / "square")]) == 0
    tall = Image.open(tmp_path / "tall" / "0000.png")
    assert tall.size == (32, 56) and Image.open(tmp_path / "wide" / "0000.png").size == (56, 32)
    assert Image.open(tmp_path / "square" / "0000.png").size == (32, 32)
    (want,) = Blip3o.from_pretrained(checkpoint).generate(["a red circle"], height=56, width=32, seed=3)
    assert tall.tobytes() == want.tobytes()  # the command is the library call


def test_generate_with_the_stochastic_sampler(checkpoint, tmp_path):
    args = ["generate", "--model", str(checkpoint), "a red circle", "--seed", "3"]
    assert main([*args, "--outdir", str(tmp_path / "euler")]) == 0
    stochastic = [*args, "--sampler", "stochastic", "--eta", "1"]
    assert main([*stochastic, "--outdir", str(tmp_path / "s1")]) == 0
    assert main([*stochastic, "--outdir", str(tmp_path / "s2")]) == 0
    assert same_pixels(tmp_path / "s1" / "0000.png", tmp_path / "s2" / "0000.png")  # seeded
    assert not same_pixels(tmp_path / "s1" / "0000.png", tmp_path / "euler" / "0000.png")


def test_generate_prompts_file_writes_genevals_layout(checkpoint, tmp_path):
    records = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a red circle"},
               {"tag": "two_object", "prompt": "a red circle and a blue square"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")
    out = tmp_path / "geneval"
    code = main(["generate", "--model", str(checkpoint), "--prompts-file", str(prompts), "--outdir", str(out),
                 "--num-images", "2", "--seed", "3"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001"]
    for index, record in enumerate(records):
        folder = out / f"{index:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == record
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert (folder / "grid.png").exists()
    # each prompt folder holds what the one-prompt command makes with the same seed, though both prompts
    # shared a model call (--batch-size 8)
    for index, record in enumerate(records):
        single = tmp_path / f"single{index}"
        assert main(["generate", "--model", str(checkpoint), record["prompt"], "--num-images", "2", "--seed", "3",
                     "--outdir", str(single)]) == 0
        for name in ("0000.png", "0001.png"):
            assert near_pixels(out / f"{index:05d}" / "samples" / name, single / name)
    assert not same_pixels(out / "00000" / "samples" / "0000.png", out / "00000" / "samples" / "0001.png")


def test_ask_one_and_a_questions_file(checkpoint, image_path, tmp_path, capsys):
    assert main(["ask", "--model", str(checkpoint), str(image_path), "what is this?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()  # an answer (gibberish: the model is random)
    folder = tmp_path / "qa"
    folder.mkdir()
    Image.new("RGB", (40, 24), (20, 40, 220)).save(folder / "square.png")
    questions = [{"image": str(image_path), "question": "what color?", "id": 1},
                 {"image": "square.png", "question": "what shape?", "id": 2},  # relative to the file's folder
                 {"image": str(image_path), "question": "how many?", "id": 3}]
    qfile = folder / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers = tmp_path / "answers.jsonl"
    assert main(["ask", "--model", str(checkpoint), "--questions-file", str(qfile), "--out", str(answers),
                 "--batch-size", "2", "--max-new-tokens", "4"]) == 0
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [{k: v for k, v in line.items() if k != "answer"} for line in lines] == questions
    assert all(isinstance(line["answer"], str) for line in lines)


def test_chat_in_the_terminal(checkpoint, image_path, monkeypatch, capsys):
    script = f"/image {image_path}\nwhat is this?\nand now?\n/image /no/such.png\n/reset\nhello\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("blip3o> ") == 3
    replies = [line.split("blip3o> ", 1)[1] for line in out.splitlines() if "blip3o> " in line]
    model = Blip3o.from_pretrained(checkpoint)  # the streamed words are the reply chat returns
    image = Image.open(image_path).convert("RGB")
    (first,) = model.chat([[{"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "text", "text": "what is this?"}]}]],
                          max_new_tokens=4)
    assert replies[0].rstrip() == first.strip()  # shown without the whitespace at its edges
    assert "attached" in out and "no image file" in out and "new conversation" in out


def test_reconstruct_and_info(checkpoint, image_path, tmp_path, capsys):
    assert main(["reconstruct", "--model", str(checkpoint), str(image_path), "--outdir", str(tmp_path)]) == 0
    assert (tmp_path / "circle_reconstructed.png").exists()
    assert main(["info", "--model", "debug"]) == 0
    out = capsys.readouterr().out
    assert "device: cpu" in out and "dit" in out and "decoder" in out and "total" in out


def test_bad_input_exits_2_with_a_message(checkpoint, image_path, tmp_path, capsys):
    def fails(args, expected):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert expected in err, err

    fails(["generate", "--model", "BLIP3o/BLIP3o-Model-8B", "a circle"], "downloads nothing")
    fails(["generate", "--model", "BLIP3o/BLIP3o-Model-8B", "a circle"], "neither a preset")
    fails(["generate", "--model", str(image_path), "a circle"], "is a file")
    fails(["generate", "--model", "debug"], "give a prompt")
    fails(["generate", "--model", "debug", "a circle", "--sampler", "stochastic", "--eta", "2"],
          "eta 2.0 is not in [0, 1]")
    fails(["eval", "shapes", "--model", "debug", "--steps", "0"], "--steps must be positive")
    fails(["generate", "--model", "debug", "--prompts-file", str(tmp_path / "missing.jsonl")], "no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a circle"}\n{"prompt": \n')
    fails(["generate", "--model", "debug", "--prompts-file", str(bad)], "bad.jsonl:2: not valid JSON")
    bad.write_text('{"tag": "single_object"}\n')
    fails(["generate", "--model", "debug", "--prompts-file", str(bad)], "bad.jsonl:1: needs 'prompt'")
    fails(["generate", "--model", "debug", "a circle", "--num-images", "0"], "--num-images must be positive")
    fails(["generate", "--model", str(checkpoint), "a circle", "--size", "33"],
          "--size 33: height 33 is not a positive multiple of 4")
    fails(["generate", "--model", str(checkpoint), "a circle", "--size", "32x30"], "--size 32x30: height 30 is not")
    fails(["generate", "--model", "debug", "a circle", "--size", "32by56"], "--size must be N (an N x N square) or WxH")
    fails(["generate", "--model", "nano", "a circle", "--size", "64x96"], "makes 64x64 images only")
    fails(["ask", "--model", "debug", str(tmp_path / "nope.png"), "what?"], "no image file")
    fails(["ask", "--model", "debug", str(bad), "what?"], "not an image")
    fails(["ask", "--model", "debug", str(image_path)], "give an image and a question")
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"image": "gone.png", "question": "what?"}\n')
    fails(["ask", "--model", "debug", "--questions-file", str(questions)], "record 1: no image file gone.png")
    fails(["serve", "--model", "debug", "--allow-dir", str(tmp_path / "nowhere")], "no such folder")
    fails(["data", "shapes", "--out", str(tmp_path / "d"), "--num", "4", "--prompt-first", "2"],
          "prompt_first must be a share in [0, 1]")
    fails(["data", "shapes", "--out", str(tmp_path / "d"), "--num", "4", "--ordered", "1.5"],
          "ordered must be a share in [0, 1]")
    fails(["data", "shapes", "--out", str(tmp_path / "d"), "--num", "4", "--canonical", "-1"],
          "canonical must be a share")
    fails(["data", "shapes", "--out", str(tmp_path / "d"), "--num", "4", "--tag-weights", "position"],
          "expected FAMILY=WEIGHT pairs")
    fails(["data", "shapes", "--out", str(tmp_path / "d"), "--num", "4", "--tag-weights", "where=2"],
          "unknown prompt family 'where'")


def test_library_checks_of_user_values_exit_2(tmp_path, capsys):
    """A library check run on the user's values (user_input) and CheckpointError are bad input too."""
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (4, 4)).save(tiny)
    assert main(["ask", "--model", "debug", str(tiny), "what?"]) == 2
    assert "both sides must be at least" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--model", str(tmp_path / "empty"), "a circle"]) == 2  # CheckpointError
    assert "blip3o generate: error:" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_flags_a_mode_ignores_are_refused(tmp_path, image_path, capsys):
    def refused(args, expected):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert expected in err, err

    config = tmp_path / "clip.json"
    config.write_text(json.dumps({"stage": "clip", "out_dir": str(tmp_path / "run"), "data": ["shards"]}))
    refused(["train", "clip", "--config", str(config), "--scale", "2"], "unrecognized arguments: --scale 2")
    refused(["train", "decoder", "--config", str(config)], "trains the clip stage, not decoder")
    config.write_text(json.dumps({"stage": "clip", "out_dir": "x", "stepz": 3}))
    refused(["train", "clip", "--config", str(config)], "unknown train config fields ['stepz']")
    refused(["train", "clip", "--config", str(tmp_path / "none.json")], "no such file")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a circle"}\n')
    refused(["generate", "a circle", "--prompts-file", str(prompts)], "PROMPT cannot go with --prompts-file")
    refused(["generate", "--model", "debug", "a circle", "--eta", "0.5"], "--eta is the stochastic sampler's noise")
    refused(["ask", str(image_path), "what?", "--out", "a.jsonl"], "--out applies to --questions-file only")
    # typed counts, not the value: --batch-size 8 is the default, and still meaningless for one question
    refused(["ask", str(image_path), "what?", "--batch-size", "8"], "--batch-size applies to --questions-file")
    refused(["ask", str(image_path), "--questions-file", str(prompts)], "IMAGE cannot go with --questions-file")
    refused(["chat", "--seed", "3"], "--seed applies to sampled replies only")
    refused(["info", "--meta", "--device", "cpu"], "--device cannot go with --meta")
    data = ["data", "shapes", "--out", str(tmp_path / "d"), "--num", "4"]
    refused([*data, "--prompt-first", "0", "--ordered", "0.5"], "--ordered applies to scenes drawn for a prompt")
    refused([*data, "--canonical-jitter", "1"], "--canonical-jitter moves canonical layouts only")
    refused(["train", "nano", "--scale", "2", "--stages", "clip", "--steps", "clip=5"], "--scale has nothing")
    refused(["train", "nano", "--stages", "clip", "--steps", "decoder=5"], "--stages does not run decoder")
    refused(["train", "nano", "--stages", "clipp"], "--stages: unknown stage 'clipp'")
    assert not (tmp_path / "d").exists() and not (tmp_path / "run").exists()  # refused before any work


def test_an_internal_error_exits_1_in_one_line_with_the_traceback_only_when_debugging(monkeypatch, capsys):
    def broken_load(*args):
        raise ValueError("a bug's ValueError is no bad input")

    monkeypatch.setattr("blip3o.cli.models.load_model", broken_load)
    assert main(["generate", "--model", "debug", "a circle"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("blip3o generate: failed (ValueError): a bug's ValueError is no bad input "
                           "(BLIP3O_DEBUG=1 shows the traceback)")
    monkeypatch.setenv("BLIP3O_DEBUG", "1")
    assert main(["generate", "--model", "debug", "a circle"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken_load" in err
    assert err.strip().endswith("blip3o generate: failed (ValueError): a bug's ValueError is no bad input")


def test_runtime_failure_exits_1_and_ctrl_c_130(monkeypatch, capsys):
    class Broken:
        def generate(self, *args, **kwargs):
            raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr("blip3o.cli.models.load_model", lambda *args: Broken())
    assert main(["generate", "--model", "debug", "a circle"]) == 1
    assert "failed (RuntimeError): CUDA out of memory" in capsys.readouterr().err

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("blip3o.cli.models.load_model", interrupted)
    assert main(["generate", "--model", "debug", "a circle"]) == 130
    assert capsys.readouterr().err.strip() == "blip3o generate: interrupted"


def test_the_shapes_commands_register_from_the_shapes_package():
    table = CommandTable("", "")
    generic_commands.register(table)
    assert ("train", "clip") in table.commands
    assert not [words for words in table.commands if words in (("data", "shapes"), ("train", "nano"),
                                                                ("eval", "shapes"))]
    help_text = table.build_parser()[0].format_help()
    assert "generate" in help_text and "eval" not in help_text  # a group with no target is left out
    shapes_commands.register(table)
    assert {("data", "shapes"), ("train", "nano"), ("eval", "shapes")} <= set(table.commands)
    for module in COMMAND_MODULES[2:]:  # the benchmark and data commands
        importlib.import_module(module).register(table)
    assert list(table.commands) == list(command_table().commands)  # what `blip3o` runs
    with pytest.raises(ValueError, match="added twice"):
        shapes_commands.register(table)


def test_the_table_fills_defaults_and_knows_what_was_typed():
    table = CommandTable("", "")
    with pytest.raises(ValueError, match="needs a group"):
        table.add(Command(("eval", "x"), "x", lambda args: 0))
    said = []
    table.add(Command(("go",), "go", said.append, flags=(
        flag("--mode", default="a"), flag("--tags", action="append", default=[]), flag("--fast", action="store_true"),
    ), refusals=(Refusal(("fast",), lambda a: a.mode == "b", "cannot go with --mode b"),)))
    args = table.parse(["go"])
    assert (args.mode, args.tags, args.fast) == ("a", [], False)
    args.tags.append("x")
    assert table.parse(["go"]).tags == []  # a fresh default each time
    assert table.parse(["go", "--mode", "b"]).mode == "b"
    with pytest.raises(SystemExit):
        table.parse(["go", "--mode", "b", "--fast"])
    assert table.parse(["go", "--fast"]).fast


def test_serve_command_answers_until_interrupted(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "blip3o.cli", "serve", "--model", "debug", "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, health = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    health = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.3)
        assert health is not None and health["status"] == "ok" and health["model"] == "debug", proc.stdout.read1()
    finally:
        proc.send_signal(2)  # Ctrl-C
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, output
    assert f"http://127.0.0.1:{port}/" in output


# ------------------------------------------------------------------ numbers, paths and devices, refused first

ORIGINAL = {name: getattr(Blip3o, name) for name in ("generate", "answer", "reconstruct")}


@pytest.fixture
def no_work(monkeypatch):
    """Any model load, training run or shard writing fails the test: a refusal must come before them."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started")

    for target in ("blip3o.cli.models.load_model", "blip3o.cli.commands.load_model", "blip3o.train.recipe.train_nano",
                   "blip3o.shapes.data.write_shards"):
        monkeypatch.setattr(target, forbidden)


OUT_OF_RANGE = [
    (["generate", "a circle", "--guidance", "nan"], "--guidance nan is not in [0, 100]"),
    (["generate", "a circle", "--guidance", "inf"], "--guidance inf is not in [0, 100]"),
    (["generate", "a circle", "--guidance", "-5"], "--guidance -5.0 is not in [0, 100]"),
    (["generate", "a circle", "--steps", "0"], "--steps must be positive and at most 1,000, got 0"),
    (["generate", "a circle", "--sampler", "stochastic", "--eta", "nan"], "--eta nan is not in [0, 1]"),
    (["generate", "a circle", "--num-images", "100000"], "--num-images must be positive and at most 10,000"),
    (["generate", "a circle", "--batch-size", "0"], "--batch-size must be positive and at most 1,024"),
    (["generate", "a circle", "--seed", "-1"], "--seed -1 is not in [0, 2**64 - 1]"),
    (["generate", "a circle", "--seed", str(2**64)], "--seed 18446744073709551616 is not in [0, 2**64 - 1]"),
    (["generate", "a circle", "--size", "0"], "--size 0: each side must be positive"),
    (["generate", "a circle", "--size", "100000x100000"], "the image at most 67,108,864 pixels"),
    (["ask", "x.png", "what?", "--max-new-tokens", "0"], "--max-new-tokens must be positive and at most 32,768"),
    (["ask", "x.png", "what?", "--min-pixels", "-1"], "--min-pixels must be positive"),
    (["ask", "--questions-file", "q.jsonl", "--batch-size", "0"], "--batch-size must be positive"),
    (["chat", "--temperature", "-1"], "--temperature -1.0 is not in [0, 100]"),
    (["chat", "--temperature", "nan"], "--temperature nan is not in [0, 100]"),
    (["chat", "--temperature", "1", "--seed", "-2"], "--seed -2 is not in [0, 2**64 - 1]"),
    (["chat", "--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["chat", "--max-pixels", "0"], "--max-pixels must be positive"),
    (["reconstruct", "x.png", "--seed", "-1"], "--seed -1 is not in"),
    (["demo", "--seed", "-1"], "--seed -1 is not in"),
    (["eval", "shapes", "--per-tag", "0"], "--per-tag must be positive"),
    (["eval", "shapes", "--num-scenes", "-1"], "--num-scenes must be positive"),
    (["eval", "shapes", "--num-images", "1000"], "--num-images must be positive and at most 64"),
    (["eval", "shapes", "--guidance", "inf"], "--guidance inf is not in [0, 100]"),
    (["train", "nano", "--scale", "0"], "--scale 0.0 is not in (0, 100]"),
    (["train", "nano", "--scale", "nan"], "--scale nan is not in (0, 100]"),
    (["train", "nano", "--num-samples", "0"], "--num-samples must be positive"),
    (["train", "nano", "--seed", "-1"], "--seed -1 is not in"),
    (["train", "nano", "--steps", "clip=0"], "expected STAGE=STEPS with a whole number from 1 to 10,000,000"),
    (["data", "shapes", "--out", "d", "--num", "0"], "--num must be positive"),
    (["data", "shapes", "--out", "d", "--shard-size", "-4"], "--shard-size must be positive"),
    (["data", "shapes", "--out", "d", "--prompt-first", "nan"], "prompt_first must be a share in [0, 1], got nan"),
    (["data", "shapes", "--out", "d", "--canonical", "0.5", "--canonical-jitter", "9"],
     "--canonical-jitter 9 is not in [0, 3]"),
    (["data", "shapes", "--out", "d", "--tag-weights", "position=inf"], "a weight is a number from 0 to 1e6"),
]


@pytest.mark.parametrize(("args", "expected"), OUT_OF_RANGE, ids=[" ".join(a) for a, _ in OUT_OF_RANGE])
def test_numeric_flags_out_of_range_exit_2_naming_flag_and_range_before_any_work(args, expected, no_work, tmp_path,
                                                                                monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert expected in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_bad_paths_and_devices_exit_2_before_any_work(no_work, tmp_path, image_path, capsys):
    file = tmp_path / "file"
    file.write_text("not a folder")
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    bomb = tmp_path / "bomb.png"
    Image.new("1", (8200, 8200)).save(bomb)  # 67,240,000 pixels declared in a small file
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"image": str(image_path), "question": "what?"}) + "\n")
    cases = [
        (["generate", "a circle", "--outdir", str(file)], f"--outdir {file} is not a folder"),
        (["generate", "a circle", "--outdir", str(file / "sub")], f"--outdir {file / 'sub'}: {file} is not a folder"),
        (["generate", "--prompts-file", str(tmp_path)], "not a regular file"),
        (["generate", "--prompts-file", str(fifo)], "not a regular file"),
        (["generate", "--prompts-file", str(latin)], "latin.jsonl: not UTF-8 text (byte 15)"),
        (["generate", "a circle", "  "], "PROMPT 2 is empty"),
        (["generate", "a circle", "--device", "bogus"], "'bogus' is not a device"),
        (["info", "--device", "meta"], "'meta': a model runs on cpu, cuda, mps"),
        (["train", "nano", "--device", "bogus"], "'bogus' is not a device"),
        (["ask", str(fifo), "what?"], "is not a regular file"),
        (["ask", str(bomb), "what?"], "is 8200x8200 = 67,240,000 pixels; the limit is 67,108,864"),
        (["ask", str(image_path), " "], "QUESTION is empty"),
        (["ask", "--questions-file", str(questions), "--out", str(tmp_path)], "is a folder; give a file name"),
        (["chat", "--image", str(bomb)], "the limit is 67,108,864"),
        (["reconstruct", str(image_path), "--outdir", str(file)], "is not a folder"),
        (["demo", "--outdir", str(file)], "is not a folder"),
        (["demo", "--prompt", ""], "--prompt is empty"),
        (["eval", "shapes", "--out", str(file)], "is not a folder"),
        (["train", "nano", "--out", str(file)], "is not a folder"),
        (["train", "nano", "--out", str(tmp_path / "run"), "--data", str(file)], f"--data {file} is not a folder"),
        (["train", "nano", "--out", str(tmp_path / "run"), "--stages", "understanding"],
         f"understanding starts from the clip stage's model, and {tmp_path / 'run' / 'clip' / 'model'} holds none"),
        (["data", "shapes", "--out", str(file)], "is not a folder"),
        (["convert", str(tmp_path), str(file)], "OUT"),
        (["train", "clip", "--config", str(tmp_path)], "not a regular file"),
    ]
    if not torch.cuda.is_available():
        cases += [(["generate", "a circle", "--device", "cuda"], "no CUDA device is available"),
                  (["generate", "a circle", "--offload"], "--offload moves each part to --device, cuda by default")]
    for args, expected in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert expected in err, (args, err)


def test_an_image_the_processor_refuses_is_bad_input(checkpoint, tmp_path, capsys):
    thin = tmp_path / "thin.png"
    Image.new("RGB", (8, 2000)).save(thin)  # past the processor's aspect ratio of 200
    assert main(["ask", "--model", str(checkpoint), str(thin), "what?"]) == 2
    assert f"IMAGE {thin}: absolute aspect ratio must be smaller than 200" in capsys.readouterr().err
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"image": str(thin), "question": "what?"}) + "\n")
    assert main(["ask", "--model", str(checkpoint), "--questions-file", str(questions), "--out",
                 str(tmp_path / "a.jsonl")]) == 2
    assert "q.jsonl: records 1..1: absolute aspect ratio" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()


# ------------------------------------------------------------------ generate in batches


def written(folder: Path) -> list[str]:
    """Every file under `folder` (temporaries included), as sorted relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def spy_generate(monkeypatch) -> list[tuple[int, int]]:
    """Record each Blip3o.generate call as (prompts, images per prompt)."""
    calls = []

    def generate(self, prompts, **kwargs):
        calls.append((len(prompts), kwargs["num_images"]))
        return ORIGINAL["generate"](self, prompts, **kwargs)

    monkeypatch.setattr(Blip3o, "generate", generate)
    return calls


def test_generate_calls_hold_at_most_batch_size_images_and_a_seed_gives_them_again(checkpoint, tmp_path,
                                                                                   monkeypatch):
    calls = spy_generate(monkeypatch)
    args = ["generate", "--model", str(checkpoint), "a red circle", "--seed", "3"]
    many = tmp_path / "many"
    assert main([*args, "--num-images", "17", "--batch-size", "8", "--outdir", str(many)]) == 0
    assert calls == [(1, 8), (1, 8), (1, 1)]
    assert written(many) == [f"{i:04d}.png" for i in range(17)] + ["grid.png"]
    assert Image.open(many / "grid.png").size == (4 * 32, 4 * 32)  # the first 16, 4 a row
    assert main([*args, "--num-images", "17", "--batch-size", "8", "--outdir", str(tmp_path / "again")]) == 0
    assert all(same_pixels(many / name, tmp_path / "again" / name) for name in written(many))
    # up to the batch size a prompt's images come from one call: those of the library's generate for the seed
    eight = tmp_path / "eight"
    assert main([*args, "--num-images", "8", "--outdir", str(eight)]) == 0
    assert calls[-1] == (1, 8)
    want = ORIGINAL["generate"](Blip3o.from_pretrained(checkpoint), ["a red circle"], num_images=8, seed=3)
    assert [Image.open(eight / f"{i:04d}.png").tobytes() for i in range(8)] == [im.tobytes() for im in want]
    assert all(same_pixels(many / f"{i:04d}.png", eight / f"{i:04d}.png") for i in range(8))  # the first batch


def test_generate_prompts_file_shares_calls_by_images_and_splits_a_prompt_past_the_batch(checkpoint, tmp_path,
                                                                                         monkeypatch):
    calls = spy_generate(monkeypatch)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("a red circle", "a blue square",
                                                                          "a green circle")))
    args = ["generate", "--model", str(checkpoint), "--prompts-file", str(prompts), "--seed", "3"]
    assert main([*args, "--num-images", "2", "--batch-size", "4", "--outdir", str(tmp_path / "shared")]) == 0
    assert calls == [(2, 2), (1, 2)]
    calls.clear()
    split = tmp_path / "split"
    assert main([*args, "--num-images", "3", "--batch-size", "2", "--outdir", str(split)]) == 0
    assert calls == [(1, 2), (1, 1)] * 3
    assert written(split / "00002") == ["grid.png", "metadata.jsonl", "samples/0000.png", "samples/0001.png",
                                        "samples/0002.png"]
    single = tmp_path / "single"  # a folder holds what the one-prompt command makes with the same flags
    assert main(["generate", "--model", str(checkpoint), "a green circle", "--seed", "3", "--num-images", "3",
                 "--batch-size", "2", "--outdir", str(single)]) == 0
    for i in range(3):
        assert same_pixels(split / "00002" / "samples" / f"{i:04d}.png", single / f"{i:04d}.png")


# ------------------------------------------------------------------ Ctrl-C: whole files, and a word of what was written


def interrupt_call(monkeypatch, method: str, n: int) -> None:
    """Blip3o.METHOD raises KeyboardInterrupt (Ctrl-C) on its n-th call."""
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise KeyboardInterrupt
        return ORIGINAL[method](self, *args, **kwargs)

    monkeypatch.setattr(Blip3o, method, interrupted)


def test_ctrl_c_in_generate_keeps_whole_images_and_says_how_many(checkpoint, tmp_path, monkeypatch, capsys):
    interrupt_call(monkeypatch, "generate", 2)
    out = tmp_path / "one"
    assert main(["generate", "--model", str(checkpoint), "a red circle", "--num-images", "3", "--batch-size", "2",
                 "--outdir", str(out)]) == 130
    assert written(out) == ["0000.png", "0001.png"]
    assert capsys.readouterr().err.strip() == (f"blip3o generate: interrupted: 2 of 3 images written to {out}/; the "
                                               f"rest and grid.png are not written")


def test_ctrl_c_while_a_png_is_written_leaves_none_of_it(checkpoint, tmp_path, monkeypatch, capsys):
    save = Image.Image.save
    saves = []

    def interrupted_save(self, fp, *args, **kwargs):
        saves.append(fp)
        if len(saves) == 2:
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n")  # a file's first bytes, then Ctrl-C
            raise KeyboardInterrupt
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    out = tmp_path / "out"
    assert main(["generate", "--model", str(checkpoint), "a red circle", "--num-images", "3", "--outdir",
                 str(out)]) == 130
    assert written(out) == ["0000.png"]
    Image.open(out / "0000.png").load()  # whole
    assert "interrupted: 1 of 3 images written" in capsys.readouterr().err


def test_ctrl_c_in_geneval_layout_leaves_each_prompt_folder_whole_or_absent(checkpoint, tmp_path, monkeypatch,
                                                                             capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "i": i}) + "\n" for i, p in enumerate(["a red circle"] * 3)))
    args = ["generate", "--model", str(checkpoint), "--prompts-file", str(prompts), "--batch-size", "2"]
    interrupt_call(monkeypatch, "generate", 2)  # one prompt a call: the second prompt's
    out = tmp_path / "geneval"
    assert main([*args, "--num-images", "2", "--outdir", str(out)]) == 130
    assert written(out) == ["00000/grid.png", "00000/metadata.jsonl", "00000/samples/0000.png",
                            "00000/samples/0001.png"]
    assert json.loads((out / "00000" / "metadata.jsonl").read_text()) == {"prompt": "a red circle", "i": 0}
    assert f"interrupted: 1 of 3 prompts written to {out}/; the rest is not written" in capsys.readouterr().err
    interrupt_call(monkeypatch, "generate", 2)  # three images a prompt, two a call: inside the first prompt
    out = tmp_path / "split"
    assert main([*args, "--num-images", "3", "--outdir", str(out)]) == 130
    assert written(out) == []
    assert "interrupted: 0 of 3 prompts written" in capsys.readouterr().err


def test_ctrl_c_in_ask_leaves_answers_file_as_it_was(checkpoint, image_path, tmp_path, monkeypatch, capsys):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"image": str(image_path), "question": q}) + "\n" for q in "abc"))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("an earlier run's answers\n")
    interrupt_call(monkeypatch, "answer", 2)
    assert main(["ask", "--model", str(checkpoint), "--questions-file", str(questions), "--out", str(answers),
                 "--batch-size", "1", "--max-new-tokens", "2"]) == 130
    assert answers.read_text() == "an earlier run's answers\n"
    assert written(tmp_path) == ["answers.jsonl", "q.jsonl"]
    assert (f"interrupted: 1 of 3 questions answered; {answers} is not written (it is written whole at the end)"
            in capsys.readouterr().err)


def test_ctrl_c_in_reconstruct_demo_and_eval_says_what_was_written(checkpoint, image_path, tmp_path, monkeypatch,
                                                                   capsys):
    interrupt_call(monkeypatch, "reconstruct", 2)
    out = tmp_path / "rec"
    assert main(["reconstruct", "--model", str(checkpoint), str(image_path), str(image_path), str(image_path),
                 "--outdir", str(out)]) == 130
    assert written(out) == ["circle_reconstructed.png"]
    assert f"interrupted: 1 of 3 images reconstructed in {out}/" in capsys.readouterr().err
    interrupt_call(monkeypatch, "answer", 1)
    demo = tmp_path / "demo"
    assert main(["demo", "--model", str(checkpoint), "--outdir", str(demo)]) == 130
    assert written(demo) == ["generated.png"]
    assert f"interrupted: {demo / 'generated.png'} is written; the answer is not" in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("blip3o.shapes.evaluate.evaluate_generation", interrupted)
    ev = tmp_path / "eval"
    ev.mkdir()
    (ev / "results.json").write_text("{}")
    assert main(["eval", "shapes", "--model", str(checkpoint), "--out", str(ev)]) == 130
    assert written(ev) == ["results.json"] and (ev / "results.json").read_text() == "{}"
    assert "interrupted: " in capsys.readouterr().err


# ------------------------------------------------------------------ chat and reconstruct go on, names kept apart


def test_chat_goes_on_after_images_it_cannot_use(checkpoint, tmp_path, monkeypatch, capsys):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (8200, 8200)).save(bomb)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (8, 2000)).save(thin)
    script = f"/image {bomb}\n/image {fifo}\n/image {thin}\nwhat is this?\nhello\n/quit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "the limit is 67,108,864" in out and "is not a regular file" in out
    assert "this message: absolute aspect ratio must be smaller than 200" in out and "it is not sent" in out
    replies = [line.split("blip3o> ", 1)[1] for line in out.splitlines() if "blip3o> " in line]
    assert len(replies) == 2
    (hello,) = Blip3o.from_pretrained(checkpoint).chat([[{"role": "user", "content": "hello"}]], max_new_tokens=4)
    assert replies[1].rstrip() == hello.strip()  # the refused message is not part of the conversation


def test_reconstruct_keeps_inputs_of_one_name_apart(checkpoint, tmp_path, capsys):
    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    for path, colour in ((a, (220, 40, 40)), (b, (20, 40, 220))):
        path.parent.mkdir()
        Image.new("RGB", (32, 32), colour).save(path)
    out = tmp_path / "out"
    assert main(["reconstruct", "--model", str(checkpoint), str(a), str(b), "--outdir", str(out)]) == 0
    assert written(out) == ["x_2_reconstructed.png", "x_reconstructed.png"]
    assert capsys.readouterr().out.splitlines() == [f"{a} -> {out / 'x_reconstructed.png'}",
                                                    f"{b} -> {out / 'x_2_reconstructed.png'}"]
    assert main(["reconstruct", "--model", str(checkpoint), str(b), "--outdir", str(tmp_path / "b_alone")]) == 0
    assert same_pixels(out / "x_2_reconstructed.png", tmp_path / "b_alone" / "x_reconstructed.png")


def test_commands_run_the_shapes_decoder_channels_last_on_a_cpu():
    """The CLI's models on a CPU sample with NHWC convolutions, and draw what the plain layout draws."""
    import argparse

    from blip3o.cli.models import load_for_command

    model = load_for_command(argparse.Namespace(model="nano", device=None, dtype=None))
    assert model.decoder.channels_last
    assert model.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    plain = Blip3o.from_preset("nano")
    assert not plain.decoder.channels_last
    prompts = ["a photo of a red circle left of a blue square"]
    got = np.asarray(model.generate(prompts, seed=3, steps=4, decoder_steps=4)[0], dtype=np.int16)
    want = np.asarray(plain.generate(prompts, seed=3, steps=4, decoder_steps=4)[0], dtype=np.int16)
    assert np.abs(got - want).max() <= 1
