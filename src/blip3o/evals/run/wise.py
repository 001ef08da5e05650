"""WISE (PKU-YuanGroup/WISE, WISE_legacy/data): its prompt JSON files in, one image per `prompt_id` out.

    OUT/<prompt_id>.png     the image of that prompt (1.png ... 1000.png for the three official files)
    OUT/settings.json       how they were made

The images are then judged (`blip3o eval wise-judge`, run/judge.py) and the judgements scored with WISE's
Calculate.py. Each file is a JSON list of objects with `prompt_id` (a whole number, unique over the files) and
`Prompt`; the judge also reads each one's `Explanation` and `Subcategory`.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from blip3o.cli.errors import BadInput
from blip3o.evals.run.generation import Prompt
from blip3o.evals.run.work import item_file, read_json

# the three files of the original release, which the paper's WiScore is computed over
WISE_FILES = ("cultural_common_sense.json", "spatio-temporal_reasoning.json", "natural_science.json")


def wise_files(data: list[str]) -> list[Path]:
    """The prompt files --data names: files as given, or a folder's three official files."""
    files = []
    for name in data:
        path = Path(name)
        if path.is_dir():
            missing = [file for file in WISE_FILES if not (path / file).is_file()]
            if missing:
                raise BadInput(f"--data {name}: the folder lacks {', '.join(missing)} (WISE's data/ folder holds "
                               f"{', '.join(WISE_FILES)}); or name the prompt files themselves")
            files += [path / file for file in WISE_FILES]
        elif path.is_file():
            files.append(path)
        else:
            raise BadInput(f"--data {name}: no such file or folder")
    return files


def read_wise_file(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """The entries of one prompt file, each checked for `prompt_id` and the string `fields`."""
    entries = read_json(path)
    if not isinstance(entries, list):
        raise BadInput(f"{path}: expected a JSON list of prompts, got a {type(entries).__name__}")
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise BadInput(f"{path}: entry {number} is not a JSON object")
        prompt_id = entry.get("prompt_id")
        if not isinstance(prompt_id, int) or isinstance(prompt_id, bool):
            raise BadInput(f"{path}: entry {number} needs 'prompt_id', a whole number")
        for key in fields:
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise BadInput(f"{path}: entry {number} (prompt_id {prompt_id}) needs {key!r}, a non-empty string")
    return entries


def read_wise(data: list[str], fields: tuple[str, ...] = ("Prompt",)) -> dict[Path, list[dict]]:
    """Every file's entries, by file; a prompt_id two entries share is bad input naming both places."""
    by_file, seen = {}, {}
    for path in wise_files(data):
        by_file[path] = read_wise_file(path, fields)
        for entry in by_file[path]:
            if entry["prompt_id"] in seen:
                raise BadInput(f"prompt_id {entry['prompt_id']} is in {seen[entry['prompt_id']]} and again in {path}")
            seen[entry["prompt_id"]] = path
    return by_file


def wise_prompts(data: list[str], out: Path) -> list[Prompt]:
    """One prompt per entry, in file order, its image OUT/<prompt_id>.png."""
    return [Prompt(entry["Prompt"], out / f"{entry['prompt_id']}.png")
            for entries in read_wise(data).values() for entry in entries]


def write_wise_image(prompt: Prompt, images: list[Image.Image]) -> None:
    (image,) = images
    with item_file(prompt.target) as tmp:
        image.save(tmp, format="PNG")
