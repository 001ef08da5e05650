"""Ship a trained nano model as the package's embedded default (fp16, at most 25 MB).

    python scripts/ship_nano.py runs/nano/model
"""

import shutil
import sys
from pathlib import Path

import torch

from blip3o import Blip3o
from blip3o.presets import ASSETS

LIMIT_BYTES = 25 * 1024 * 1024


def main() -> None:
    source = Path(sys.argv[1])
    model = Blip3o.from_pretrained(source)
    model.config.extra = {**model.config.extra, "world": "shapes", "trained_from": str(source)}
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
