"""Understanding: tokens/s of `answer` (image + question -> greedy reply) at batch 1 and 8.

Times the `generate` call inside `Backbone.chat`, on the inputs `answer` builds (chat template, one
image a question), with a fixed reply length (`min_new_tokens` = `max_new_tokens`: random weights
would otherwise stop at random). tokens/s = batch * new tokens / seconds, prefill included.

    reference: plain transformers `generate` (dynamic KV cache, eager)
    ours:      accel.enable_static_cache (static KV cache; on CUDA the decode step compiled with
               mode "reduce-overhead", i.e. CUDA graphs)

    python benchmarks/understanding.py --preset debug              # CPU smoke, seconds
    python benchmarks/understanding.py --preset blip3o-8b          # on a GPU (the first call compiles)
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

from _common import add_common_args, build_model, device_line, guarded, ratio, resolve, timed
from blip3o.accel import disable_static_cache, enable_static_cache


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 128 on CUDA, 16 on CPU")
    ap.add_argument("--image-size", type=int, default=None, help="default: 448 on CUDA (256 image tokens), 32 on CPU")
    ap.add_argument("--no-compile", action="store_true", help="ours: static cache without torch.compile")
    return ap.parse_args()


def inputs_for(backbone, batch: int, image_size: int):
    """What `answer` hands to generate for `batch` (image, question) pairs."""
    image = Image.new("RGB", (image_size, image_size), (180, 60, 40))
    conversations = [[{"role": "user", "content": [{"type": "image", "image": image},
                                                   {"type": "text", "text": f"what is in picture {i}?"}]}]
                     for i in range(batch)]
    texts, images = backbone._render(conversations)
    return backbone.processor(text=texts, images=images, padding=True, padding_side="left",
                              return_tensors="pt").to(backbone.device)


def main() -> None:
    args = parse()
    device, dtype = resolve(args)
    gpu = device.type == "cuda"
    repeats = args.repeats or 2
    new = args.max_new_tokens or (128 if gpu else 16)
    image_size = args.image_size or (448 if gpu else 32)
    model = build_model(args.preset, device, dtype)
    backbone = model.backbone
    print(device_line(device, dtype))
    compile = gpu and not args.no_compile
    print(f"preset {args.preset}: greedy, {new} new tokens, one {image_size}x{image_size} image a question; "
          f"ours = static cache{' + compile (reduce-overhead)' if compile else ''}; repeats {repeats} (median)")
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=backbone.tokenizer.pad_token_id)
    rates = []
    for batch in [int(b) for b in args.batches.split(",")]:
        with guarded(f"batch {batch}"), torch.no_grad():
            inputs = inputs_for(backbone, batch, image_size)
            prompt_len = inputs["input_ids"].shape[1]
            disable_static_cache(backbone)
            t_ref = timed(lambda inputs=inputs: backbone.model.generate(**inputs, **gen), device, repeats)
            print(f"batch {batch} (prompt {prompt_len} tokens): reference {batch * new / t_ref:9.1f} tokens/s",
                  flush=True)
            enable_static_cache(backbone, compile=compile)
            out = backbone.model.generate(**inputs, **gen)  # warm-up (compiles on CUDA)
            assert out.shape[1] == prompt_len + new, out.shape
            t_ours = timed(lambda inputs=inputs: backbone.model.generate(**inputs, **gen), device, repeats)
            ours, ref = batch * new / t_ours, batch * new / t_ref
            rates.append(ours)
            print(f"batch {batch} (prompt {prompt_len} tokens): ours {ours:9.1f} tokens/s   reference {ref:9.1f} "
                  f"tokens/s   {ratio(t_ours, t_ref)} (time, ours/reference)", flush=True)
    disable_static_cache(backbone)
    if rates:
        print(f"tokens/s at batch 1: {rates[0]:.1f}")


if __name__ == "__main__":
    main()
