"""Edit triplets from users' files: webdataset shards of src/tgt/txt members and JSONL lines become the edit stage's
items (sources in order, pixels as written), bad triplets are skipped and counted by reason, `data check` reports
them, and the stream splits them over ranks, mixes them by weight and resumes them exactly."""

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o.cli import main
from blip3o.data import DataStream, SpecError, StreamingDataset, parse_spec
from blip3o.distributed import World
from blip3o.shapes import iter_edits, write_edit_shards


def picture(seed: int, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> Image.Image:
    """Noise: any two pictures differ, and a lossless round trip keeps every pixel."""
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    """What PIL decodes from `data` (a JPEG's pixels are its decoder's, not the picture's)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


PNG_A, PNG_B, PNG_C = (encode(picture(k), "PNG") for k in range(3))
GREY = encode(picture(3, (20, 20), "L"), "PNG")
JPEG_A, JPEG_B = (encode(picture(k, (32, 24)), "JPEG") for k in (4, 5))
WEBP = encode(picture(6, (16, 16), "RGBA"), "WEBP")  # WebP: lossy for RGB, but the test compares what PIL decodes

# shard -> key -> members (suffix -> bytes) in the order written; a member's bytes or a str (txt) or a dict (json)
SHARDS = {
    "edits-0.tar": {
        "one": {"src.png": PNG_A, "tgt.png": PNG_B, "txt": "make the square red"},
        "jpeg": {"src.jpg": JPEG_A, "tgt.jpg": JPEG_B, "txt": "  turn it upside down \n", "json": {"id": "jpeg"}},
        "broken": {"src.png": b"not an image at all " * 20, "tgt.png": PNG_B, "txt": "anything"},
        "silent": {"src.png": PNG_A, "tgt.png": PNG_B, "txt": "   "},
    },
    "edits-1.tar": {
        "three": {"src2.webp": WEBP, "tgt.png": PNG_C, "src.png": GREY, "src1.jpg": JPEG_A,
                  "json": {"instruction": "put the three together", "id": "three"}},
        "untargeted": {"src.png": PNG_A, "txt": "no target"},
        "gap": {"src.png": PNG_A, "src2.png": PNG_B, "tgt.png": PNG_C, "txt": "a source left out"},
        "truncated": {"src.png": PNG_A, "tgt.jpg": JPEG_B[: len(JPEG_B) // 2], "txt": "half a target"},
    },
}
# key -> (sources' bytes in order, instruction, target's bytes, json)
GOOD = {
    "one": ([PNG_A], "make the square red", PNG_B, {}),
    "jpeg": ([JPEG_A], "turn it upside down", JPEG_B, {"id": "jpeg"}),
    "three": ([GREY, JPEG_A, WEBP], "put the three together", PNG_C,
              {"instruction": "put the three together", "id": "three"}),
}
BAD = {"broken": "image_unsupported", "silent": "no_instruction", "untargeted": "no_target", "gap": "no_source",
       "truncated": "image_invalid"}


def member_bytes(value) -> bytes:
    if isinstance(value, dict):
        return json.dumps(value).encode()
    return value.encode() if isinstance(value, str) else value


def write_tar(path: Path, samples: dict[str, dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for suffix, value in members.items():
                data = member_bytes(value)
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("edit-shards")
    for name, samples in SHARDS.items():
        write_tar(folder / name, samples)
    return str(folder / "edits-{0..1}.tar")


@pytest.fixture(scope="module")
def edits_jsonl(tmp_path_factory) -> Path:
    """edits.jsonl with its images in two folders beside it: two good lines (one source; two sources, one of
    them an absolute path), then a missing target file, an empty instruction, an empty source list, a blank
    line (not a record) and a line that is not JSON."""
    root = tmp_path_factory.mktemp("edit-jsonl")
    for rel, data in {"images/a.png": PNG_A, "images/b.png": PNG_B, "more/c.jpg": JPEG_A, "more/g.png": GREY}.items():
        (root / rel).parent.mkdir(exist_ok=True)
        (root / rel).write_bytes(data)
    lines = [
        {"source": "images/a.png", "instruction": "make it blue", "target": "images/b.png"},
        {"source": ["more/g.png", str(root / "more/c.jpg")], "instruction": "blend them", "target": "images/a.png",
         "id": 7},
        {"source": "images/a.png", "instruction": "lost", "target": "images/nowhere.png"},
        {"source": "images/a.png", "instruction": "", "target": "images/b.png"},
        {"source": [], "instruction": "from nothing", "target": "images/b.png"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n\n{not json\n"
    (root / "edits.jsonl").write_text(text)
    return root / "edits.jsonl"


JSONL_BAD = {"line 3": "image_missing", "line 4": "no_instruction", "line 5": "no_source", "line 7": "bad_json"}


def read_all(spec, **options) -> tuple[list[dict], StreamingDataset]:
    """Every sample of one pass, in order, without the stream's problem carriers."""
    dataset = StreamingDataset(spec, epochs=1, shuffle=False, **options)
    return [s for s in dataset if len(s) > 1], dataset


def key_of(sample: dict) -> str:
    return sample["where"].rsplit("key ", 1)[1]


# ------------------------------------------------------------------ shards


def test_triplet_sources_are_told_by_their_members_and_fields(shards, edits_jsonl, tmp_path):
    assert [s.kind for s in parse_spec(f"{shards},{edits_jsonl}")] == ["edits", "edits"]
    assert parse_spec(shards)[0].paths == tuple(str(Path(shards).parent / n) for n in SHARDS)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"image": "a.png", "caption": "c", "source": "web"}) + "\n")
    (tmp_path / "mix.yaml").write_text(f"sources:\n  - path: {shards}\n    kind: edits\n  - path: captions.jsonl\n")
    assert [s.kind for s in parse_spec(str(tmp_path / "mix.yaml"))] == ["edits", "captions"]


