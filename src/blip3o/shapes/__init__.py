"""The Shapes world: a procedural world of flat shapes where every answer is checkable.

A 64x64 image on a light grey background holds 1 to 4 non-overlapping objects, each one of four shapes
(circle, square, triangle, cross) in one of six colours, 12 to 18 px a side; relations compare box centres.

    sample_scene -> render -> image -> detect -> objects
    scene -> prompts / questions / describe        check(prompt, objects), score_answer(...)
    write_shards / iter_examples: webdataset shards of examples (image, json)

| module         | what it owns                                                        |
|----------------|---------------------------------------------------------------------|
| `world.py`     | constants, `Obj`/`Scene`, relations, the scene sampler              |
| `render.py`    | scene -> 64x64 RGB, five rasterisers (aliased and anti-aliased)     |
| `detect.py`    | the reference detector: image -> `DetectedObj`s                     |
| `prompts.py`   | the six GenEval families, free descriptions, `check`                |
| `questions.py` | the six question types, the caption request, `score_answer`         |
| `data.py`      | shard writing and robust shard reading                              |
| `edits.py`     | edit triplets, the instruction grammar, `score_edit`, edit shards   |
"""

from .data import (
    ReadStats,
    decode_example,
    iter_examples,
    make_example,
    shard_urls,
    write_shards,
)
from .detect import DetectedObj, classify, detect, palette_index
from .edits import (
    EDIT_TYPES,
    Edit,
    EditScore,
    EditTriplet,
    edit_scores,
    held_out_edit,
    iter_edits,
    make_edit,
    parse_instruction,
    score_edit,
    write_edit_file,
    write_edit_shards,
)
from .prompts import (
    TAGS,
    Group,
    Prompt,
    Relation,
    Requirement,
    canonical_scene,
    check,
    describe,
    evaluation_prompts,
    geneval_scores,
    make_prompt,
    parse_description,
    prompts_from_scene,
    sample_prompt,
    scene_for,
)
from .questions import (
    CAPTION,
    CAPTION_QUESTION,
    QUESTION_TYPES,
    Question,
    answer_question,
    ask,
    normalize_answer,
    plan_questions,
    questions_for_scene,
    reading_questions,
    restate_questions,
    score_answer,
)
from .render import ANTIALIASED, RASTERISERS, choose_rasteriser, coverage, render
from .world import (
    BACKGROUND,
    COLORS,
    IMAGE_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    NUMBER_WORDS,
    PALETTE,
    RELATIONS,
    SHAPES,
    Obj,
    ObjSpec,
    Scene,
    above,
    below,
    left_of,
    plural,
    position_safe,
    relation_holds,
    relation_margin,
    right_of,
    sample_scene,
    scene_errors,
)

__all__ = [
    "EDIT_TYPES",
    "Edit",
    "EditScore",
    "EditTriplet",
    "edit_scores",
    "held_out_edit",
    "iter_edits",
    "make_edit",
    "parse_instruction",
    "score_edit",
    "write_edit_file",
    "write_edit_shards",
    "ANTIALIASED",
    "BACKGROUND",
    "CAPTION",
    "CAPTION_QUESTION",
    "COLORS",
    "IMAGE_SIZE",
    "MAX_SIZE",
    "MIN_SIZE",
    "NUMBER_WORDS",
    "PALETTE",
    "QUESTION_TYPES",
    "RASTERISERS",
    "RELATIONS",
    "SHAPES",
    "TAGS",
    "DetectedObj",
    "Group",
    "Obj",
    "ObjSpec",
    "Prompt",
    "Question",
    "ReadStats",
    "Relation",
    "Requirement",
    "Scene",
    "above",
    "answer_question",
    "ask",
    "below",
    "canonical_scene",
    "check",
    "choose_rasteriser",
    "classify",
    "coverage",
    "decode_example",
    "describe",
    "detect",
    "evaluation_prompts",
    "geneval_scores",
    "iter_examples",
    "left_of",
    "make_prompt",
    "make_example",
    "normalize_answer",
    "palette_index",
    "parse_description",
    "plural",
    "position_safe",
    "prompts_from_scene",
    "questions_for_scene",
    "reading_questions",
    "plan_questions",
    "restate_questions",
    "relation_holds",
    "relation_margin",
    "render",
    "right_of",
    "sample_prompt",
    "sample_scene",
    "scene_errors",
    "scene_for",
    "score_answer",
    "shard_urls",
    "write_shards",
]
