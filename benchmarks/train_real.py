"""The generation stage's real training step against the original's: samples/s, MFU and peak memory.

Three steps over the same batch, on the same model and device, in one process:

    (a) trainer, cached targets   `Trainer.train_step` on items of a CLIP-target cache (blip3o.data.targets):
                                  the encoder and the decoder never run (the stage moves them off the device)
    (c) trainer, targets on the fly   `Trainer.train_step` on the items' images: the frozen CLIP encoder
                                  computes x_0 every step
    (b) original's step           (c), run the original's way (BLIP3-o's training forward): one backbone pass
                                  over the whole prompt + queries sequence, and the input embeddings requiring
                                  gradients (its training script's `enable_input_require_grads`, which gradient
                                  checkpointing asks for), so that autograd records the whole backbone.
                                  The original also recomputes the backbone's forward in the backward (gradient
                                  checkpointing) and computes the LM head's logits over the whole sequence for a
                                  text loss: (b) leaves both out, a lower bound of the original's step

A preset that trains on the original's sequence (`train_layout` "closed_turn": blip3o-4b, blip3o-8b) runs
it in one pass in the trainer too, so there (b) and (c) differ only in the input embeddings' gradients; on
the generation prompt's layout (nano, debug) the trainer differentiates the query positions only.

Every step is the whole `train_step`: forward, backward into the queries and the DiT, gradient clipping,
AdamW, EMA. The trained weights are fp32 under bf16 autocast on CUDA, as the trainer keeps them. The
decoder, which none of them runs, stays on the CPU. Each step gets a fresh Trainer (its own AdamW and EMA)
and runs two untimed steps, then `--steps` timed ones (median); the three take turns for `--rounds` rounds,
so that a drift of the machine's speed hits all of them alike.

FLOPs: counted with torch.utils.flop_counter.FlopCounterMode on one step of each at the benchmark's batch
(forward and backward; SDPA through its math kernel for the count, so that every attention is counted as
its matmuls). MFU = FLOPs of a step / (step time x the card's dense bf16 peak: H100 and H200 989.4, A100
312 TFLOP/s; --peak-tflops overrides); on a CPU there is no peak and no MFU. Peak memory: the most GPU
memory allocated during the timed steps (CUDA), or the process's peak resident memory during them (CPU,
after freed memory is handed back).

    python benchmarks/train_real.py         # CUDA: blip3o-8b, batch 16, 1 round; CPU: nano, batch 32, 3 rounds
    python benchmarks/train_real.py --preset debug --steps 1 --rounds 1     # CPU smoke, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from _common import PROMPT, build_model, device_line, peak_tflops, resolve, sync
from blip3o.data.targets import encoder_identity
from blip3o.model import Blip3o
from blip3o.presets import PRESETS
from blip3o.train.recipe import NANO_STAGES
from blip3o.train.trainer import TrainConfig, Trainer


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None, choices=list(PRESETS),
                    help="default: blip3o-8b on CUDA, nano on a CPU (debug: smoke)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="the model's weights; default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--batch", type=int, default=None,
                    help="default: 16 on CUDA; on a CPU the nano recipe's 32 (nano), else 4")
    ap.add_argument("--steps", type=int, default=3, help="timed steps of each run (after two untimed)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds, each step measured once a round in turn (default: 1 on CUDA, 3 on a CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by name)")
    args = ap.parse_args()
    try:
        gpu = torch.device(args.device).type == "cuda"
    except RuntimeError:
        ap.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1)")
    args.preset = args.preset or ("blip3o-8b" if gpu else "nano")
    if args.batch is None:
        args.batch = 16 if gpu else 32 if args.preset == "nano" else 4
    if args.rounds is None:
        args.rounds = 1 if gpu else 3
    for flag, value in (("--batch", args.batch), ("--steps", args.steps), ("--rounds", args.rounds)):
        if value < 1:
            ap.error(f"{flag} must be at least 1, got {value}")
    return args


# ---------------------------------------------------------------------------- the batch


def random_images(count: int, size: int) -> list[Image.Image]:
    """`count` RGB noise images of size x size (the encoder's own size: no resize to time)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


class RepeatedBatch:
    """A dataset whose item i is batch item i mod B: every step trains on the same B images and captions,
    with the draws (noise, time, drops) of its own global indices."""

    def __init__(self, items: list[dict]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index % len(self.items)]


def image_items(model: Blip3o, batch: int) -> list[dict]:
    """B image-text items, as a shard reader gives them."""
    images = random_images(batch, model.clip_encoder.config.image_size)
    return [{"image": im, "json": {"text": f"{PROMPT}, take {i}"}} for i, im in enumerate(images)]


def cached_target_items(model: Blip3o, items: list[dict]) -> list[dict]:
    """The same items as a CLIP-target cache's reader gives them: each image's 64 encoder tokens, computed
    once (bf16, the cache's default dtype), and the encoder's identity."""
    identity = encoder_identity(model)["id"]
    tokens = torch.cat([model.clip_encoder.encode_images([item["image"]]) for item in items])  # (B, 64, C)
    return [{"targets": t.to("cpu", torch.bfloat16), "text": item["json"]["text"], "json": {}, "where": "benchmark",
             "encoder": identity} for t, item in zip(tokens, items, strict=True)]


def train_config(preset: str, batch: int, device: torch.device, out_dir: str) -> TrainConfig:
    """The generation stage's config: the nano recipe's (lr, warm-up, EMA, options) for nano, the defaults
    otherwise; the benchmark's batch and device."""
    base = next(s for s in NANO_STAGES if s.stage == "generation") if preset == "nano" else \
        TrainConfig(stage="generation")
    return dataclasses.replace(base, init=f"random:{preset}", out_dir=out_dir, batch_size=batch,
                               device=str(device), progress=False)


@contextlib.contextmanager
def original_backbone(model: Blip3o) -> Iterator[None]:
    """Inside: the backbone runs as the original trains it, one differentiated pass over the whole prompt +
    queries sequence (an instance attribute shadows `queries_after_prompt`, the prompt's K/V computed without
    a graph), its input embeddings requiring gradients."""
    backbone = model.backbone
    backbone.queries_after_prompt = backbone.whole_sequence
    backbone.model.enable_input_require_grads()
    try:
        yield
    finally:
        backbone.model.disable_input_require_grads()
        del backbone.queries_after_prompt


# ---------------------------------------------------------------------------- measuring


@dataclass
class Result:
    key: str  # a, b or c (module docstring)
    name: str
    step_s: float  # median seconds of a timed step
    flops: float  # counted FLOPs of one step
    peak_bytes: int | None  # GPU memory allocated or process resident memory, at its peak during the steps
    batch: int

    @property
    def samples_s(self) -> float:
        return self.batch / self.step_s


def count_flops(step) -> float:
    """FLOPs of one call of `step` (forward and backward), every attention counted as the math kernel's
    matmuls (the flash and efficient kernels' counters reject grouped-query shapes)."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        step()
    return float(counter.get_total_flops())


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[list[int | None]]:
    """Yields a one-item list that holds, after the block, the peak memory during it: the most GPU memory
    allocated (CUDA) or the process's peak resident set (CPU, its high-water mark reset first; None where
    the kernel offers no reset), after memory freed earlier is handed back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        hand_back_freed_memory()
    resettable = device.type == "cuda" or reset_peak_rss()
    out: list[int | None] = [None]
    yield out
    if resettable:
        out[0] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()


