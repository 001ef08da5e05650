"""GenEval (djghosh13/geneval): its `prompts/evaluation_metadata.jsonl` in, the folders its scorer reads out.

    OUT/00000/metadata.jsonl          the prompt's line of evaluation_metadata.jsonl, every field kept
    OUT/00000/samples/0000.png ...    its images (4 by default)
    OUT/00000/grid.png                the images side by side
    OUT/settings.json                 how they were made

Folder N holds line N + 1 of the file. Each folder is written whole or not at all (a temporary folder renamed
into place), so the scorer, which reads every numbered folder, never sees a prompt half done:

    python evaluation/evaluate_images.py OUT --outfile results.jsonl --model-path MODELS
    python evaluation/summary_scores.py results.jsonl
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from blip3o.cli.files import read_jsonl
from blip3o.cli.generate import write_prompt_folder
from blip3o.evals.run.generation import Prompt
from blip3o.evals.run.work import item_folder


def geneval_prompts(metadata_file: str, out: Path) -> list[Prompt]:
    """One prompt per line of GenEval's metadata file (each a JSON object with a `prompt`); bad lines are bad
    input naming the file and line."""
    records = read_jsonl(metadata_file, {"prompt": str})
    return [Prompt(record["prompt"], out / f"{index:05d}", record) for index, record in enumerate(records)]


def write_geneval_folder(prompt: Prompt, images: list[Image.Image]) -> None:
    """A prompt's folder of GenEval's layout, atomically: what `blip3o generate --prompts-file` writes."""
    write_prompt_folder(item_folder(prompt.target), prompt.record, [images])
