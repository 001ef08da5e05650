"""Training data from users' files: shards, JSONL, image folders and LLaVA conversations, read from real photos in
several modes (scikit-image's bundled images); bad samples reported by reason; the stream's split over ranks and
workers, its resume and its mixing weights; bad specs refused with exit code 2."""

import io
import json
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from skimage import data as skdata

from blip3o.cli import main
from blip3o.data import DataStream, EmptyUnit, SpecError, StreamingDataset, parse_spec, readers
from blip3o.data.check import check_dataset
from blip3o.distributed import World


def photo(name: str, size: tuple[int, int]) -> Image.Image:
    """A bundled photo, resized (small photos keep the tests fast)."""
    return Image.fromarray(getattr(skdata, name)()).resize(size)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """A JPEG stored 75 x 50 whose EXIF orientation (6) says to show it turned a quarter: 50 x 75."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(photo("chelsea", (75, 50)), "JPEG", exif=exif.tobytes())


def alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(image.size))
    return rgba


# name -> (file suffix, bytes, the mode and size a reader must give it)
GOOD = {
    "astronaut": ("jpg", encode(photo("astronaut", (96, 96)), "JPEG"), "RGB", (96, 96)),
    "camera": ("png", encode(photo("camera", (80, 64)), "PNG"), "L", (80, 64)),
    "coffee": ("png", encode(alpha(photo("coffee", (90, 60))), "PNG"), "RGBA", (90, 60)),
    "palette": ("png", encode(photo("coffee", (60, 40)).convert("P"), "PNG"), "P", (60, 40)),
    "cmyk": ("jpg", encode(photo("chelsea", (64, 48)).convert("CMYK"), "JPEG"), "CMYK", (64, 48)),
    "rotated": ("jpg", exif_rotated_jpeg(), "RGB", (50, 75)),
}
BAD = {  # name -> (suffix, bytes, the reason a reader gives)
    "corrupt": ("jpg", b"not an image at all " * 20, "image_unsupported"),
    "truncated": ("jpg", GOOD["astronaut"][1][: len(GOOD["astronaut"][1]) // 2], "image_invalid"),
}
ORDER = ["astronaut", "camera", "coffee", "palette", "cmyk", "rotated", "corrupt", "truncated"]


def caption(name: str) -> str:
    return f"a photo named {name}"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path) -> str:
    """Four shards of two samples: the photos in ORDER (the bad two in the last shard); captions alternate between a
    txt member and a json member's `caption`. Returns the brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(4):
        with tarfile.open(folder / f"part-{shard:02d}.tar", "w") as tar:
            for name in ORDER[2 * shard: 2 * shard + 2]:
                suffix, data = (GOOD.get(name) or BAD[name])[:2]
                add_member(tar, f"{name}.{suffix}", data)
                if ORDER.index(name) % 2:
                    add_member(tar, f"{name}.json", json.dumps({"caption": caption(name), "id": name}).encode())
                else:
                    add_member(tar, f"{name}.txt", caption(name).encode())
    return str(folder / "part-{00..03}.tar")