def hand_back_freed_memory() -> None:
    """glibc's malloc_trim: the free memory the trainer's allocator setting keeps goes back to the system, so
    that the next step's peak is its own (a no-op off glibc)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset this process's high-water mark of resident memory to its current size (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """This process's peak resident memory since the last reset, in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Variant:
    """One of the three steps: what its trainer is given and the context it runs in."""

    key: str  # a, b or c (module docstring)
    name: str
    items: list[dict]
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def measure(variant: Variant, trainer: Trainer, device: torch.device, steps: int, count: bool) -> Result:
    """One step counted (`count`; else NaN FLOPs) or warming up, one more warm-up step, then `steps` timed steps
    (median) under the peak-memory probe."""
    flops = count_flops(trainer.train_step) if count else float("nan")
    if not count:
        trainer.train_step()
    trainer.train_step()
    sync(device)
    times = []
    with peak_memory(device) as peak:
        for _ in range(steps):
            started = time.perf_counter()
            trainer.train_step()
            sync(device)
            times.append(time.perf_counter() - started)
    return Result(variant.key, variant.name, float(np.median(times)), flops, peak[0], trainer.config.batch_size)


def run(variant: Variant, model: Blip3o, config: TrainConfig, device: torch.device, steps: int,
        count: bool) -> Result | None:
    """A fresh Trainer (its own AdamW and EMA) over the variant's items, measured; None when the batch does
    not fit. The encoder returns to the device first: a cached run before moved it off (`release_towers`)."""
    model.clip_encoder.to(device)
    trainer = None
    try:
        with variant.context():
            trainer = Trainer(config, RepeatedBatch(variant.items), model=model)
            return measure(variant, trainer, device, steps, count)
    except torch.OutOfMemoryError:
        print(f"!! ({variant.key}) {variant.name}: out of memory at batch {config.batch_size} (try a smaller "
              "--batch)", flush=True)
        return None
    finally:
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def alternate(variants: list[Variant], model: Blip3o, config: TrainConfig, device: torch.device, steps: int,
              rounds: int) -> dict[str, list[Result]]:
    """Each variant measured once a round, in turn, so that a drift of the machine's speed hits all alike; the
    FLOPs are counted in the first round. A variant that ran out of memory is not tried again."""
    results: dict[str, list[Result]] = {v.key: [] for v in variants}
    failed: set[str] = set()
    for _ in range(rounds):
        for v in variants:
            if v.key in failed:
                continue
            result = run(v, model, config, device, steps, count=not results[v.key])
            if result is None:
                failed.add(v.key)
                continue
            results[v.key].append(result)
            print(f"  round {len(results[v.key])}: ({v.key}) {result.step_s * 1e3:.1f} ms a step", flush=True)
    return {k: r for k, r in results.items() if r}


