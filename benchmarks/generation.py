"""Generation latency per stage and end to end at batch 1, throughput at the best batch, peak memory.

Stages, each timed for the reference and for ours in the same process on the same weights:

    backbone condition   prompt -> (1, 64, H)                      (the same module for both)
    DiT                  30 Euler steps, CFG 3, both branches in one batch
                         reference: diffusers LuminaNextDiT2DModel, condition re-projected every step
                         ours eager: Blip3o.sample_tokens (cached condition K/V)
                         ours fast:  accel.DiTLoopGraph as `Blip3o.dit_loop` (fused projections, the whole
                                     loop as ONE CUDA graph)
    decoder              50 UNet steps with CFG (decode minus the VAE)
                         reference: the plain diffusers UNet; ours: channels-last + the whole 50-step loop
                         as ONE CUDA graph (accel.DecoderLoopGraph); also ours with a CUDA graph per step
    VAE decode           latents -> pixels
    end to end           Blip3o.generate (negative condition cached), reference vs accelerate()

Then images/s of ours at batch 1, 2, 4, 8 (best reported), and peak GPU memory of one generate call
with and without `enable_offload`.

    python benchmarks/generation.py --preset debug                 # CPU smoke, seconds
    python benchmarks/generation.py --preset blip3o-8b             # on a GPU: bf16, 1024x1024, official steps
"""

from __future__ import annotations

import argparse
import gc

import torch

