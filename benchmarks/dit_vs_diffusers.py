"""Our DiT vs diffusers' LuminaNextDiT2DModel: same config, same weights, same device, one run.

Measures (1) one forward pass at the CFG batch and (2) the official sampling loop (30 Euler steps,
CFG 3, both branches in one batch). diffusers gets what BLIP3-o's code gives it: the projected
condition, an all-ones mask, the 384x384 RoPE table, timesteps x1000. Checks the outputs agree
before timing. Last line: `ratio=<ours/theirs>` for the sampling loop (lower is faster).

    python benchmarks/dit_vs_diffusers.py                  # D=1792, 28 heads, 6 layers, fp32, CPU
    python benchmarks/dit_vs_diffusers.py --layers 24      # the full official 8B DiT
    python benchmarks/dit_vs_diffusers.py --compile        # ours through torch.compile (CPU: weights frozen
                                                           # and prepacked for oneDNN); diffusers stays eager
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from _common import reference_dit, reference_velocity
from blip3o.allocator import keep_freed_memory
from blip3o.dit import DiT, DiTConfig
from blip3o.flow import call_times, time_grid
from blip3o.sampling import denoise, dit_velocity


def build(cfg: DiTConfig, device, dtype, fuse: bool = True):
    ours = DiT(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():  # open the zero-initialised gates and modulations: no branch skipped
            if not p.any():
                p.normal_(0, 0.02)
    ours = ours.to(device, dtype)
    return ours.fuse_projections(fuse), reference_dit(ours).eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=1, help="images; the CFG batch is twice this")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cond-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed forward passes")
    ap.add_argument("--rounds", type=int, default=3, help="timed sampling loops of each (alternated; median)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--compile", action="store_true", help="our velocity through torch.compile (opt-in fast path)")
    ap.add_argument("--fuse", choices=["auto", "on", "off"], default="auto",
                    help="our fused input projections (auto: on CUDA only, as `accelerate`)")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    kept = keep_freed_memory()  # as the CLI does (BLIP3O_KEEP_FREED_MEMORY=0: glibc's defaults); both models alike
    torch.manual_seed(0)
    cfg = DiTConfig(num_layers=args.layers)
    fuse = args.fuse == "on" or (args.fuse == "auto" and device.type == "cuda")
    ours, theirs = build(cfg, device, dtype, fuse)
    theirs_v = reference_velocity(theirs, ours)
    b = args.batch
    cond = torch.randn(b, args.cond_len, cfg.cond_size, device=device, dtype=dtype)
    x = torch.randn(b, 64, cfg.in_channels, device=device, dtype=dtype)
    both, t2 = torch.cat([torch.zeros_like(cond), cond]), torch.full((2 * b,), 0.5, device=device)
    x2 = torch.cat([x, x])

    with torch.no_grad():
        err = (ours(x2, t2, both) - theirs_v(x2, t2, both)).abs().max().item()
        fwd_ours = timed(lambda: ours(x2, t2, both), args.repeats)
        fwd_theirs = timed(lambda: theirs_v(x2, t2, both), args.repeats)

        times = time_grid(args.steps)
        velocity, compile_s = ours.velocity, 0.0
        if args.compile:  # CPU: freezing turns weights into constants that inductor prepacks for oneDNN
            velocity = torch.compile(ours.velocity, dynamic=False,
                                     options={"freezing": True} if device.type == "cpu" else None)
            prepared = ours.prepare_condition(both)
            eager_out = ours.velocity(x2, t2, prepared)
            started = time.perf_counter()
            compiled_out = velocity(x2, t2, prepared)
            compile_s = time.perf_counter() - started
            compiled_err = (compiled_out - eager_out).abs().max().item()
            fwd_compiled = timed(lambda: velocity(x2, t2, prepared), args.repeats)

        def sample_ours():  # the product's path (`sampling.run_dit_loop`): condition K/V and every step's
            # modulations computed once per sample
            return denoise(dit_velocity(ours, cond, 3.0, call_times(times), predict=velocity), x, times, guidance=3.0)

        def sample_ours_per_step():  # the same condition K/V, each step computing its own modulations (none
            # are computed up front: this times what a step's modulations cost, not that and a wasted GEMM)
            prepared = ours.prepare_condition(both)
            return denoise(lambda xx, tt, call, x_0: velocity(xx, tt, prepared, x_0), x, times, guidance=3.0)

        def sample_theirs():
            return denoise(lambda xx, tt, call, x_0: theirs_v(xx, tt, both), x, times, guidance=3.0)

        err_loop = (sample_ours() - sample_theirs()).abs().max().item()

        # the loops alternate, round after round, so that a machine whose speed drifts (shared CPUs) slows
        # all three alike; the median round counts
        loops = {"ours": sample_ours, "theirs": sample_theirs, "per_step": sample_ours_per_step}
        rounds: dict[str, list[float]] = {name: [] for name in loops}
        for _ in range(max(1, args.rounds)):
            for name, fn in loops.items():
                started = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rounds[name].append(time.perf_counter() - started)
        loop_ours, loop_theirs, loop_per_step = (statistics.median(rounds[n]) for n in loops)
        pairs = [a / b for a, b in zip(rounds["ours"], rounds["theirs"], strict=True)]

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or 'x86_64'}, " \
                                                                        f"{torch.get_num_threads()} threads)"
    print(f"device: {name}  torch {torch.__version__}  dtype {args.dtype}  freed host memory kept: {kept}")
    print(f"config: D={cfg.hidden_size} layers={cfg.num_layers} heads={cfg.num_heads} ffn={cfg.ffn_dim} "
          f"batch={b} (CFG {2 * b}) cond_len={args.cond_len}  ours: fused projections {fuse}")
    print(f"max |ours - diffusers| = {err:.2e}")
    print(f"forward:  ours {fwd_ours * 1e3:8.1f} ms   diffusers {fwd_theirs * 1e3:8.1f} ms   "
          f"ratio {fwd_ours / fwd_theirs:.3f}")
    if args.compile:
        print(f"compiled: first call {compile_s:.0f} s (compilation), max |compiled - eager| = {compiled_err:.2e}, "
              f"forward {fwd_compiled * 1e3:8.1f} ms   ratio to diffusers {fwd_compiled / fwd_theirs:.3f}")
    print(f"{args.steps}-step CFG sample: ours{' (compiled)' if args.compile else ''} {loop_ours:8.3f} s   "
          f"diffusers {loop_theirs:8.3f} s   max |ours - diffusers| = {err_loop:.2e}")
    print(f"ours with per-step modulations (each step computes its own): {loop_per_step:8.3f} s   "
          f"ratio {loop_per_step / loop_theirs:.3f}")
    print(f"sampling ratio of each round: {' '.join(f'{r:.3f}' for r in pairs)} (medians of {len(pairs)} rounds below)")
    print(f"ratio={loop_ours / loop_theirs:.3f}")


if __name__ == "__main__":
    main()