def test_edit_shards_become_triplets_with_their_sources_in_order(shards):
    samples, _ = read_all(shards)
    assert [key_of(s) for s in samples] == ["one", "jpeg", "three"]
    for sample in samples:
        sources, instruction, target, meta = GOOD[key_of(sample)]
        # `problems` is the stream's, which DataStream takes off: the item is the rest
        assert set(sample) - {"problems"} == {"sources", "instruction", "image", "json", "where"}
        assert len(sample["sources"]) == len(sources)
        assert all(same_pixels(got, decoded(data)) for got, data in zip(sample["sources"], sources, strict=True))
        assert same_pixels(sample["image"], decoded(target))
        assert (sample["instruction"], sample["json"]) == (instruction, meta)
    assert [image.mode for image in samples[2]["sources"]] == ["L", "RGB", "RGBA"]  # src, src1, src2


def test_bad_triplets_are_skipped_and_counted_by_reason(shards):
    _, dataset = read_all(shards)
    assert dataset.stats.good == len(GOOD)
    assert dict(dataset.stats.bad) == {reason: 1 for reason in BAD.values()}
    assert {p.at: p.reason for p in dataset.stats.problems} == {f"key {k}": r for k, r in BAD.items()}
    gap = next(p for p in dataset.stats.problems if p.at == "key gap")
    assert "no source image member src1.*" in gap.message


def test_shapes_edit_shards_read_as_the_shapes_reader_reads_them(tmp_path):
    write_edit_shards(tmp_path, 5, seed=3, shard_size=2)
    samples, dataset = read_all(str(tmp_path))
    expected = list(iter_edits(tmp_path))
    assert parse_spec(str(tmp_path))[0].kind == "edits" and dataset.stats.bad_total == 0
    assert len(samples) == len(expected) == 5
    for sample, triplet in zip(samples, expected, strict=True):
        assert sample["instruction"] == triplet.instruction
        assert same_pixels(sample["sources"][0].convert("RGB"), triplet.source)
        assert same_pixels(sample["image"].convert("RGB"), triplet.target)
        assert sample["json"]["type"] == triplet.meta["type"]


# ------------------------------------------------------------------ JSONL


def test_jsonl_triplets_resolve_paths_beside_the_file(edits_jsonl):
    samples, dataset = read_all(str(edits_jsonl))
    assert [s["where"] for s in samples] == [f"{edits_jsonl}, line 1", f"{edits_jsonl}, line 2"]
    first, second = samples
    assert first["instruction"] == "make it blue" and len(first["sources"]) == 1
    assert same_pixels(first["sources"][0], decoded(PNG_A)) and same_pixels(first["image"], decoded(PNG_B))
    assert [s.mode for s in second["sources"]] == ["L", "RGB"]
    assert same_pixels(second["sources"][0], decoded(GREY)) and same_pixels(second["sources"][1], decoded(JPEG_A))
    assert second["json"]["id"] == 7
    assert {p.at: p.reason for p in dataset.stats.problems} == JSONL_BAD


