"""`blip3o edit` end to end on the debug model: the files it writes, seeds, the edits-file layout and its resume,
and bad input refused with exit code 2 before anything is written."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from blip3o import Blip3o
from blip3o.cli import main
from blip3o.presets import get_preset

EDIT = Blip3o.edit


def saved_debug(folder: Path, source: str | None = None) -> Path:
    """A saved debug model (a folder gives every command the same weights); `source` sets its DiT's dit.source."""
    torch.manual_seed(0)
    config = get_preset("debug")
    if source is not None:
        config = dataclasses.replace(config, dit=dataclasses.replace(config.dit, source=source))
    return Blip3o(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_debug(tmp_path_factory.mktemp("edit") / "debug-model")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two source images in a folder: red.png and blue.png."""
    folder = tmp_path_factory.mktemp("sources")
    Image.new("RGB", (32, 32), (220, 40, 40)).save(folder / "red.png")
    Image.new("RGB", (32, 32), (40, 40, 220)).save(folder / "blue.png")
    return folder


def written(folder: Path) -> list[str]:
    """Every file under `folder` (temporaries included), as sorted relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def edit_args(checkpoint: Path, *args: str) -> list[str]:
    """`blip3o edit` on the checkpoint, with two DiT steps: each run takes a moment."""
    return ["edit", "--model", str(checkpoint), "--steps", "2", *args]


def test_one_edit_writes_num_images_pngs_of_the_size_and_prints_their_paths(checkpoint, sources, tmp_path, capsys):
    out = tmp_path / "out"
    args = edit_args(checkpoint, str(sources / "red.png"), "make the circle blue", "--num-images", "2", "--seed", "3")
    assert main([*args, "--outdir", str(out)]) == 0
    assert written(out) == ["0000.png", "0001.png", "grid.png"]
    assert capsys.readouterr().out.split() == [str(out / name) for name in ("0000.png", "0001.png", "grid.png")]
    assert all(Image.open(out / name).size == (32, 32) for name in ("0000.png", "0001.png"))
    want = EDIT(Blip3o.from_pretrained(checkpoint), [Image.open(sources / "red.png")], ["make the circle blue"],
                num_images=2, seed=3, steps=2)
    assert [Image.open(out / f"{i:04d}.png").tobytes() for i in range(2)] == [im.tobytes() for im in want]
    wide = tmp_path / "wide"
    assert main([*args, "--size", "56x32", "--outdir", str(wide)]) == 0
    assert Image.open(wide / "0001.png").size == (56, 32)  # WxH: width x height


def test_a_seed_gives_the_same_bytes_again(checkpoint, sources, tmp_path):
    args = edit_args(checkpoint, str(sources / "red.png"), "remove the circle", "--num-images", "2")
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert main([*args, "--seed", seed, "--outdir", str(tmp_path / name)]) == 0
    assert written(tmp_path / "a") == written(tmp_path / "b")
    for name in written(tmp_path / "a"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "0000.png").read_bytes() != (tmp_path / "c" / "0000.png").read_bytes()


def test_several_sources_go_to_a_model_that_reads_several(checkpoint, sources, tmp_path, monkeypatch):
    calls = []

    def edit(self, images, instructions, **kwargs):
        calls.append([len(row) for row in images])
        return EDIT(self, images, instructions, **kwargs)

    monkeypatch.setattr(Blip3o, "edit", edit)
    out = tmp_path / "two"
    assert main(edit_args(checkpoint, str(sources / "red.png"), str(sources / "blue.png"), "swap the colours",
                          "--outdir", str(out))) == 0
    assert calls == [[2]]
    assert written(out) == ["0000.png", "grid.png"]


def write_edits(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")  # a trailing blank line is no record
    return path


def test_edits_file_writes_genevals_layout_a_folder_per_line(checkpoint, sources, tmp_path):
    records = [{"image": "red.png", "instruction": "make the circle blue", "type": "recolor"},  # to the file's folder
               {"image": str(sources / "blue.png"), "instruction": "remove the square"},  # absolute
               {"image": ["red.png", "blue.png"], "instruction": "swap the colours"}]  # several sources
    edits = write_edits(sources / "edits.jsonl", records)
    out = tmp_path / "layout"
    assert main(edit_args(checkpoint, "--edits-file", str(edits), "--outdir", str(out), "--num-images", "2",
                          "--seed", "3")) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "00002"]
    for index, record in enumerate(records):
        folder = out / f"{index:05d}"
        assert (folder / "metadata.jsonl").read_text().splitlines() == [json.dumps(record)]
        assert written(folder) == ["grid.png", "metadata.jsonl", "samples/0000.png", "samples/0001.png"]
    single = tmp_path / "single"  # a line's folder holds what the one-edit command makes with the same flags
    assert main(edit_args(checkpoint, str(sources / "blue.png"), "remove the square", "--num-images", "2",
                          "--seed", "3", "--outdir", str(single))) == 0
    for name in ("0000.png", "0001.png"):
        ours, theirs = (Image.open(p).convert("RGB") for p in (out / "00001" / "samples" / name, single / name))
        assert max(abs(a - b) for a, b in zip(ours.tobytes(), theirs.tobytes(), strict=True)) <= 2  # batch rounding


def test_an_edits_file_rerun_resumes_where_it_stopped(checkpoint, sources, tmp_path, monkeypatch, capsys):
    records = [{"image": "red.png", "instruction": f"make the circle blue {i}"} for i in range(3)]
    edits = write_edits(sources / "resume.jsonl", records)
    calls, stop_at = [], [2]

    def edit(self, images, instructions, **kwargs):
        calls.append(list(instructions))
        if len(calls) in stop_at:
            raise KeyboardInterrupt  # Ctrl-C in that call
        return EDIT(self, images, instructions, **kwargs)

    monkeypatch.setattr(Blip3o, "edit", edit)
    out = tmp_path / "resume"
    args = edit_args(checkpoint, "--edits-file", str(edits), "--outdir", str(out), "--batch-size", "1")
    assert main(args) == 130
    assert "interrupted: 1 of 3 edits written" in capsys.readouterr().err
    assert written(out) == ["00000/grid.png", "00000/metadata.jsonl", "00000/samples/0000.png"]
    first = (out / "00000" / "samples" / "0000.png").stat()
    calls.clear()
    stop_at.clear()
    assert main(args) == 0
    assert calls == [["make the circle blue 1"], ["make the circle blue 2"]]  # the first line is not edited again
    assert capsys.readouterr().out.strip().endswith(f"3 edits x 1 images in {out}/ (GenEval layout); 1 folders "
                                                    "complete from an earlier run kept")
    assert (out / "00000" / "samples" / "0000.png").stat().st_mtime_ns == first.st_mtime_ns
    assert [p.name for p in sorted(out.iterdir())] == ["00000", "00001", "00002"]
    calls.clear()
    assert main([*args, "--num-images", "2"]) == 0  # other counts: every folder is edited again
    assert len(calls) == 6 and len(written(out / "00002" / "samples")) == 2


# ------------------------------------------------------------------ bad input: exit 2, a message, nothing written


@pytest.fixture(scope="module")
def bad_files(sources, tmp_path_factory):
    """name -> path of bad inputs: a text file that is not an image, and edits files with one bad line each."""
    folder = tmp_path_factory.mktemp("bad")
    notes = folder / "notes.png"
    notes.write_text("not an image")
    good = json.dumps({"image": str(sources / "red.png"), "instruction": "make the circle blue"})
    lines = {"not_json": '{"image": "red.png", ', "no_instruction": '{"image": "red.png"}',
             "empty_instruction": '{"image": "red.png", "instruction": "  "}',
             "no_image": '{"instruction": "remove the circle"}', "empty_list": '{"image": [], "instruction": "x"}',
             "gone": '{"image": "gone.png", "instruction": "remove the circle"}',
             "text": json.dumps({"image": str(notes), "instruction": "remove the circle"})}
    files = {"notes": notes}
    for name, line in lines.items():
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text(f"{good}\n{line}\n")
    files["empty"] = folder / "empty.jsonl"
    files["empty"].write_text("\n")
    return files


BAD_INPUT = [
    (["{red}", "{gone}"], "INSTRUCTION (the last argument) is the file"),
    (["{sources}/gone.png", "remove the circle"], "IMAGE: no image file {sources}/gone.png"),
    (["{notes}", "remove the circle"], "IMAGE {notes} is not an image"),
    (["{red}", ""], "INSTRUCTION (the last argument) is empty"),
    (["{red}", " \t "], "INSTRUCTION (the last argument) is empty"),
    (["{red}"], "give the source image(s), then the instruction"),
    ([], "give the source image(s), then the instruction"),
    (["--edits-file", "{not_json}"], "not_json.jsonl:2: not valid JSON"),
    (["--edits-file", "{no_instruction}"], "no_instruction.jsonl:2: needs 'instruction', a non-empty string"),
    (["--edits-file", "{empty_instruction}"], "empty_instruction.jsonl:2: needs 'instruction'"),
    (["--edits-file", "{no_image}"], "no_image.jsonl:2: needs 'image', an image path or a non-empty list"),
    (["--edits-file", "{empty_list}"], "empty_list.jsonl:2: needs 'image'"),
    (["--edits-file", "{gone}"], "gone.jsonl:2: 'image': no image file {bad}/gone.png"),
    (["--edits-file", "{text}"], "text.jsonl:2: 'image' {notes} is not an image"),
    (["--edits-file", "{empty}"], "empty.jsonl holds no records"),
    (["--edits-file", "{sources}/none.jsonl"], "none.jsonl: no such file"),
    (["{red}", "x", "--edits-file", "{not_json}"], "IMAGE ... INSTRUCTION cannot go with --edits-file"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_INPUT, ids=[" ".join(a) or "nothing" for a, _ in BAD_INPUT])
def test_bad_input_exits_2_naming_the_problem_and_writes_nothing(args, expected, checkpoint, sources, bad_files,
                                                                 tmp_path, capsys):
    names = {"sources": sources, "red": sources / "red.png", "bad": bad_files["notes"].parent, **bad_files}
    out = tmp_path / "out"
    assert main(edit_args(checkpoint, *(a.format(**names) for a in args), "--outdir", str(out))) == 2
    assert expected.format(**names) in capsys.readouterr().err
    assert not out.exists()


def test_a_model_that_cannot_edit_or_takes_fewer_sources_is_bad_input(sources, tmp_path, capsys):
    red, blue = str(sources / "red.png"), str(sources / "blue.png")
    out = tmp_path / "out"
    text_only = saved_debug(tmp_path / "text-only", source="none")
    assert main(["edit", "--model", str(text_only), red, "make the circle blue", "--outdir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--model {text_only}: this model generates from text only" in err
    one_source = saved_debug(tmp_path / "one-source", source="input")
    assert main(["edit", "--model", str(one_source), red, blue, "swap the colours", "--outdir", str(out)]) == 2
    assert f"IMAGE: 2 images, and --model {one_source} takes one source image" in capsys.readouterr().err
    edits = write_edits(tmp_path / "edits.jsonl", [{"image": red, "instruction": "remove the circle"},
                                                   {"image": [red, blue], "instruction": "swap the colours"}])
    assert main(["edit", "--model", str(one_source), "--edits-file", str(edits), "--outdir", str(out)]) == 2
    assert "edits.jsonl:2: 'image': 2 images, and --model" in capsys.readouterr().err
    assert not out.exists()