def write_images(folder: Path) -> None:
    """Every photo of GOOD and BAD as a file `NAME.SUFFIX` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (suffix, data, *_) in {**GOOD, **BAD}.items():
        (folder / f"{name}.{suffix}").write_bytes(data)


def image_name(name: str) -> str:
    return f"{name}.{(GOOD.get(name) or BAD[name])[0]}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def captions_jsonl(tmp_path_factory) -> Path:
    """images/ beside captions.jsonl: a line per photo, then a missing image, a line without a caption, a line that is
    not JSON, and a blank line (not a sample)."""
    root = tmp_path_factory.mktemp("jsonl")
    write_images(root / "images")
    lines = [json.dumps({"image": f"images/{image_name(n)}", "caption": caption(n)}) for n in ORDER]
    lines += [json.dumps({"image": "images/nowhere.jpg", "text": "lost"}),
              json.dumps({"image": f"images/{image_name('camera')}"}),
              "{not json", ""]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "captions.jsonl"


LLAVA_RECORDS = [
    {"id": "multi-turn", "image": "astronaut.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWho is this?"}, {"from": "gpt", "value": "An astronaut."},
        {"from": "human", "value": "What is behind them?"}, {"from": "gpt", "value": "A flag."}]},
    {"id": "multi-image", "image": ["camera.png", "coffee.png"], "conversations": [
        {"from": "human", "value": "Compare <image> with <image> please."}, {"from": "gpt", "value": "One is a cup."}]},
    {"id": "text-only", "conversations": [
        {"from": "human", "value": "What is two and two?"}, {"from": "gpt", "value": "Four."}]},
    {"id": "missing", "image": "nowhere.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Nothing."}]},
    {"id": "no-conversations", "image": "astronaut.jpg"},
    {"id": "count", "image": ["camera.png"], "conversations": [
        {"from": "human", "value": "<image> and <image>?"}, {"from": "gpt", "value": "Two?"}]},
]
LLAVA_BAD = {"missing": "image_missing", "no-conversations": "no_conversations", "count": "image_count"}


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    """The LLaVA records as a JSON array (llava.json) and as JSONL (llava.jsonl), images under images/."""
    root = tmp_path_factory.mktemp("llava")
    write_images(root / "images")
    (root / "llava.json").write_text(json.dumps(LLAVA_RECORDS, indent=2))
    (root / "llava.jsonl").write_text("".join(json.dumps(r) + "\n" for r in LLAVA_RECORDS))
    return root


def read_all(spec, **options) -> tuple[list[dict], StreamingDataset]:
    """Every sample of one pass, in order, without the stream's problem carriers."""
    dataset = StreamingDataset(spec, epochs=1, shuffle=False, **options)
    samples = [s for s in dataset if len(s) > 1]
    return samples, dataset


def check_json(capsys, *argv) -> tuple[int, dict, str]:
    """`blip3o data check ARGV --json`: the exit code, the report, and what went to stderr."""
    code = main(["data", "check", *argv, "--json"])
    out, err = capsys.readouterr()
    return code, json.loads(out), err


# ------------------------------------------------------------------ sources and data check


def test_check_reports_exactly_the_bad_members_of_the_shards(shards, capsys):
    code, report, _ = check_json(capsys, shards)
    assert code == 0
    assert report["good"] == len(GOOD)
    assert report["bad"] == {"image_unsupported": 1, "image_invalid": 1}
    assert [(Path(p["file"]).name, p["at"], p["reason"]) for p in report["problems"]] == [
        ("part-03.tar", "key corrupt", "image_unsupported"), ("part-03.tar", "key truncated", "image_invalid")]
    assert report["images"]["count"] == len(GOOD)
    assert report["images"]["modes"] == dict(Counter(mode for _, _, mode, _ in GOOD.values()))
    assert report["images"]["short_side"] == {"min": 40, "median": 55.0, "max": 96}  # 40 48 50 | 60 64 96
    assert report["captions"] == {"count": len(GOOD), "words": {"min": 4, "median": 4, "max": 4}}
    assert main(["data", "check", shards, "--strict"]) == 2
    assert "2 bad samples (--strict)" in capsys.readouterr().err


def test_check_prints_counts_and_problems_for_a_person(shards, capsys):
    assert main(["data", "check", shards]) == 0
    out = capsys.readouterr().out
    assert "total: 6 good, 2 bad (image_invalid 1, image_unsupported 1)" in out
    assert "part-03.tar, key truncated: image_invalid" in out
    assert "images: 6 (modes" in out and "shorter side min 40 / median 55 / max 96" in out


def test_shard_samples_keep_their_mode_and_size_with_the_exif_orientation_applied(shards):
    samples, dataset = read_all(shards)
    by_name = {s["where"].rsplit("key ", 1)[1]: s for s in samples}
    assert sorted(by_name) == sorted(GOOD)
    for name, (_, _, mode, size) in GOOD.items():
        image = by_name[name]["image"]
        assert (image.mode, image.size) == (mode, size), name
        assert by_name[name]["text"] == caption(name)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(GOOD["rotated"][1])))
    assert np.array_equal(np.asarray(by_name["rotated"]["image"]), np.asarray(expected))
    assert by_name["camera"]["json"] == {"caption": caption("camera"), "id": "camera"}
    assert dataset.stats.good == 6 and dict(dataset.stats.bad) == {"image_unsupported": 1, "image_invalid": 1}


