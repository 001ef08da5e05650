"""What the benchmarks share: building a random model on the device, timing, the device line, the reference DiT.

Models are built with random weights directly on the target device in the target dtype (an 8B model is
never materialised on the CPU or in fp32). Presets whose backbone needs the official Qwen tokenizer get
the builtin tokenizer instead: with random weights only the sequence length matters, and each benchmark
prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator

import torch

from blip3o import Blip3o
from blip3o.presets import get_preset

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.2}


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="debug", help="debug (CPU smoke, seconds) or blip3o-8b / blip3o-4b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (median reported)")


def resolve(args) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device)
    name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    return device, getattr(torch, name)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(preset: str, device: torch.device, dtype: torch.dtype, *, clip_encoder: bool = False) -> Blip3o:
    """A random `preset` Blip3o built on `device` in `dtype`; the CLIP encoder (training targets and
    `reconstruct` only) is left on the meta device unless asked for."""
    config = get_preset(preset)
    if config.backbone.tokenizer != "builtin":
        config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, tokenizer="builtin"))
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = Blip3o(config)
    if not clip_encoder:
        model.clip_encoder.to("meta")
    with torch.no_grad():
        for p in model.dit.parameters():  # open zero-initialised gates and modulations: no branch is skipped
            if not p.any():
                p.normal_(0, 0.02)
    return model


class Skipped(Exception):
    """Raised inside a `guarded` section that was not asked for: it ends the section quietly."""


@contextlib.contextmanager
def guarded(name: str) -> Iterator[None]:
    """Run one section of a benchmark; a failure prints its traceback and the benchmark goes on, so one
    broken section (on a device it never ran on before) does not cost the figures of the others."""
    try:
        yield
    except Skipped:
        pass
    except Exception:
        print(f"!! {name} failed:", flush=True)
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `repeats` calls of fn after `warmup` calls, synchronised on the device."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_line(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    import diffusers
    import transformers

    return (f"device: {name}  dtype: {str(dtype).removeprefix('torch.')}  torch {torch.__version__}  "
            f"transformers {transformers.__version__}  diffusers {diffusers.__version__}  "
            f"date {datetime.date.today().isoformat()}")


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def ratio(ours: float, reference: float) -> str:
    return f"ratio={ours / reference:.3f}" if reference > 0 else "ratio=n/a"


# ---------------------------------------------------------------------------- the reference DiT


def reference_dit(dit) -> torch.nn.Module:
    """diffusers' LuminaNextDiT2DModel at `dit`'s config, with `dit`'s weights, on its device and dtype
    (diffusers <= 0.32 builds the official 2/3 FFN, 4864 wide at D = 1792)."""
    from diffusers import LuminaNextDiT2DModel

    cfg = dit.config
    weight = dit.patch_embedder.proj.weight
    with torch.device(weight.device), default_dtype(weight.dtype):
        theirs = LuminaNextDiT2DModel(
            sample_size=cfg.grid_size, patch_size=1, in_channels=cfg.in_channels, hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_kv_heads=cfg.kv_heads,
            multiple_of=cfg.multiple_of, norm_eps=cfg.norm_eps, learn_sigma=False, qk_norm=True,
            cross_attention_dim=cfg.hidden_size,
        )
    state = {k: v for k, v in dit.state_dict().items() if not k.startswith("caption_projection.")}
    theirs.load_state_dict(state, strict=False)
    return theirs


def reference_velocity(theirs, dit) -> Callable:
    """(x (B, 64, C), t (B,), cond (B, L, H)) -> v, called as BLIP3-o's code calls diffusers: the projected
    condition, an all-ones mask and the 384x384 RoPE table every step, timesteps x1000."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    cfg = dit.config
    rope = get_2d_rotary_pos_embed_lumina(cfg.head_dim, 384, 384).to(dit.patch_embedder.proj.weight.device)

    def v(x, t, cond):
        grid = x.transpose(1, 2).reshape(x.shape[0], cfg.in_channels, cfg.grid_size, cfg.grid_size)
        mask = torch.ones(cond.shape[:2], device=x.device)
        out = theirs(hidden_states=grid, timestep=1000 * t, encoder_hidden_states=dit.caption_projection(cond),
                     encoder_mask=mask, image_rotary_emb=rope, cross_attention_kwargs={}).sample
        return out.flatten(2).transpose(1, 2)

    return v


PROMPT = "a photo of a red fox sitting in the snow next to a wooden fence, golden hour"