def combined(results: list[Result]) -> Result:
    """A variant's rounds as one result: the median step time, the first round's FLOPs, the largest peak."""
    peaks = [r.peak_bytes for r in results if r.peak_bytes is not None]
    first = results[0]
    return Result(first.key, first.name, float(np.median([r.step_s for r in results])), first.flops,
                  max(peaks) if peaks else None, first.batch)


# ---------------------------------------------------------------------------- report


def memory_text(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def table(results: list[Result], peak: float | None, device: torch.device) -> None:
    memory = "peak GPU memory" if device.type == "cuda" else "peak RSS"
    print(f"{'step':<34} {'samples/s':>10} {'ms/step':>10} {'GFLOP/sample':>13} {'MFU':>7} {memory:>16}")
    for r in results:
        mfu = f"{100 * r.flops / (r.step_s * peak * 1e12):6.1f}%" if peak else "n/a"
        print(f"{f'({r.key}) {r.name}':<34} {r.samples_s:10.2f} {r.step_s * 1e3:10.1f} {r.flops / r.batch / 1e9:13.3f} "
              f"{mfu:>7} {memory_text(r.peak_bytes):>16}")
    if not peak:
        print("MFU: not defined without the device's peak FLOP/s (a CPU has no data-sheet peak; --peak-tflops "
              "gives one)")


def ratio_lines(results: dict[str, list[Result]]) -> list[str]:
    """(a) against (b) and against (c): the ratio of the median step times (below 1: (a) is faster), of the
    peak memory, and of each round's step times."""
    lines = []
    for key in ("b", "c"):
        if "a" not in results or key not in results:
            continue
        ours, reference = combined(results["a"]), combined(results[key])
        memory = (f", peak memory {ours.peak_bytes / reference.peak_bytes:.3f}"
                  if ours.peak_bytes and reference.peak_bytes else "")
        rounds = " ".join(f"{a.step_s / r.step_s:.3f}" for a, r in zip(results["a"], results[key], strict=False))
        lines.append(f"ratio (a)/({key}) step time = {ours.step_s / reference.step_s:.3f} (speed-up "
                     f"{reference.step_s / ours.step_s:.2f}x){memory}; each round: {rounds}")
    return lines


def main() -> None:
    args = parse()
    device, dtype = resolve(args)
    gpu = device.type == "cuda"
    model = build_model(args.preset, device, dtype, clip_encoder=True)
    model.decoder.to("cpu")  # no step runs it: its memory is not the steps'
    peak = peak_tflops(device, args.peak_tflops)
    print(device_line(device, dtype) + f"  (trained weights fp32{', bf16 autocast' if gpu else ''})")
    print(f"preset {args.preset}, batch {args.batch}, {args.rounds} round(s) of {args.steps} timed steps each; "
          f"train layout {model.config.train_layout}; encoder {model.clip_encoder.config.image_size}px; peak "
          f"{peak or 'n/a'} TFLOP/s", flush=True)

    items = image_items(model, args.batch)
    with torch.no_grad():
        cached = cached_target_items(model, items)
    variants = [Variant("b", "original's step", items, lambda: original_backbone(model)),
                Variant("c", "trainer, targets on the fly", items),
                Variant("a", "trainer, cached targets", cached)]
    with tempfile.TemporaryDirectory() as out_dir:
        config = train_config(args.preset, args.batch, device, out_dir)
        results = alternate(variants, model, config, device, args.steps, args.rounds)
    table([combined(results[k]) for k in "acb" if k in results], peak, device)
    for line in ratio_lines(results):
        print(line)


if __name__ == "__main__":
    main()