def test_a_shard_that_breaks_off_keeps_its_earlier_samples_and_is_reported(tmp_path):
    pattern = write_shards(tmp_path / "shards")
    whole = (tmp_path / "shards" / "part-00.tar").read_bytes()
    first_sample = 512 + 512 * math.ceil(len(GOOD["astronaut"][1]) / 512) + 1024  # two members and their headers
    (tmp_path / "shards" / "part-00.tar").write_bytes(whole[:first_sample + 700])
    samples, dataset = read_all(pattern)
    names = [s["where"].rsplit("key ", 1)[1] for s in samples]
    assert "astronaut" in names and "camera" not in names
    assert dataset.stats.bad["bad_shard"] == 1
    assert any(p.reason == "bad_shard" and p.file.endswith("part-00.tar") for p in dataset.stats.problems)


def test_jsonl_captions_resolve_images_and_report_bad_lines_by_number(captions_jsonl, capsys):
    code, report, _ = check_json(capsys, str(captions_jsonl))
    assert code == 0
    assert report["sources"][0]["kind"] == "captions" and report["good"] == len(GOOD)
    assert sorted((p["at"], p["reason"]) for p in report["problems"]) == sorted([
        ("line 7", "image_unsupported"), ("line 8", "image_invalid"), ("line 9", "image_missing"),
        ("line 10", "no_text"), ("line 11", "bad_json")])
    samples, _ = read_all(str(captions_jsonl))
    assert [(s["text"], s["image"].mode, s["image"].size) for s in samples] == [
        (caption(n), GOOD[n][2], GOOD[n][3]) for n in ORDER if n in GOOD]


def test_image_root_resolves_jsonl_paths_from_elsewhere(tmp_path, capsys):
    write_images(tmp_path / "photos")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "c.jsonl").write_text(json.dumps({"image": "camera.png", "prompt": "a camera"}) + "\n")
    code, report, _ = check_json(capsys, str(tmp_path / "lists" / "c.jsonl"), "--image-root", str(tmp_path / "photos"))
    assert (code, report["good"], report["bad"]) == (0, 1, {})
    code, report, err = check_json(capsys, str(tmp_path / "lists" / "c.jsonl"))  # beside the file: no such image
    assert (code, report["bad"]) == (2, {"image_missing": 1})
    assert "no good sample" in err


def test_a_folder_of_images_with_txt_captions(tmp_path):
    write_images(tmp_path / "photos" / "nested")
    for name in ORDER:
        if name != "cmyk":
            (tmp_path / "photos" / "nested" / f"{name}.txt").write_text(caption(name))
    (tmp_path / "photos" / "orphan.txt").write_text("no image beside me")
    samples, dataset = read_all(str(tmp_path / "photos"))
    assert sorted(s["text"] for s in samples) == sorted(caption(n) for n in GOOD if n != "cmyk")
    assert dict(dataset.stats.bad) == {"no_text": 1, "no_image": 1, "image_unsupported": 1, "image_invalid": 1}


def conversation_of(sample: dict) -> list[tuple[str, list]]:
    """(role, parts) with images shown as their size."""
    return [(m["role"], [p["image"].size if p["type"] == "image" else p["text"] for p in m["content"]])
            for m in sample["messages"]]


@pytest.mark.parametrize("file", ["llava.json", "llava.jsonl"])
def test_llava_records_become_chat_conversations(llava, file, capsys):
    samples, dataset = read_all(str(llava / file), image_root=str(llava / "images"))
    assert [s["json"]["id"] for s in samples] == ["multi-turn", "multi-image", "text-only"]
    assert conversation_of(samples[0]) == [
        ("user", [(96, 96), "Who is this?"]), ("assistant", ["An astronaut."]),
        ("user", ["What is behind them?"]), ("assistant", ["A flag."])]
    assert conversation_of(samples[1]) == [
        ("user", ["Compare", (80, 64), "with", (90, 60), "please."]), ("assistant", ["One is a cup."])]
    assert conversation_of(samples[2]) == [("user", ["What is two and two?"]), ("assistant", ["Four."])]
    assert samples[1]["messages"][0]["content"][1]["image"].mode == "L"
    at = {"llava.json": lambda k: f"item {k}", "llava.jsonl": lambda k: f"line {k + 1}"}[file]
    expected = {(at(k), LLAVA_BAD[r["id"]]) for k, r in enumerate(LLAVA_RECORDS) if r["id"] in LLAVA_BAD}
    assert {(p.at, p.reason) for p in dataset.stats.problems} == expected
    code, report, _ = check_json(capsys, str(llava / file), "--image-root", str(llava / "images"))
    assert code == 0 and report["conversations"] == {
        "count": 3, "turns": {"min": 2, "median": 2, "max": 4}, "images": {"min": 0, "median": 1, "max": 2}}


