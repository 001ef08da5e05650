"""The generation stage's step from a CLIP-target cache against the encoder run on the fly, in one process.

Writes N random-rectangle images with captions as webdataset shards, caches their targets with
`blip3o.data.targets.build_cache` (timed), then times `--steps` generation steps of a fresh random model of
`--preset` twice on the same items, step for step in turn: images through the encoder on every step, and the
cached targets. Prints each median step time (steps after the first), the encoder's time for one batch alone,
the cache's build time, and a last line `ratio=<on the fly / from the cache>` (higher: the cache saves more).

    python benchmarks/clip_targets.py                       # debug preset, batch 16, 8 steps, CPU
    python benchmarks/clip_targets.py --preset nano --batch-size 32 --steps 10
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from blip3o.data.targets import TargetsDataset, build_cache
from blip3o.train import TrainConfig, Trainer
from blip3o.train.trainer import load_init

COLORS = {"red": (220, 40, 40), "blue": (40, 70, 210), "green": (40, 170, 60)}


def items(count: int, size: int) -> list[dict]:
    """`count` images of one coloured rectangle on grey, with captions naming its colour."""
    rng, out = random.Random(0), []
    for _ in range(count):
        name = rng.choice(list(COLORS))
        image = Image.new("RGB", (size, size), (240, 240, 240))
        x, y = rng.randrange(size // 2), rng.randrange(size // 2)
        ImageDraw.Draw(image).rectangle([x, y, x + size // 4, y + size // 4], fill=COLORS[name])
        out.append({"image": image, "json": {"caption": f"a {name} square"}})
    return out


def write_shard(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for k, sample in enumerate(samples):
            png = io.BytesIO()
            sample["image"].save(png, format="PNG")
            for suffix, data in (("png", png.getvalue()), ("json", json.dumps(sample["json"]).encode())):
                info = tarfile.TarInfo(f"{k:06d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def step_times(trainers: list[Trainer], steps: int) -> list[float]:
    """Median seconds of each trainer's step, after a first step each; the trainers' steps alternate, so a
    machine's changing load weighs on both alike."""
    times: list[list[float]] = [[] for _ in trainers]
    for _ in range(steps):
        for trainer, spent in zip(trainers, times, strict=True):
            started = time.perf_counter()
            trainer.train_step()
            spent.append(time.perf_counter() - started)
    return [statistics.median(spent[1:]) for spent in times]


def timed_encode(model, batch: list[dict]) -> float:
    started = time.perf_counter()
    model.clip_encoder.encode_images([item["image"] for item in batch])
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="debug", help="debug or nano (random weights)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    model = load_init(f"random:{args.preset}", torch.device("cpu"))
    data = items(args.batch_size * args.steps, model.clip_encoder.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        write_shard(Path(tmp) / "00000.tar", data)
        started = time.perf_counter()
        build_cache(model, str(Path(tmp) / "00000.tar"), Path(tmp) / "cache", batch_size=args.batch_size,
                    dtype="bf16")
        build_s = time.perf_counter() - started
        config = TrainConfig(stage="generation", init=f"random:{args.preset}", out_dir=str(Path(tmp) / "run"),
                             steps=args.steps, batch_size=args.batch_size, progress=False, device="cpu")
        encode_s = statistics.median(timed_encode(model, data[:args.batch_size]) for _ in range(3))
        fly, cached = step_times([Trainer(config, data), Trainer(config, TargetsDataset(Path(tmp) / "cache"))],
                                 args.steps)
    print(f"preset {args.preset}, batch {args.batch_size}, {torch.get_num_threads()} threads: "
          f"on the fly {fly * 1000:.1f} ms a step, from the cache {cached * 1000:.1f} ms a step; "
          f"the encoder alone {encode_s * 1000:.1f} ms a batch; cache of {len(data)} images built in {build_s:.2f} s")
    print(f"ratio={fly / cached:.2f}")


if __name__ == "__main__":
    main()
