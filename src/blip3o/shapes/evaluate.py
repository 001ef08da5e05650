"""`blip3o eval shapes`: GenEval-style generation accuracy, VQA accuracy and edit accuracy in the Shapes world.

The model's own `generate`, `answer` and (for a model that can edit) `edit`, with the reference detector as
judge, on one of two sets:

| set              | prompts, scenes and edits                                 | questions                          |
|------------------|-----------------------------------------------------------|------------------------------------|
| `held-out`       | random streams no training draw uses (`held_out_random`); | the same number of each of the six |
|  (the default)   | images drawn by a held-out rasteriser (`area`)            | types; VQA = the mean of the six   |
| `training-world` | the evaluation seed through `make_example` and            | every question each scene allows;  |
|                  | `make_edit`: the training data's generator, rasterisers   | VQA = accuracy over all of them    |

Both draw `per_tag` prompts of each GenEval family and `num_edits` edits of each edit type, in the spec's
wording; edit overall is the mean of the six types' pass rates. Writes results.json, a grid of samples and,
for a model that can edit, a grid of edits.
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from PIL import Image
from tqdm import tqdm

from blip3o.files import save_image, write_text
from blip3o.images import image_grid

from .data import make_example
from .detect import detect
from .edits import EDIT_TYPES, Edit, EditTriplet, edit_scores, held_out_edit, make_edit, score_edit
from .heldout import EVAL_SEED, HELD_OUT_RASTERISER, held_out_random
from .prompts import TAGS, Prompt, check, describe, evaluation_prompts, geneval_scores, prompts_of_each_tag
from .questions import CAPTION, CAPTION_QUESTION, QUESTION_TYPES, Question, ask, score_answer
from .render import render
from .world import Scene, sample_scene

if TYPE_CHECKING:
    from blip3o import Blip3o

HELD_OUT, TRAINING_WORLD = "held-out", "training-world"
EVAL_SETS: tuple[str, ...] = (HELD_OUT, TRAINING_WORLD)


class Sizes(NamedTuple):
    """How much of each evaluation a set draws."""

    per_tag: int  # prompts of each GenEval family
    num_images: int  # images of each prompt
    # held-out: scenes of each question type (one question each) and as many caption requests;
    # training-world: scenes in all, each asked every question it allows
    num_scenes: int
    num_edits: int  # edits of each edit type (for a model that can edit)


DEFAULT_SIZES: dict[str, Sizes] = {HELD_OUT: Sizes(50, 2, 50, 50), TRAINING_WORLD: Sizes(25, 4, 200, 50)}
GRID_PER_TAG = 8  # samples.png: a row of 8 images per tag
GRID_EDITS_PER_TYPE = 4  # edits.png: a row of 4 (source, edited) pairs per edit type


@dataclass(frozen=True)
class Item:
    """One question about one image, and the scene the image shows (a caption is scored against it)."""

    image: Image.Image
    question: Question
    scene: Scene


def held_out_prompts(per_tag: int, seed: int = EVAL_SEED) -> list[Prompt]:
    """`per_tag` random prompts of each GenEval family, in TAGS order, from the held-out stream `prompts`."""
    return prompts_of_each_tag(held_out_random(seed, "prompts"), per_tag)


def held_out_items(per_type: int, seed: int = EVAL_SEED) -> list[Item]:
    """`per_type` questions of each of the six types, then `per_type` caption requests: each on a scene of
    its own (drawn from the held-out stream (type, i) until that type can be asked), drawn by the held-out
    rasteriser."""
    items = []
    for qtype in (*QUESTION_TYPES, CAPTION):
        for i in range(per_type):
            scene, question = _askable(qtype, held_out_random(seed, qtype, i))
            items.append(Item(render(scene, rasteriser=HELD_OUT_RASTERISER), question, scene))
    return items


def _askable(qtype: str, rng: random.Random) -> tuple[Scene, Question]:
    """A random scene of 1 to 4 objects about which a question of `qtype` (or the caption request) can be
    asked, and the question."""
    while True:
        scene = sample_scene(rng)
        if qtype == CAPTION:
            return scene, Question(CAPTION, CAPTION_QUESTION, describe(scene, rng))
        if (question := ask(scene, qtype, rng)) is not None:
            return scene, question


def training_world_items(num_scenes: int, seed: int = EVAL_SEED) -> list[Item]:
    """Every question of `num_scenes` random scenes of `make_example` (training's generator and rasterisers,
    at `seed`), and each one's caption request."""
    items = []
    for i in range(num_scenes):
        image, meta = make_example(seed, i, prompt_first=0.0)  # random scenes of 1-4 objects, none for a prompt
        scene = Scene.from_dict(meta["scene"])
        items += [Item(image, Question(q["type"], q["question"], q["answer"]), scene) for q in meta["questions"]]
        items.append(Item(image, Question(CAPTION, CAPTION_QUESTION, meta["caption"]), scene))
    return items