def test_a_json_array_streams_items_longer_than_its_read_chunk(tmp_path):
    long = "word " * 300_000  # 1.5 MB: every item spans a chunk boundary of the streaming decoder
    records = [{"id": k, "conversations": [{"from": "human", "value": f"{k} {long}"}, {"from": "gpt", "value": "ok"}]}
               for k in range(3)]
    (tmp_path / "long.json").write_text(json.dumps(records))
    samples, dataset = read_all(str(tmp_path / "long.json"))
    assert [s["json"]["id"] for s in samples] == [0, 1, 2] and dataset.stats.bad_total == 0
    (tmp_path / "broken.json").write_text(json.dumps(records[:2])[:-40] + "}, oops")
    samples, dataset = read_all(str(tmp_path / "broken.json"))
    assert [s["json"]["id"] for s in samples] == [0] and [p.at for p in dataset.stats.problems] == ["item 1"]


# ------------------------------------------------------------------ the stream


def stream_samples(spec, *, ranks=1, workers=0, batch_size=2, batches=None, seed=0, **options) -> list[list[str]]:
    """Per rank, the `where` of every sample its DataStream gives (`batches` batches, or one whole epoch)."""
    out = []
    for rank in range(ranks):
        dataset = StreamingDataset(spec, seed=seed, world=World(rank, ranks), window=3,
                                   epochs=None if batches else 1, **options)
        stream = iter(DataStream(dataset, batch_size=batch_size, num_workers=workers))
        got = [next(stream) for _ in range(batches)] if batches else list(stream)
        out.append([s["where"] for batch in got for s in batch])
    return out


@pytest.mark.parametrize("source", ["shards", "jsonl"])
def test_ranks_and_workers_together_read_every_sample_once(source, shards, captions_jsonl):
    spec = shards if source == "shards" else str(captions_jsonl)  # 4 shards for 4 units; 1 piece of JSONL lines
    per_rank = stream_samples(spec, ranks=2, workers=2)
    everything = [w for samples in per_rank for w in samples]
    alone, _ = read_all(spec)
    assert sorted(everything) == sorted(s["where"] for s in alone) and len(alone) == len(GOOD)
    assert all(per_rank)


def test_resuming_mid_epoch_yields_what_the_uninterrupted_stream_does(shards, captions_jsonl):
    spec = f"{shards}::2,{captions_jsonl}::1"

    def run(batches, state=None):
        stream = DataStream(StreamingDataset(spec, seed=3, world=World(1, 2), window=4), batch_size=3, num_workers=2)
        if state is not None:
            stream.load_state_dict(state)
        it = iter(stream)
        return [[s["where"] for s in next(it)] for _ in range(batches)], stream

    whole, whole_stream = run(9)
    first, stream = run(4)
    buf = io.BytesIO()
    torch.save(stream.state_dict(), buf)
    buf.seek(0)
    second, resumed = run(5, torch.load(buf, weights_only=True))  # as the trainer's checkpoint holds it
    assert first + second == whole
    assert resumed.stats.state_dict() == whole_stream.stats.state_dict()
    assert resumed.stats.bad_total > 0


def test_the_stream_is_deterministic_and_the_seed_reorders_it(shards):
    a = stream_samples(shards, workers=2, batches=6, seed=0)
    assert a == stream_samples(shards, workers=2, batches=6, seed=0)
    assert a != stream_samples(shards, workers=2, batches=6, seed=1)
    assert {w.rsplit("key ", 1)[1] for w in a[0]} == set(GOOD)  # every good sample, past the first epoch


def test_a_resume_state_from_another_world_is_refused(shards):
    state = DataStream(StreamingDataset(shards), batch_size=2).state_dict()
    with pytest.raises(ValueError, match="batch_size 2"):
        DataStream(StreamingDataset(shards), batch_size=4).load_state_dict(state)
    dataset = StreamingDataset(shards, world=World(0, 2))
    with pytest.raises(ValueError, match="units 1"):
        dataset.load_state_dict(StreamingDataset(shards).state_dict())


