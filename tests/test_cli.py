"""The `blip3o` command line end to end on the debug model: layouts, files, refusals, exit codes, help."""

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
from blip3o.cli.entry import command_table
from blip3o.cli.table import Command, CommandTable, Refusal, flag
from blip3o.data import commands as data_commands
from blip3o.evals.score import commands as score_commands
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
    for typed in (["--out", "x"], ["--data", "d"], ["--seed", "1"], ["--device", "cpu"], ["--scale", "2"]):
        refused(["train", "clip", "--config", str(config), *typed], f"{typed[0]}: a stage takes every setting")
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
    score_commands.register(table)
    data_commands.register(table)
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