def held_out_edits(per_type: int, seed: int = EVAL_SEED) -> list[EditTriplet]:
    """`per_type` edits of each type, in EDIT_TYPES order: those of the held-out edit file (`held_out_edit`)."""
    return [held_out_edit(edit_type, i, seed) for edit_type in EDIT_TYPES for i in range(per_type)]


def training_world_edits(per_type: int, seed: int = EVAL_SEED) -> list[EditTriplet]:
    """`per_type` edits of each type, in EDIT_TYPES order, by `make_edit` at `seed` (training's generator and
    rasterisers) in the spec's wording: edit i of the k-th type is index 6 i + k, whatever `per_type`."""
    return [make_edit(seed, i * len(EDIT_TYPES) + k, edit_type=edit_type, paraphrase=0.0)
            for k, edit_type in enumerate(EDIT_TYPES) for i in range(per_type)]


def evaluate_generation(model: Blip3o, prompts: Sequence[Prompt], *, num_images: int, seed: int,
                        batch: int = 16) -> dict:
    """GenEval's score of `num_images` images for each prompt, judged by the detector.

    Returns {"scores": {tag: accuracy, ..., "overall"}, "num_images", "diverse_prompts" (share of prompts
    whose images are not all one layout), "samples": [(prompt, image), ...] for the grid}.
    """
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


def evaluate_understanding(model: Blip3o, items: Sequence[Item], *, mean_of_types: bool, batch: int = 32) -> dict:
    """The model's answers to `items`, scored against their scenes.

    Returns {"per_type": {question type: accuracy}, "num_per_type": {question type: questions},
    "vqa_overall" (captions left out: the mean of the types' accuracies if `mean_of_types`, else the
    accuracy over all questions), "caption", "num_questions"}.
    """
    correct: dict[str, list[bool]] = defaultdict(list)
    for start in tqdm(range(0, len(items), batch), desc="answer", leave=False):
        chunk = items[start:start + batch]
        answers = model.answer([it.image for it in chunk], [it.question.text for it in chunk], max_new_tokens=32)
        for it, a in zip(chunk, answers, strict=True):
            correct[it.question.type].append(score_answer(it.question, a, it.scene))
    per_type = {k: sum(v) / len(v) for k, v in correct.items()}
    vqa_types = [k for k in per_type if k != CAPTION]
    if mean_of_types:
        vqa = sum(per_type[k] for k in vqa_types) / max(1, len(vqa_types))
    else:
        answers = [ok for k in vqa_types for ok in correct[k]]
        vqa = sum(answers) / max(1, len(answers))
    return {"per_type": per_type, "num_per_type": {k: len(v) for k, v in correct.items()}, "vqa_overall": vqa,
            "caption": per_type.get(CAPTION, 0.0), "num_questions": len(items)}


def evaluate_editing(model: Blip3o, triplets: Sequence[EditTriplet], *, seed: int, batch: int = 16) -> dict:
    """The model's edit of each triplet's source by its instruction (edit k seeded `seed + k`, so the batch
    size changes nothing), judged by `score_edit` against the triplet's source scene.

    Returns {"per_type": {edit type: {"change", "preservation", "pass"}}, "edit_overall" (the mean of the
    types' pass rates), "num_per_type": {edit type: edits}, "num_edits", "samples": [(source, edited), ...]
    for the grid}.
    """
    scores, grid = [], defaultdict(list)
    for start in tqdm(range(0, len(triplets), batch), desc="edit", leave=False):
        chunk = triplets[start:start + batch]
        edited = model.edit([t.source for t in chunk], [t.instruction for t in chunk],
                            seed=[seed + start + j for j in range(len(chunk))])
        for triplet, image in zip(chunk, edited, strict=True):
            edit = Edit(**triplet.meta["edit"])
            scores.append(score_edit(Scene.from_dict(triplet.meta["source"]), edit, image))
            if len(grid[edit.type]) < GRID_EDITS_PER_TYPE:
                grid[edit.type].append((triplet.source, image))
    per_type = edit_scores(scores)
    overall = per_type.pop("overall")
    # the grid: a row per type, its first GRID_EDITS_PER_TYPE edits (as drawn, never picked)
    samples = [pair for edit_type in EDIT_TYPES for pair in grid[edit_type]]
    return {"per_type": per_type, "edit_overall": overall, "num_per_type": dict(Counter(s.type for s in scores)),
            "num_edits": len(scores), "samples": samples}


def edit_grid(samples: Sequence[tuple[Image.Image, Image.Image]], per_row: int) -> Image.Image:
    """(source, edited) pairs side by side, `per_row` pairs a row; an edited image of another size than its
    source is scaled to the source's."""
    images = [image for source, edited in samples
              for image in (source, edited.resize(source.size, Image.Resampling.NEAREST))]
    return image_grid(images, columns=2 * per_row)


