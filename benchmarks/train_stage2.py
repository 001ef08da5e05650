"""Stage-2 (generation) training: samples/s and model FLOPs utilisation of the whole step.

One step, as `GenerationStage.loss` + the trainer run it (the CLIP targets x_0 are precomputed, as a
real run caches them: the frozen encoder is not part of the step):

    cond = backbone(prompt, [IMG], queries)      frozen backbone forward, backward into the queries
    loss = flow matching (DiT(x_t, t, cond))     DiT forward and backward
    AdamW step on queries + DiT, zero grads

    reference: diffusers LuminaNextDiT2DModel as the DiT (BLIP3-o's module), torch AdamW defaults
    ours:      blip3o's DiT, fused AdamW (CUDA), optional torch.compile of the DiT (--compile)

Both: trained weights in fp32, bf16 autocast on CUDA (as `Trainer`), the same backbone, queries and data.
FLOPs: counted with torch.utils.flop_counter.FlopCounterMode on one eager step of ours at the smallest
batch (matmuls, convolutions and attention, forward and backward), scaled linearly with the batch (the
sequence length is fixed); the estimate 6 * P_dit * 64 + 4 * P_lm * L per sample is printed beside it.
MFU = FLOPs per step / step time / the device's dense bf16 peak.

    python benchmarks/train_stage2.py --preset debug               # CPU smoke, seconds
    python benchmarks/train_stage2.py --preset blip3o-8b           # on a GPU
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback

import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import (
    PROMPT,
    add_common_args,
    build_model,
    device_line,
    peak_tflops,
    ratio,
    reference_dit,
    reference_velocity,
    resolve,
    timed,
)
from blip3o.backbone import GENERATION_PROMPT
from blip3o.flow import flow_matching_loss, sample_path


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--batches", default=None, help="batch sizes, e.g. 8,32,64 (default: 8,32,64 on CUDA, 2,4 on CPU)")
    ap.add_argument("--compile", action="store_true", help="ours: torch.compile the DiT")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by name)")
    return ap.parse_args()


class Step:
    """One training step over a fixed batch; `velocity(x_t, t, cond)` is the DiT under test."""

    def __init__(self, model, velocity, params, optimizer, batch: int, device: torch.device, *,
                 whole_sequence: bool = False) -> None:
        self.model, self.velocity, self.params, self.optimizer = model, velocity, params, optimizer
        self.device, self.whole_sequence = device, whole_sequence
        c = model.config.dit
        g = torch.Generator().manual_seed(batch)
        self.prompts = [f"{PROMPT}, take {i}" for i in range(batch)]
        self.x_0 = torch.randn(batch, c.num_tokens, c.in_channels, generator=g).to(device)
        self.x_1 = torch.randn(batch, c.num_tokens, c.in_channels, generator=g).to(device)
        self.t = torch.rand(batch, generator=g).to(device)

    def __call__(self) -> None:
        cuda = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
            if self.whole_sequence:  # the original code's way: the whole prompt + queries sequence differentiated
                backbone = self.model.backbone
                texts = [GENERATION_PROMPT.format(prompt=p) for p in self.prompts]
                cond = backbone.whole_sequence(*backbone.query_sequence(texts, self.model.queries))
            else:  # ours: only the query positions are differentiated (the prompt's K/V cached)
                cond = self.model.condition(self.prompts)  # (B, 64, H): gradients reach the queries
            path = sample_path(self.x_0, self.x_1, self.t)
            loss = flow_matching_loss(self.velocity(path.x_t, self.t, cond), path)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def flops_per_sample(model, device, *, whole_sequence: bool = False) -> float:
    """FLOPs of one training step at batch 1, counted on the ops that ran. torch's SDPA counter rejects
    grouped-query shapes (28 query heads over 4 KV heads in the 7B backbone): for the count, the backbone
    attends with transformers' eager attention (the same matmuls, KV heads repeated)."""
    backbone = model.backbone.model
    impl = backbone.config._attn_implementation
    backbone.set_attn_implementation("eager")
    try:
        step = Step(model, model.dit, [], _NoOpt(), 1, device, whole_sequence=whole_sequence)
        with FlopCounterMode(display=False) as counter:
            step()
    finally:
        backbone.set_attn_implementation(impl)
    model.queries.grad = None
    for p in model.dit.parameters():
        p.grad = None
    return float(counter.get_total_flops())


