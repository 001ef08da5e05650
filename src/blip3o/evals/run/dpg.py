"""DPG-Bench (TencentQQGYLab/ELLA, dpg_bench/): its `prompts/*.txt` in, one 2x2 grid of 4 images a prompt out.

    OUT/<name>.png        the images of prompts/<name>.txt as a 2x2 grid, each tile TILE x TILE pixels
    OUT/settings.json     how they were made

The scorer crops each grid into its four tiles, so it is told the tile size (and lists every file of the
folder: it reports settings.json as a file it could not score, and goes on):

    bash dpg_bench/dist_eval.sh OUT TILE
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from blip3o.cli.errors import BadInput
from blip3o.cli.files import read_text
from blip3o.evals.run.generation import Prompt
from blip3o.evals.run.work import item_file
from blip3o.images import image_grid

DPG_IMAGES = 4  # a 2x2 grid: what the scorer's 4 crops read


def prompts_folder(data: str) -> Path:
    """The folder of DPG-Bench's prompt files: DATA/prompts, or DATA itself."""
    folder = Path(data)
    if not folder.is_dir():
        raise BadInput(f"--data {data}: no such folder (DPG-Bench's dpg_bench/prompts, or the folder holding it)")
    return folder / "prompts" if (folder / "prompts").is_dir() else folder


def dpg_prompts(data: str, out: Path) -> list[Prompt]:
    """One prompt per `.txt` file, in name order; an empty or unreadable file is bad input naming it."""
    files = sorted(prompts_folder(data).glob("*.txt"))
    if not files:
        raise BadInput(f"--data {data}: no prompt files (*.txt) in {prompts_folder(data)}")
    prompts = []
    for file in files:
        text = read_text(file).strip()
        if not text:
            raise BadInput(f"{file}: the prompt is empty")
        prompts.append(Prompt(text, out / f"{file.stem}.png"))
    return prompts


def write_dpg_grid(prompt: Prompt, images: list[Image.Image]) -> None:
    """A prompt's 4 images as one 2x2 grid, atomically."""
    with item_file(prompt.target) as tmp:
        image_grid(images, columns=2).save(tmp, format="PNG")