def test_jsonl_triplets_take_an_image_root(edits_jsonl, tmp_path):
    (tmp_path / "e.jsonl").write_text(json.dumps({"source": "a.png", "instruction": "x", "target": "b.png"}) + "\n")
    samples, _ = read_all(str(tmp_path / "e.jsonl"), image_root=str(edits_jsonl.parent / "images"))
    assert same_pixels(samples[0]["sources"][0], decoded(PNG_A))
    (tmp_path / "mix.yaml").write_text(f"sources:\n  - path: e.jsonl\n    kind: edits\n"
                                       f"    image_root: {edits_jsonl.parent / 'images'}\n")
    source = parse_spec(str(tmp_path / "mix.yaml"))[0]
    assert (source.kind, source.image_root) == ("edits", str(edits_jsonl.parent / "images"))


def test_an_image_root_does_not_apply_to_edit_shards(shards, edits_jsonl):
    with pytest.raises(SpecError, match="--image-root applies to JSONL and LLaVA sources"):
        parse_spec(shards, image_root=edits_jsonl.parent)


# ------------------------------------------------------------------ data check


def test_check_reports_triplet_counts_and_bad_samples(shards, capsys):
    assert main(["data", "check", shards, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(s["kind"], s["files"], s["good"]) for s in report["sources"]] == [("edits", 2, 3)]
    assert report["bad"] == {reason: 1 for reason in BAD.values()}
    assert report["edits"] == {"count": 3, "sources": {"min": 1, "median": 1, "max": 3},
                               "instruction_words": {"min": 4, "median": 4, "max": 4}}
    assert report["images"]["count"] == 3 + 5  # a target and the sources of each good triplet
    assert report["captions"]["count"] == 0
    assert main(["data", "check", shards]) == 0
    out = capsys.readouterr().out
    assert "(edits, 2 files): 3 good, 5 bad (image_invalid 1, image_unsupported 1, no_instruction 1, no_source 1, " \
           "no_target 1)" in out
    assert "edits: 3, sources min 1 / median 1 / max 3, instruction words min 4 / median 4 / max 4" in out
    assert "edits-1.tar, key untargeted: no_target" in out
    assert main(["data", "check", shards, "--strict"]) == 2


# ------------------------------------------------------------------ the stream


def wheres(spec, *, rank=0, ranks=1, batches=None, workers=0, seed=0) -> list[str]:
    dataset = StreamingDataset(spec, seed=seed, world=World(rank, ranks), window=3, epochs=None if batches else 1)
    stream = iter(DataStream(dataset, batch_size=2, num_workers=workers))
    got = [next(stream) for _ in range(batches)] if batches else list(stream)
    return [s["where"] for batch in got for s in batch]


@pytest.mark.parametrize("source", ["shards", "jsonl"])
def test_two_ranks_together_read_every_triplet_once(source, shards, edits_jsonl):
    spec = shards if source == "shards" else str(edits_jsonl)  # a shard per rank; one piece of lines split by record
    per_rank = [wheres(spec, rank=rank, ranks=2) for rank in range(2)]
    alone, _ = read_all(spec)
    assert all(per_rank) and not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(s["where"] for s in alone)


def test_a_resumed_triplet_stream_continues_exactly(shards, edits_jsonl):
    spec = f"{shards}::2,{edits_jsonl}::1"

    def run(batches, state=None):
        stream = DataStream(StreamingDataset(spec, seed=4, world=World(0, 2), window=3), batch_size=2, num_workers=2)
        if state is not None:
            stream.load_state_dict(state)
        it = iter(stream)
        return [[(s["where"], s["instruction"], len(s["sources"])) for s in next(it)] for _ in range(batches)], stream

    whole, whole_stream = run(7)
    first, stream = run(3)
    buf = io.BytesIO()
    torch.save(stream.state_dict(), buf)
    buf.seek(0)
    second, resumed = run(4, torch.load(buf, weights_only=True))
    assert first + second == whole
    assert resumed.stats.state_dict() == whole_stream.stats.state_dict() and resumed.stats.bad_total > 0


def test_mixing_weights_give_triplet_sources_their_shares(tmp_path):
    write_tar(tmp_path / "good.tar", {k: SHARDS["edits-0.tar"]["one"] for k in "abcd"})
    (tmp_path / "a.png").write_bytes(PNG_A)
    line = json.dumps({"source": "a.png", "instruction": "x", "target": "a.png"})
    (tmp_path / "good.jsonl").write_text(f"{line}\n" * 4)
    n, share = 400, 0.75
    dataset = StreamingDataset(f"{tmp_path / 'good.tar'}::3,{tmp_path / 'good.jsonl'}::1", seed=2, window=40)
    from_shards = [", key " in s["where"] for s, _ in zip(dataset, range(n), strict=False)]
    tolerance = 4 * math.sqrt(share * (1 - share) / n)  # four standard deviations of the binomial share
    assert abs(sum(from_shards) / n - share) < tolerance