def test_mixing_weights_give_their_proportions(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for k in range(5):
            Image.new("RGB", (16, 16), (k * 40, 0, 0)).save(tmp_path / name / f"{k}.png")
        lines = [json.dumps({"image": f"{k}.png", "text": name}) for k in range(5)]
        (tmp_path / name / "c.jsonl").write_text("\n".join(lines))
    n, share = 600, 0.75
    dataset = StreamingDataset(f"{tmp_path / 'a' / 'c.jsonl'}::3,{tmp_path / 'b' / 'c.jsonl'}::1", seed=5, window=50)
    texts = [s["text"] for s, _ in zip(dataset, range(n), strict=False)]
    tolerance = 4 * math.sqrt(share * (1 - share) / n)  # four standard deviations of the binomial share
    assert abs(texts.count("a") / n - share) < tolerance


def test_a_source_with_fewer_records_than_units_is_an_error_when_streaming_forever(tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "x.png", "text": "t"}) + "\n")
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    dataset = StreamingDataset(str(tmp_path / "c.jsonl"), world=World(1, 2))
    with pytest.raises(EmptyUnit, match="no record for unit 1 of 2"):
        next(iter(dataset))


def test_jsonl_pieces_split_over_units_by_line_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "PIECE_LINES", 2)
    write_images(tmp_path)
    lines = [json.dumps({"image": image_name(n), "text": n}) for n in GOOD for _ in range(2)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    pieces = readers.reader_for(parse_spec(str(tmp_path / "c.jsonl"))[0]).pieces()
    assert [(first, count) for _, first, count in pieces] == [(1, 2), (3, 2), (5, 2), (7, 2), (9, 2), (11, 2)]
    per_rank = stream_samples(str(tmp_path / "c.jsonl"), ranks=2, workers=2)
    lines_read = sorted(int(w.rsplit("line ", 1)[1]) for samples in per_rank for w in samples)
    assert lines_read == list(range(1, 13))


# ------------------------------------------------------------------ specs


def test_a_spec_file_names_sources_weights_and_image_roots(tmp_path, shards, llava):
    (tmp_path / "mix.yaml").write_text(
        f"sources:\n  - path: {shards}\n    weight: 3\n"
        f"  - path: {llava / 'llava.jsonl'}\n    image_root: {llava / 'images'}\n")
    sources = parse_spec(str(tmp_path / "mix.yaml"))
    assert [(s.kind, s.weight, len(s.paths)) for s in sources] == [("shards", 3.0, 4), ("llava", 1.0, 1)]
    assert sources[1].image_root == str(llava / "images")


@pytest.mark.parametrize("spec, message", [
    ("{d}/part-{{00..04}}.tar", "part-04.tar does not exist"),
    ("{d}/none-*.tar", "names no shard"),
    ("{d}/part-{{00..03}}.tar::abc", "must be a positive number, got 'abc'"),
    ("{d}/part-{{00..03}}.tar::0", "must be a positive number, got '0'"),
    ("{d}/part-{{00..03}}.tar::-1", "must be a positive number, got '-1'"),
    ("{d}/part-00.tar,{d}/notes.txt", "cannot tell what"),
    ("{d}/missing.jsonl", "missing.jsonl does not exist"),
])
def test_bad_specs_exit_2_naming_what_is_wrong(shards, capsys, spec, message):
    folder = Path(shards).parent
    (folder / "notes.txt").write_text("hello")
    assert main(["data", "check", spec.format(d=folder)]) == 2
    assert message in capsys.readouterr().err


def test_an_image_root_must_be_a_folder_and_serve_a_source(captions_jsonl, shards, capsys):
    assert main(["data", "check", str(captions_jsonl), "--image-root", str(captions_jsonl.parent / "nope")]) == 2
    assert "the image root" in capsys.readouterr().err
    assert main(["data", "check", shards, "--image-root", str(captions_jsonl.parent)]) == 2
    assert "--image-root applies to JSONL and LLaVA sources" in capsys.readouterr().err
    with pytest.raises(SpecError, match="unknown field 'weigth'"):
        (captions_jsonl.parent / "bad.yaml").write_text(f"sources:\n  - path: {captions_jsonl}\n    weigth: 2\n")
        parse_spec(str(captions_jsonl.parent / "bad.yaml"))


def test_check_limit_reads_only_the_first_records(shards):
    report = check_dataset(shards, limit=3)
    assert report.total.good == 3 and report.total.bad_total == 0