from _common import (
    PROMPT,
    Skipped,
    add_common_args,
    build_model,
    device_line,
    guarded,
    peak_gib,
    ratio,
    reference_dit,
    reference_velocity,
    reset_peak,
    resolve,
    sync,
    timed,
)
from blip3o.accel import AccelOptions, DecoderLoopGraph, DiTLoopGraph, UNetStepGraph, accelerate
from blip3o.flow import time_grid
from blip3o.sampling import denoise, run_dit_loop


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--steps", type=int, default=None, help="DiT steps (default: the preset's; official 30)")
    ap.add_argument("--decoder-steps", type=int, default=None, help="default: the decoder's (official 50)")
    ap.add_argument("--size", type=int, default=None, help="image side (default: the decoder's, official 1024)")
    ap.add_argument("--batches", default=None, help="throughput batch sizes, e.g. 1,2,4,8")
    ap.add_argument("--compile", action="store_true", help="also torch.compile the DiT velocity and the UNet")
    ap.add_argument("--skip-offload", action="store_true")
    ap.add_argument("--sections", default="dit,decoder,e2e,throughput,offload",
                    help="which sections to run (the backbone condition always runs)")
    return ap.parse_args()


def main() -> None:
    args = parse()
    device, dtype = resolve(args)
    gpu = device.type == "cuda"
    repeats = args.repeats or (3 if gpu else 2)
    model = build_model(args.preset, device, dtype)
    cfg, decoder = model.config, model.decoder
    steps, guidance = args.steps or cfg.steps, cfg.guidance
    dsteps, size = args.decoder_steps or decoder.default_steps, args.size or decoder.default_size
    dguide = decoder.default_guidance
    times = time_grid(steps)
    print(device_line(device, dtype))
    print(f"preset {args.preset}: DiT {steps} steps CFG {guidance}; decoder {dsteps} steps CFG {dguide}; "
          f"{size}x{size}; repeats {repeats} (median)")

    def report(name: str, ours: float, reference: float | None = None, unit: str = "ms") -> None:
        scale = 1e3 if unit == "ms" else 1.0
        line = f"{name:<28} ours {ours * scale:10.2f} {unit}"
        if reference is not None:
            line += f"   reference {reference * scale:10.2f} {unit}   {ratio(ours, reference)}"
        print(line, flush=True)

    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        # ---- backbone condition (one module; the queries' hidden states)
        cond = model.condition([PROMPT])
        report("backbone condition", timed(lambda: model.condition([PROMPT]), device, repeats))
        seq = model.backbone.tokenizer([PROMPT]).input_ids
        print(f"  (prompt {len(seq[0])} tokens + template + [IMG] + {cfg.num_queries} queries)")

        # ---- DiT: ours graphed, ours eager, reference (diffusers)
        # Each section is guarded: a failure prints its traceback and the next section still runs.
        tokens = torch.randn(1, cfg.dit.num_tokens, cfg.dit.in_channels, device=device, dtype=dtype)
        t_fast = t_eager = t_ref = None
        want = set(args.sections.split(","))
        with guarded("DiT fast"):
            model.dit.fuse_projections(True)
            model.dit_loop = DiTLoopGraph(model.dit, cuda_graph=True, compile=args.compile)
            tokens = model.sample_tokens(cond, steps=steps, generator=gen())
            t_fast = timed(lambda: model.sample_tokens(cond, steps=steps, generator=gen()), device, repeats)
        model.dit_loop = run_dit_loop  # the graphs' memory pools go with the DiTLoopGraph
        model.dit.fuse_projections(False)
        with guarded("DiT eager"):
            eager = model.sample_tokens(cond, steps=steps, generator=gen())
            t_eager = timed(lambda: model.sample_tokens(cond, steps=steps, generator=gen()), device, repeats)
            print(f"  max |fast - eager| = {(tokens.float() - eager.float()).abs().max().item():.3e} "
                  f"(fused projections{', CUDA graph' if gpu else ''})")
        with guarded("DiT reference"):
            x_1 = torch.randn(1, cfg.dit.num_tokens, cfg.dit.in_channels, device=device, dtype=dtype)
            theirs = reference_dit(model.dit)
            theirs_v = reference_velocity(theirs, model.dit)
            both = torch.cat([torch.zeros_like(cond), cond])
            t_ref = timed(lambda: denoise(lambda x, t, call, x_0: theirs_v(x, t, both), x_1, times, guidance=guidance),
                          device, max(1, repeats - 1))
        theirs = theirs_v = None  # free the reference before our graphs allocate
        gc.collect()
        for name, t in (("eager", t_eager), ("fast", t_fast)):
            if t is not None:
                report(f"DiT {steps}-step CFG ({name})", t, t_ref)

        if want == {"dit"}:
            return
        # ---- decoder: UNet loop (decode minus VAE) and VAE
        negative = model.negative_tokens(steps, guidance)
        side = size // decoder.vae_downscale
        latents = torch.randn(1, decoder.config.latent_channels, side, side, device=device, dtype=dtype)
        t_vae = timed(lambda: decoder.latents_to_pixels(latents), device, repeats)
        report("VAE decode", t_vae)

        def decode():
            return decoder.decode(tokens, negative=negative, steps=dsteps, guidance=dguide, size=size,
                                  generator=gen())

        t_dec = t_dec_step = t_dec_ref = pixels = None
        with guarded("decoder ours"):
            if "decoder" not in want:
                raise Skipped
            decoder.set_channels_last(True)
            decoder.sampling_loop = DecoderLoopGraph(decoder, compile=args.compile)
            pixels = decode()
            t_dec = timed(decode, device, repeats) - t_vae
        decoder.sampling_loop = decoder.denoise
        gc.collect()
        with guarded("decoder ours, graph per step"):
            if "decoder" not in want:
                raise Skipped
            decoder.unet_call = UNetStepGraph(decoder, compile=args.compile)
            step_pixels = decode()
            t_dec_step = timed(decode, device, repeats) - t_vae
            if pixels is not None:
                print(f"  max |loop graph - step graph| = {(pixels - step_pixels).abs().max().item():.3e} (pixels)")
        decoder.unet_call = decoder.unet_output
        decoder.set_channels_last(False)
        gc.collect()
        with guarded("decoder reference"):
            if "decoder" not in want:
                raise Skipped
            t_dec_ref = timed(decode, device, max(1, repeats - 1)) - t_vae
        for name, t in (("graph per step", t_dec_step), ("loop graph", t_dec)):
            if t is not None:
                report(f"decoder {dsteps} CFG steps ({name})", t, t_dec_ref)

        # ---- end to end, batch 1: reference = the plain model, ours = accelerate()
        settings = dict(steps=steps, decoder_steps=dsteps, size=size, seed=0)
        t_e2e = t_e2e_ref = None
        with guarded("end to end reference"):
            if "e2e" not in want:
                raise Skipped
            t_e2e_ref = timed(lambda: model.generate([PROMPT], **settings), device, max(1, repeats - 1))
        with guarded("end to end ours"):
            if "e2e" not in want:
                raise Skipped
            accelerate(model, AccelOptions(compile=args.compile, static_cache=False))
            t_e2e = timed(lambda: model.generate([PROMPT], **settings), device, repeats)
            report("end to end (batch 1)", t_e2e, t_e2e_ref)

        # ---- throughput: ours at several batch sizes
        batches = [int(b) for b in (args.batches or ("1,2,4,8" if gpu else "1,2")).split(",")]
        best = (0.0, 0)
        with guarded("throughput"):
            if "throughput" not in want:
                raise Skipped
            if not isinstance(model.dit_loop, DiTLoopGraph):  # the end-to-end section did not run: accelerate here
                accelerate(model, AccelOptions(compile=args.compile, static_cache=False))
            for b in batches:
                clear_graphs(model)  # each batch size's graphs hold their own memory pool
                try:
                    t = timed(lambda b=b: model.generate([PROMPT], num_images=b, **settings), device, 1)
                except torch.OutOfMemoryError:
                    print(f"  batch {b}: out of memory")
                    break
                print(f"  batch {b}: {b / t:.3f} images/s ({t:.3f} s a call)", flush=True)
                best = max(best, (b / t, b))
        print(f"throughput: {best[0]:.3f} images/s at batch {best[1]}")

        # ---- peak memory of one generate call, with and without offload
        if not args.skip_offload and "offload" in want:
            with guarded("offload"):
                clear_graphs(model)
                reset_peak(device)
                model.generate([PROMPT], **settings)
                sync(device)
                without = peak_gib(device)
                model.enable_offload(device)
                reset_peak(device)
                t_off = timed(lambda: model.generate([PROMPT], **settings), device, 1, warmup=0)
                print(f"peak memory of generate: without offload {without}, with offload {peak_gib(device)} "
                      f"(offloaded call {t_off:.2f} s)")
    if t_e2e is not None and t_e2e_ref:
        print(f"ratio={t_e2e / t_e2e_ref:.3f}  (end to end, ours/reference)")


def clear_graphs(model) -> None:
    """Drop the captured graphs of `accelerate` (a new batch size captures its own); the eager defaults in
    the same slots (`run_dit_loop`, `unet_output`, `denoise`) hold none."""
    for slot in (model.dit_loop, model.decoder.unet_call, model.decoder.sampling_loop):
        clear = getattr(slot, "clear", None)
        if clear is not None:
            clear()


if __name__ == "__main__":
    main()
