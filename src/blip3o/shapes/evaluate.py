"""`blip3o eval shapes`: GenEval-style generation accuracy and VQA accuracy in the Shapes world.

Fresh prompts and scenes (seeded, never the training seed), the model's own `generate` and
`answer`, and the reference detector as judge. Writes results.json and a grid of samples.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from blip3o.files import save_image, write_text
from blip3o.images import image_grid

from .data import make_example
from .detect import detect
from .prompts import TAGS, check, evaluation_prompts, geneval_scores
from .questions import CAPTION, Question, score_answer
from .world import Scene

if TYPE_CHECKING:
    from blip3o import Blip3o

EVAL_SEED = 1_000_003  # far from any training seed
GRID_PER_TAG = 8  # samples.png: a row of 8 images per tag


def evaluate_generation(model: Blip3o, *, per_tag: int, num_images: int, seed: int, batch: int = 16) -> dict:
    """GenEval's score of `num_images` images for each of `per_tag` prompts a family, judged by the detector.

    Returns {"scores": {tag: accuracy, ..., "overall"}, "num_images", "diverse_prompts" (share of prompts
    whose images are not all one layout), "samples": [(prompt, image), ...] for the grid}.
    """
    prompts = evaluation_prompts(per_tag, seed)
    passed, tags, grid, layouts = [], [], defaultdict(list), defaultdict(set)
    for start in tqdm(range(0, len(prompts), batch), desc="generate", leave=False):
        chunk = prompts[start:start + batch]
        images = model.generate([p.text for p in chunk], num_images=num_images, seed=seed + start)
        for j, image in enumerate(images):
            prompt = chunk[j // num_images]
            objects = detect(image)
            passed.append(check(prompt, objects))
            tags.append(prompt.tag)
            layouts[prompt.text + str(start + j // num_images)].add(tuple(sorted((o.shape, o.color, o.box)
                                                                                  for o in objects)))
            if j % num_images == 0 and len(grid[prompt.tag]) < GRID_PER_TAG:
                grid[prompt.tag].append((prompt.text, image))
    scores = geneval_scores(tags, passed)
    # diverse: the num_images samples of a prompt are not all the same layout
    diverse = sum(len(v) > 1 for v in layouts.values()) / max(1, len(layouts))
    # the grid: a row per tag, the first image of its first GRID_PER_TAG prompts (as drawn, never picked)
    samples = [sample for tag in TAGS for sample in grid[tag]]
    return {"scores": scores, "num_images": len(passed), "diverse_prompts": diverse, "samples": samples}


def evaluate_understanding(model: Blip3o, *, num_scenes: int, seed: int, batch: int = 32) -> dict:
    """Answers to every question of `num_scenes` random scenes, and their captions, scored against the scene.

    Returns {"per_type": {question type: accuracy}, "vqa_overall" (captions left out), "caption",
    "num_questions"}.
    """
    items = []
    for i in range(num_scenes):
        image, meta = make_example(seed, i, prompt_first=0.0)  # random scenes of 1-4 objects, none for a prompt
        scene = Scene.from_dict(meta["scene"])
        for q in meta["questions"]:
            items.append((image, Question(q["type"], q["question"], q["answer"]), scene))
        items.append((image, Question(CAPTION, "describe the image.", meta["caption"]), scene))
    correct: dict[str, list[bool]] = defaultdict(list)
    for start in tqdm(range(0, len(items), batch), desc="answer", leave=False):
        chunk = items[start:start + batch]
        answers = model.answer([im for im, _, _ in chunk], [q.text for _, q, _ in chunk], max_new_tokens=32)
        for (_, q, scene), a in zip(chunk, answers, strict=True):
            correct[q.type].append(score_answer(q, a, scene))
    per_type = {k: sum(v) / len(v) for k, v in correct.items()}
    vqa = [ok for k, v in correct.items() if k != CAPTION for ok in v]
    return {"per_type": per_type, "vqa_overall": sum(vqa) / max(1, len(vqa)), "caption": per_type.get(CAPTION, 0.0),
            "num_questions": len(items)}


def evaluate_shapes(model: Blip3o, out_dir: str | Path, *, per_tag: int = 25, num_images: int = 4,
                    num_scenes: int = 200, seed: int = EVAL_SEED) -> dict:
    """Both evaluations; writes OUT/results.json (what this returns) and OUT/samples.png (a row per tag), each
    atomically and only once both evaluations are done."""
    out = Path(out_dir)
    gen = evaluate_generation(model, per_tag=per_tag, num_images=num_images, seed=seed)
    und = evaluate_understanding(model, num_scenes=num_scenes, seed=seed)
    save_image(image_grid([image for _, image in gen.pop("samples")], columns=GRID_PER_TAG), out / "samples.png")
    results = {"generation": gen, "understanding": und, "settings": {
        "per_tag": per_tag, "num_images": num_images, "num_scenes": num_scenes, "seed": seed}}
    write_text(out / "results.json", json.dumps(results, indent=2))
    return results


def format_results(results: dict) -> str:
    """`evaluate_shapes`'s results as the lines `blip3o eval shapes` prints."""
    gen, und = results["generation"], results["understanding"]
    lines = ["generation (GenEval formula)"]
    lines += [f"  {tag:<14} {score:.3f}" for tag, score in gen["scores"].items()]
    lines += [f"  diverse prompts {gen['diverse_prompts']:.3f}", "understanding"]
    lines += [f"  {t:<14} {a:.3f}" for t, a in und["per_type"].items()]
    lines += [f"  vqa overall    {und['vqa_overall']:.3f}"]
    return "\n".join(lines)