def evaluate_shapes(model: Blip3o, out_dir: str | Path, *, eval_set: str = HELD_OUT, per_tag: int | None = None,
                    num_images: int | None = None, num_scenes: int | None = None, num_edits: int | None = None,
                    seed: int = EVAL_SEED, model_name: str | None = None) -> dict:
    """Every evaluation on `eval_set` (sizes left None take DEFAULT_SIZES'), editing only if the model can
    edit (else results["editing"] is None); writes OUT/results.json (what this returns), OUT/samples.png (a
    row per tag) and OUT/edits.png (a row per edit type, if edits were scored), each atomically and only once
    all are done."""
    if eval_set not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {eval_set!r}; expected one of {EVAL_SETS}")
    given = {"per_tag": per_tag, "num_images": num_images, "num_scenes": num_scenes, "num_edits": num_edits}
    sizes = DEFAULT_SIZES[eval_set]._replace(**{k: v for k, v in given.items() if v is not None})
    held_out = eval_set == HELD_OUT
    prompts = held_out_prompts(sizes.per_tag, seed) if held_out else evaluation_prompts(sizes.per_tag, seed)
    items = held_out_items(sizes.num_scenes, seed) if held_out else training_world_items(sizes.num_scenes, seed)
    gen = evaluate_generation(model, prompts, num_images=sizes.num_images, seed=seed)
    und = evaluate_understanding(model, items, mean_of_types=held_out)
    edit = None
    if model.can_edit:
        triplets = held_out_edits(sizes.num_edits, seed) if held_out else training_world_edits(sizes.num_edits, seed)
        edit = evaluate_editing(model, triplets, seed=seed)
    out = Path(out_dir)
    save_image(image_grid([image for _, image in gen.pop("samples")], columns=GRID_PER_TAG), out / "samples.png")
    if edit is not None:
        save_image(edit_grid(edit.pop("samples"), min(GRID_EDITS_PER_TYPE, sizes.num_edits)), out / "edits.png")
    settings = _settings(model, eval_set, sizes, seed, model_name, edits=edit is not None)
    results = {"generation": gen, "understanding": und, "editing": edit, "settings": settings}
    write_text(out / "results.json", json.dumps(results, indent=2))
    return results


def _settings(model: Blip3o, eval_set: str, sizes: Sizes, seed: int, model_name: str | None, *, edits: bool) -> dict:
    """results.json's record of how the evaluation was drawn and run (`num_edits` None: no edits scored)."""
    held_out = eval_set == HELD_OUT
    return {"set": eval_set, "model": model_name, "per_tag": sizes.per_tag, "num_images": sizes.num_images,
            "num_scenes": sizes.num_scenes, "scenes_are": "per question type" if held_out else "in all",
            "num_edits": sizes.num_edits if edits else None, "seed": seed,
            "rasteriser": HELD_OUT_RASTERISER if held_out else "the training data's mix",
            "vqa_overall": "mean of the six types" if held_out else "over all questions",
            "sampling": _sampling_settings(model)}


def _sampling_settings(model: Blip3o) -> dict:
    """The DiT sampling settings the model's generate and edit use (sampler, steps, guidance, edit_guidance, eta),
    where it has them."""
    config = getattr(model, "config", None)
    names = ("sampler", "steps", "guidance", "edit_guidance", "eta")
    return {k: getattr(config, k) for k in names if hasattr(config, k)}


def format_results(results: dict) -> str:
    """`evaluate_shapes`'s results as the lines `blip3o eval shapes` prints."""
    gen, und, settings = results["generation"], results["understanding"], results["settings"]
    lines = [f"set: {settings['set']}", "generation (GenEval formula)"]
    lines += [f"  {tag:<14} {score:.3f}" for tag, score in gen["scores"].items()]
    lines += [f"  diverse prompts {gen['diverse_prompts']:.3f}", "understanding"]
    lines += [f"  {t:<14} {a:.3f}" for t, a in und["per_type"].items()]
    lines += [f"  vqa overall    {und['vqa_overall']:.3f} ({settings['vqa_overall']})"]
    return "\n".join(lines + _editing_lines(results["editing"]))


def _editing_lines(editing: dict | None) -> list[str]:
    """The editing table: a row per edit type (change, preservation, pass) and the edit overall; one line for
    a model that cannot edit."""
    if editing is None:
        return ["editing: not scored, the model cannot edit"]
    lines = ["editing", f"  {'':<14} {'change':>6} {'preservation':>12} {'pass':>6}"]
    lines += [f"  {t:<14} {s['change']:>6.3f} {s['preservation']:>12.3f} {s['pass']:>6.3f}"
              for t, s in editing["per_type"].items()]
    lines += [f"  edit overall   {editing['edit_overall']:.3f} (mean of the six pass rates)"]
    return lines