class _NoOpt:
    def step(self) -> None: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...


def sweep(name, make_step, batches, device, repeats, flops, peak) -> dict[int, float]:
    rates = {}
    for b in batches:
        try:
            step = make_step(b)
            t = timed(step, device, repeats, warmup=2)
        except torch.OutOfMemoryError:
            print(f"  {name} batch {b}: out of memory")
            break
        except Exception:  # a step that never ran on this device before: report it, keep the other sweep
            print(f"!! {name} batch {b} failed:")
            traceback.print_exc(file=sys.stdout)
            break
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rates[b] = b / t
        mfu = f"  MFU {100 * flops * b / t / (peak * 1e12):5.1f}%" if peak else ""
        print(f"  {name:<9} batch {b:3d}: {b / t:9.2f} samples/s  ({t * 1e3:8.1f} ms a step){mfu}", flush=True)
    return rates


def main() -> None:
    args = parse()
    device, dtype = resolve(args)
    gpu = device.type == "cuda"
    repeats = args.repeats or 3
    batches = [int(b) for b in (args.batches or ("8,32,64" if gpu else "2,4")).split(",")]
    model = build_model(args.preset, device, dtype)
    model.decoder.to("meta")  # not part of stage 2: free its memory for larger batches
    model.dit.float()
    model.queries.data = model.queries.data.float()
    model.queries.requires_grad_(True)
    model.dit.train().requires_grad_(True)
    peak = peak_tflops(device, args.peak_tflops)
    print(device_line(device, dtype) + f"  (trained weights fp32{', bf16 autocast' if gpu else ''})")

    lm = model.backbone.model.model.language_model
    p_lm = sum(p.numel() for p in lm.parameters()) - lm.embed_tokens.weight.numel()
    p_dit = sum(p.numel() for p in model.dit.parameters())
    seq = len(model.backbone.tokenizer([PROMPT + ", take 0"]).input_ids[0]) + 1 + model.config.num_queries
    # FLOPs each step executes (MFU of each on its own count): the reference differentiates the whole
    # sequence, ours only the query positions
    flops_ref = flops_per_sample(model, device, whole_sequence=True)
    flops = flops_per_sample(model, device)
    estimate = 6 * p_dit * model.config.dit.num_tokens + 4 * p_lm * seq
    print(f"preset {args.preset}: backbone LM {p_lm:,} params (frozen), DiT {p_dit:,} (trained), sequence ~{seq} "
          f"tokens; FLOPs/sample counted: reference {flops_ref / 1e9:.3f} GFLOP (estimate {estimate / 1e9:.3f}), "
          f"ours {flops / 1e9:.3f}; peak {peak or 'n/a'} TFLOP/s")

    theirs = reference_dit(model.dit).float().train()
    theirs_v = reference_velocity(theirs, model.dit)
    ref_params = [model.queries, *model.dit.caption_projection.parameters(), *theirs.parameters()]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-4)
    ref = sweep("reference", lambda b: Step(model, theirs_v, ref_params, ref_opt, b, device, whole_sequence=True),
                batches, device, repeats, flops_ref, peak)
    theirs = theirs_v = ref_opt = ref_params = None  # free the reference DiT and its optimiser state
    gc.collect()

    params = [model.queries, *model.dit.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=gpu)
    velocity = torch.compile(model.dit) if args.compile else model.dit
    ours = sweep("ours", lambda b: Step(model, velocity, params, opt, b, device), batches, device, repeats,
                 flops, peak)

    common = [b for b in ours if b in ref]
    for b in common:
        print(f"batch {b}: {ratio(ref[b], ours[b])} (step time, ours/reference)")
    if ours and ref:
        b_ours, b_ref = max(ours, key=ours.get), max(ref, key=ref.get)
        mfu = f", MFU {100 * flops * ours[b_ours] / (peak * 1e12):.1f}%" if peak else ""
        mfu_ref = f", MFU {100 * flops_ref * ref[b_ref] / (peak * 1e12):.1f}%" if peak else ""
        print(f"best: ours {ours[b_ours]:.2f} samples/s at batch {b_ours}{mfu}; reference {ref[b_ref]:.2f} at "
              f"batch {b_ref}{mfu_ref}; speed-up {ours[b_ours] / ref[b_ref]:.2f}x")


if __name__ == "__main__":
    main()
