"""The nano recipe: Shapes data, then the four stages in order, each starting from the last.

    data -> clip -> understanding -> decoder -> generation (on data_generation)
         -> edit (on data_edit mixed with data_generation) -> OUT/model (the nano model)

Each stage is one TrainConfig (below); `blip3o train nano` runs them all, `blip3o train STAGE
--config FILE` one. Every stage writes OUT/<stage>/checkpoint (resumable) and OUT/<stage>/model.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch

from blip3o.train.data import EditShardDataset, Mixture, ShardDataset
from blip3o.train.trainer import TrainConfig, Trainer

# The DiT learns to edit on Shapes edits (OUT/data_edit) mixed with the generation stage's shards (EDIT_MIXTURE),
# which keep it generating from text; the queries stay as generation trained them, so each item's frozen inputs are
# computed once. The DiT reads the source both aligned and as context: docs/editing.md gives the comparison
EDIT_STAGE = TrainConfig(stage="edit", steps=3500, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.998,
                         stage_options={"source": "both", "train_queries": False, "prompt_share": 0.9})
EDIT_MIXTURE = {"edits": 0.7, "generation": 0.3}  # the shares of the edit stage's items
EDIT_SHARE = 0.2  # edits written for the edit stage, as a share of the recipe's scenes (8,000 of 40,000)

NANO_STAGES: list[TrainConfig] = [
    # object codes at weight 16: each object is read back from the token of its centre (a linear probe reads
    # its shape at 0.92, against 0.78 at weight 4); the decoder then draws every scene of real tokens right
    # (1.0, against 0.975 with a read-out of each token's own patch) and the DiT generates 0.43 against 0.27
    TrainConfig(stage="clip", steps=1200, batch_size=64, lr=1e-3, warmup_steps=100, ema_decay=0.0,
                stage_options={"object_codes": 16.0}),
    # conversations of up to 8 turns (every question of the image and its caption): 7x the answers per image
    # forward. Objects labelled on the vision token of their box centre: VQA 0.961 against 0.840 with whole
    # boxes labelled. Two `restate` turns: the condition of `left of` and `right of` prompts differs 2.6x
    # more (0.044 -> 0.116), so the DiT can place objects by the relation. Two `plan` turns open the
    # conversation: the token the queries follow learns which named shape goes where. 1000 steps (2.6 s a
    # step on 2 CPU threads) reach VQA 0.734 and keep the recipe within 90 minutes; 1800 reach 0.927
    TrainConfig(stage="understanding", steps=1000, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.998,
                stage_options={"max_turns": 8, "object_labels": 1.0, "object_labels_at": "centre", "restate": 2,
                               "plan": 2}),
    # tokens noised (std up to 0.3) so that the decoder draws clean shapes from the DiT's inexact tokens;
    # 600 steps (1.3 s a step): at 400 two_object falls from 0.90 to 0.75 and counting from 0.85 to 0.64
    TrainConfig(stage="decoder", steps=600, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.998,
                stage_options={"token_noise": 0.3}),
    # on shards of its own (NANO_GENERATION_DATA); the text is the prompt 9 times in 10, the caption otherwise.
    # 2650 steps (0.73 s a step) generate 0.903 with every tag >= 0.78 and the recipe takes 87.9 minutes;
    # binding colours and places to the named shapes is learned late: 2000 steps give 0.745 (color_attr 0.29,
    # position 0.53), 3000 give 0.940 but take the recipe past 90 minutes
    TrainConfig(stage="generation", steps=2650, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=0.998,
                stage_options={"prompt_share": 0.9}),
    EDIT_STAGE,
]
NANO_SAMPLES = 40_000  # Shapes scenes written for the first three stages
# The generation stage's shards (OUT/data_generation, 0.8 x the scenes of the others): every scene drawn for a
# GenEval prompt and laid out in its canonical cells without jitter, so that the text decides the layout and
# the DiT learns which named object goes where (it reads the order of the names only once the rest of its
# target is sharp); the families whose objects' places depend on their order are drawn more often.
NANO_GENERATION_DATA: dict = {"prompt_first": 1.0, "canonical": 1.0, "canonical_jitter": 0,
                              "tag_weights": {"position": 2.0, "color_attr": 2.0, "single_object": 0.5, "colors": 0.5}}
GENERATION_SHARE = 0.8


def ensure_shapes_data(data_dir: Path, num: int, seed: int, timings: dict | None = None, key: str = "data",
                       **options) -> Path:
    """Write the Shapes shards once (options: write_shards'); a folder that already has them is reused.
    The seconds spent writing go to timings[key]."""
    from blip3o.shapes import write_shards

    if not sorted(data_dir.glob("shapes-*.tar")):
        print(f"writing {num} Shapes scenes to {data_dir}", flush=True)
        started = time.perf_counter()
        write_shards(data_dir, num, seed, **options)
        if timings is not None:
            timings[key] = time.perf_counter() - started
    return data_dir


def ensure_edit_data(data_dir: Path, num: int, seed: int, timings: dict) -> Path:
    """Write the Shapes edit shards once (`blip3o.shapes.edits.write_edit_shards`); a folder that has them is
    reused. The seconds spent writing go to timings["data_edit"]."""
    from blip3o.shapes.edits import write_edit_shards

    if not sorted(data_dir.glob("edits-*.tar")):
        print(f"writing {num} Shapes edits to {data_dir}", flush=True)
        started = time.perf_counter()
        write_edit_shards(data_dir, num, seed)
        timings["data_edit"] = time.perf_counter() - started
    return data_dir


def train_nano(out: str | Path, *, data: str | Path | None = None, num_samples: int = NANO_SAMPLES, seed: int = 0,
               device: str = "auto", scale: float = 1.0, stages: list[str] | None = None,
               steps: dict[str, int] | None = None) -> Path:
    """Run the recipe; returns OUT/model. `scale` multiplies every stage's steps (for quick runs).

    `stages` runs only those, each from the model of the stage before it (which must exist): a recipe
    can run in parts. `steps` sets a stage's steps outright ({"understanding": 2000}: not scaled), e.g.
    to trade the 90-minute budget for a longer stage. OUT/model is written once the last stage (edit) has
    run; timings.json keeps the times of every stage run so far.
    """
    steps = check_recipe_arguments(stages, steps)
    out = Path(out)
    timings: dict[str, float] = {}  # seconds of what this call did: writing shards, training stages
    data_dir, dataset = Path(data) if data else out / "data", None
    if stages is None or set(stages) - {"generation", "edit"}:  # a stage that reads the recipe's scenes runs
        data_dir = ensure_shapes_data(data_dir, num_samples, seed, timings)
        dataset = ShardDataset(data_dir, seed=seed)
        print(f"data: {dataset.describe()}", flush=True)
    init, last_run = "random:nano", None
    for base in NANO_STAGES:
        stage_data, stage_dataset = [data_dir], dataset
        if base.stage in ("generation", "edit") and (stages is None or base.stage in stages):
            generation = ensure_shapes_data(out / "data_generation", max(1, round(num_samples * GENERATION_SHARE)),
                                            seed + 1, timings, "data_generation", **NANO_GENERATION_DATA)
            stage_data, stage_dataset = [generation], ShardDataset(generation, seed=seed)
            if base.stage == "edit":
                edits = ensure_edit_data(out / "data_edit", max(1, round(num_samples * EDIT_SHARE)), seed + 2, timings)
                stage_data = [edits, generation]
                stage_dataset = Mixture([(EditShardDataset(edits, seed=seed), EDIT_MIXTURE["edits"]),
                                         (stage_dataset, EDIT_MIXTURE["generation"])], seed=seed)
            print(f"{base.stage} data: {stage_dataset.describe()}", flush=True)
        cfg = dataclasses.replace(base, init=init, out_dir=str(out / base.stage), data=[str(d) for d in stage_data],
                                  seed=seed, device=device,
                                  steps=steps.get(base.stage, max(1, round(base.steps * scale))))
        if stages is None or cfg.stage in stages:
            started = time.perf_counter()
            trainer = Trainer(cfg, stage_dataset)
            last_run = trainer.fit()
            # a stage resumed from its checkpoint counts the loop time its earlier runs recorded there
            timings[cfg.stage] = time.perf_counter() - started + trainer.resumed_seconds
            record_timings(out, timings)  # after every stage: a run stopped later keeps what it did
        init = str(out / cfg.stage / "model")
    record_timings(out, timings)
    if not (Path(init) / "config.json").exists():  # the last stage has not run yet: no nano model
        print(f"stages {', '.join(timings)} done; run the later ones to get {out / 'model'}", flush=True)
        return Path(last_run) if last_run is not None else out
    final = out / "model"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(init, final)
    return final


def check_recipe_arguments(stages: list[str] | None, steps: dict[str, int] | None) -> dict[str, int]:
    """Refuse, before any work, a stage the recipe does not have and a step count that is not a positive
    integer; returns the steps set outright."""
    names = [s.stage for s in NANO_STAGES]
    for name in stages or []:
        if name not in names:
            raise ValueError(f"unknown stage {name!r} in stages; the recipe's stages: {', '.join(names)}")
    steps = dict(steps or {})
    for name, n in steps.items():
        if name not in names:
            raise ValueError(f"unknown stage {name!r} in steps; the recipe's stages: {', '.join(names)}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"steps of stage {name!r} must be a positive integer, got {n!r}")
    return steps


def record_timings(out: Path, timings: dict[str, float]) -> None:
    """OUT/timings.json: these seconds joined to those recorded by earlier calls (a recipe run in parts)."""
    record = out / "timings.json"
    earlier = json.loads(record.read_text()) if record.exists() else {}
    parts = {s.stage for s in NANO_STAGES} | {"data", "data_generation", "data_edit"}
    seconds = {k: v for k, v in earlier.items() if k in parts} | timings
    tmp = record.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**seconds, "total_s": sum(seconds.values()), "threads": torch.get_num_threads()},
                              indent=2))
    tmp.replace(record)  # atomic: never a half-written record
