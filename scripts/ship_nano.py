"""Write a trained nano model as the package's embedded default, src/blip3o/assets/nano/ (fp16, at most 25 MB).

    python scripts/ship_nano.py runs/nano/model

The config's `extra` records the world, and a sampling default the folder leaves unset (`edit_guidance`) takes the
nano preset's; the tokenizer folder is left out, since the builtin tokenizer ships with the package.
"""

import shutil
import sys
from pathlib import Path

import torch

from blip3o import Blip3o
from blip3o.presets import ASSETS, get_preset

LIMIT_BYTES = 25 * 1024 * 1024


def main() -> None:
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "config.json").is_file():
        raise SystemExit("usage: python scripts/ship_nano.py MODEL_FOLDER (a saved Blip3o: config.json + weights)")
    source = Path(sys.argv[1])
    model = Blip3o.from_pretrained(source)
    model.config.extra = {**model.config.extra, "world": "shapes"}
    if model.config.edit_guidance is None:
        model.config.edit_guidance = get_preset("nano").edit_guidance
    target = ASSETS / "nano"
    model.to(torch.float16).save_pretrained(target)
    shutil.rmtree(target / "tokenizer", ignore_errors=True)  # the builtin tokenizer ships with the package
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"shipped {target}: {size / 2**20:.1f} MiB")
    if size > LIMIT_BYTES:
        shutil.rmtree(target)
        raise SystemExit(f"{size} bytes is over the {LIMIT_BYTES} byte budget; nothing shipped")


if __name__ == "__main__":
    main()
