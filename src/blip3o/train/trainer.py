"""One trainer for every stage: AdamW, warm-up + cosine, clipping, gradient accumulation, EMA, fp32 master
weights, exact resume, torchrun (one GPU per process; DDP over the trained parameters, or FSDP2 sharding them:
blip3o.train.parallel).

Determinism is by construction: global item i of the run is `dataset[i]` and every random draw made
for it comes from a generator keyed by (seed, i, stream) (blip3o.train.streams). So the same global
batch gives the same update on 1 or N processes, and a resumed run replays exactly what an
uninterrupted one would have done. Streamed data (no in-memory dataset: config.data read through
`blip3o.data`) keeps the keyed draws and the exact resume (each process's stream position is in the
checkpoint); which sample is item i there depends on the number of processes and loader workers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from blip3o import checkpoints
from blip3o.allocator import keep_freed_memory
from blip3o.checkpoints import resumable
from blip3o.checkpoints.limits import TRAIN_BOUNDS, check_fields, field_values
from blip3o.distributed import World, all_gather, all_mean, barrier, init_world, local_device
from blip3o.files import write_text
from blip3o.model import Blip3o
from blip3o.train.data import StreamedItems, default_workers
from blip3o.train.logs import METRICS_NAME, TrainLog, summed
from blip3o.train.parallel import (
    PARALLELS,
    TrainedParams,
    average_replicated_grads,
    clip_grad_norm,
    foreach_lerp_,
    full_tensor,
    optimizer_groups,
    parallelize,
)
from blip3o.train.stages import STAGES, Stage

STATE_NAME = "trainer_state.pt"
# fields that may change between a run and its resume without changing what is computed
RESUMABLE_CHANGES = {"steps", "log_every", "checkpoint_every", "progress", "tensorboard", "activation_checkpointing"}
PRECISIONS = ("auto", "fp32", "bf16")  # TrainConfig.precision
# TrainConfig.export_dtype -> the dtype of the exported weights; None: each parameter's dtype at init
EXPORT_DTYPES = {"same": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STATE_KEYS = ("step", "seconds", "params", "ema", "optimizer", "scheduler", "rng", "identity")  # of trainer_state.pt
# of an fsdp run's trainer_state.pt: its parameters, AdamW state and EMA are in the checkpoint's shards/
SHARDED_STATE_KEYS = ("step", "seconds", "scheduler", "rng", "identity")


@dataclass
class TrainConfig:
    """One stage's run: what it starts from, its data, its optimiser and its stage options. Every field is
    checked on construction, its type and bounds (`blip3o.checkpoints.limits.TRAIN_BOUNDS`), the stage name and
    its options too (ValueError naming the field or option)."""

    stage: str  # clip | understanding | decoder | generation
    # what the stage starts from: "random:PRESET" (the preset's architecture, fresh random weights), "PRESET"
    # (the trained weights the package ships for it, as Blip3o.from_preset) or a model folder
    init: str = "random:nano"
    # the generation stage started from a stock Qwen2.5-VL folder (init): where its fresh queries and DiT take
    # their size and its CLIP encoder and decoder come from. A BLIP3-o model folder (its encoder and decoder
    # weights: the CLIP-target caches made with it train the model) or a preset (random encoder and decoder, no
    # target to train on); empty: the BLIP3-o preset of the Qwen2.5-VL's size (7B: blip3o-8b, 3B: blip3o-4b)
    generation_from: str = ""
    out_dir: str = "runs/stage"  # gets checkpoint/ (resumable state) and model/ (the trained Blip3o)
    # data spec entries (blip3o.data.spec: shards, JSONL, image folders, LLaVA, each with an optional ::WEIGHT),
    # streamed when the Trainer is given no in-memory dataset
    data: list[str] = field(default_factory=list)
    steps: int = 1000  # optimiser steps
    batch_size: int = 32  # global batch of an optimiser step (split evenly over torchrun ranks)
    grad_accum: int = 1  # micro-batches each rank splits its share of a step into (gradients summed over them)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0 disables EMA; the exported model carries the EMA weights (decay warmed up)
    precision: str = "auto"  # auto (bf16 autocast on CUDA with bf16, else fp32) | fp32 | bf16
    # the dtype out_dir/model is written in: same (each parameter's dtype at init) | fp32 | bf16 | fp16.
    # Training itself keeps the trained parameters, AdamW state and EMA in fp32 whatever the init's dtype
    export_dtype: str = "same"
    seed: int = 0
    num_workers: int | None = None  # loader workers per rank for streamed data; None: 2 on CUDA, 0 on a CPU
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    checkpoint_every: int = 200
    progress: bool = True
    # the log figures also go to out_dir/tensorboard as TensorBoard scalars (when the tensorboard package is
    # importable); metrics.jsonl is written either way
    tensorboard: bool = True
    stage_options: dict = field(default_factory=dict)  # the stage's options (blip3o.train.stages)
    # ddp (every process holds the trained parts whole) | fsdp (FSDP2 shards them, their AdamW state and EMA over
    # the processes; its checkpoints resume at any number of processes): blip3o.train.parallel
    parallel: str = "ddp"
    # recompute each repeated block's activations in backward: less memory, about one more forward pass a step
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_fields(type(self), field_values(self), bounds=TRAIN_BOUNDS, error=ValueError)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"export_dtype {self.export_dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
        if self.parallel not in PARALLELS:
            raise ValueError(f"parallel {self.parallel!r} is not one of {', '.join(PARALLELS)}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device {self.device!r} is not auto or a torch device (cpu, cuda, cuda:1)") from None
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; stages: {', '.join(STAGES)}")
        STAGES[self.stage].parse_options(self.stage_options)  # refuses unknown options and bad values

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        """A config from a JSON file; unknown fields, stages and stage options are refused naming the file."""
        try:
            raw = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a train config is a JSON object of fields, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"{path}: unknown train config fields {unknown}; known: {sorted(names)}")
        if "betas" in raw:
            raw["betas"] = tuple(raw["betas"])
        try:
            return cls(**raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


class StageLoss(torch.nn.Module):
    """A stage's loss as a module whose parameters are the trained ones, for DDP to wrap: the model's frozen
    parts stay outside it."""

    def __init__(self, stage: Stage, params: list[torch.nn.Parameter]) -> None:
        super().__init__()
        self.stage = stage
        self.trained = torch.nn.ParameterList(params)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.stage.loss(batch)


def ema_decay(decay: float, step: int) -> float:
    """EMA decay at `step` (0-based), warmed up as min(decay, (1 + step) / (10 + step)).

    A constant decay keeps decay^steps of the initial weights in the average: 28% after 640 steps at
    0.998 (a 640-step DiT exported from such an average drew nearly one layout for every prompt:
    diversity 0.15), 9% after nano's 1200 decoder steps. The warm-up lets the average follow the weights early.
    """
    return min(decay, (1 + step) / (10 + step))


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_device(name: str, world: World | None = None) -> torch.device:
    """TrainConfig.device for this process: under torchrun "auto" and "cuda" are cuda:LOCAL_RANK."""
    return local_device(name, world or World())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if bf16_ok else None


def fp32_master_weights(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """`params`, each cast to float32 in place: a model loaded in bf16 or fp16 trains (and keeps AdamW state and
    EMA) in fp32, so that updates smaller than a half-precision step are not rounded away. Frozen parts keep
    their dtype; autocast runs the matmuls in bf16 where precision asks it."""
    with torch.no_grad():
        for p in params:
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
    return params


def load_init(init: str, device: torch.device, *, stage: str = "", generation_from: str = "") -> Blip3o:
    """The model a stage starts from (TrainConfig.init): "random:PRESET", a model folder, or a preset's shipped
    weights; for the generation stage a stock Qwen2.5-VL folder with the parts `generation_from` gives
    (`blip3o.checkpoints.stock_start`). A value that names nothing is refused."""
    from blip3o.checkpoints.stock_start import is_stock_folder, stock_generation_start
    from blip3o.presets import PRESETS, preset_weights

    if stage == "generation" and is_stock_folder(init):
        return stock_generation_start(init, generation_from).to(device)
    if generation_from:
        raise ValueError(f"generation_from {generation_from!r} applies to the generation stage started from a stock "
                         f"Qwen2.5-VL folder; init {init!r} of the {stage or 'given'} stage is not one")
    if init.startswith("random:") and init.removeprefix("random:") in PRESETS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random weights on every process
            return Blip3o.from_preset(init.removeprefix("random:"), device=device, pretrained=False)
    if Path(init).is_dir():  # a folder first, as --model reads it: `blip3o convert ... blip3o-8b` names one
        return Blip3o.from_pretrained(init, device=device)
    if init in PRESETS:
        if preset_weights(init) is None:
            raise ValueError(f"init {init!r}: the package ships no trained weights for preset {init!r}; "
                             f"use 'random:{init}' to start from random weights")
        return Blip3o.from_preset(init, device=device)
    raise ValueError(f"init {init!r} is neither a model folder nor a preset: use a folder written by "
                     f"save_pretrained, 'random:PRESET' or 'PRESET' (shipped weights); presets: {', '.join(PRESETS)}")


def global_rng_state() -> dict:
    """The global torch, Python and NumPy generators' states as tensors, numbers and strings only: what
    `torch.load(weights_only=True)` reads back."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def set_global_rng_state(state: dict) -> None:
    """Inverse of `global_rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def load_state(path: Path, keys: tuple[str, ...] = STATE_KEYS) -> dict:
    """A trainer_state.pt, read with weights_only=True: tensors, numbers, strings, lists and dicts only, so a
    crafted file cannot run code; one that is not a regular file, holds anything else or lacks one of `keys`
    is refused with a checkpoints.CheckpointError."""
    checkpoints.regular_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise checkpoints.CheckpointError(
            f"refusing to load {path}: it holds objects a trainer checkpoint never holds (only tensors, numbers, "
            f"strings, lists and dicts are read): {checkpoints.unpickling_reason(e)}. Delete it or use another "
            "out_dir") from None
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise checkpoints.CheckpointError(f"{path} is not a trainer checkpoint: it lacks {', '.join(missing)}. "
                                          "Delete it or use another out_dir")
    return state


def keep_metrics_to(path: Path, step: int) -> None:
    """Drop the lines of metrics.jsonl past `step` (and a line a crash cut): the file then tells the run a resume
    from `step` continues."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_text(path, "".join(f"{line}\n" for line in kept))


def config_changes(mine: dict, theirs: dict) -> list[str]:
    """What differs between this run's identity (`Trainer._comparable`) and a checkpoint's, one "part.field:
    checkpoint X vs now Y" each. A train field the checkpoint lacks (one its writer's TrainConfig did not have)
    differs only where this run sets it away from its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    diff = []
    for part in mine:
        ours, saved = mine[part], theirs.get(part, {})
        for k in sorted(set(ours) | set(saved)):
            if part == "train" and k not in saved and k in defaults and ours[k] == defaults[k]:
                continue
            if ours.get(k) != saved.get(k):
                diff.append(f"{part}.{k}: checkpoint {saved.get(k)!r} vs now {ours.get(k)!r}")
    return diff


class Trainer:
    """Runs one stage: `fit()` trains to config.steps (resuming out_dir/checkpoint when it exists) and writes
    out_dir/model. `dataset[i]` gives global item i ({"image": PIL, "json": dict}); with no dataset, each rank
    streams its items from config.data (`blip3o.train.data.StreamedItems`)."""

    def __init__(self, config: TrainConfig, dataset=None, *, model: Blip3o | None = None,
                 world: World | None = None):
        self.config = config
        self.world = world or init_world(resolve_device(config.device))
        self.device = resolve_device(config.device, self.world)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL and the default CUDA stream of this rank use its own GPU
        else:
            keep_freed_memory()  # the same activations every step: reuse their memory, no fresh pages
        if config.batch_size % (self.world.size * config.grad_accum):
            raise ValueError(f"batch_size {config.batch_size} does not split over {self.world.size} processes "
                             f"x grad_accum {config.grad_accum} micro-batches")
        self.dataset = dataset
        self.stream = self._stream() if dataset is None else None
        self.model = model if model is not None else load_init(config.init, self.device, stage=config.stage,
                                                               generation_from=config.generation_from)
        self.stage: Stage = STAGES[config.stage](self.model, config.stage_options)
        self.named_params = self.stage.trainable(self.model)
        self.init_dtypes = {n: p.dtype for n, p in self.named_params}  # what export_dtype "same" writes
        fp32_master_weights([p for _, p in self.named_params])
        self.sharded = parallelize(self.model, self.stage, self.world, config.parallel, config.activation_checkpointing)
        live = dict(self.model.named_parameters())  # FSDP puts new (DTensor) parameters in place of those it shards
        self.named_params = [(n, live.get(n, p)) for n, p in self.named_params]
        self.params = [p for _, p in self.named_params]
        self.ddp = self._data_parallel() if config.parallel == "ddp" else None
        self.state_holder = TrainedParams(self.named_params)  # the keys of an fsdp checkpoint's shards
        # foreach: one call per op over all tensors (torch picks it on CUDA only; on a CPU the per-tensor loop
        # costs 13 to 21 ms of a step); the same update up to rounding
        groups = optimizer_groups(self.named_params, self.model, self.stage, config.parallel)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay, foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.warmup_steps, config.steps, config.min_lr_ratio))
        self.ema = {n: p.detach().clone() for n, p in self.named_params} if config.ema_decay > 0 else None
        self.step = 0
        self.seconds = 0.0  # wall time spent in the training loop, over every run of it (resumes included)
        self.resumed_seconds = 0.0  # the part of it that earlier runs spent (from the checkpoint)
        self.out = Path(config.out_dir)
        self.logs: TrainLog | None = None  # rank 0's metrics.jsonl and TensorBoard writer, from `fit` on

    def _stream(self) -> StreamedItems:
        """This rank's stream of config.data, a micro-batch at a time (the spec is checked here, before the
        model loads)."""
        if not self.config.data:
            raise ValueError("TrainConfig.data names no data: give data spec entries (shards, JSONL, folders, "
                             "LLaVA) or pass the Trainer a dataset")
        workers = self.config.num_workers
        return StreamedItems(self.config.data, seed=self.config.seed, world=self.world,
                             batch_size=self.config.batch_size // self.world.size // self.config.grad_accum,
                             num_workers=default_workers(self.device) if workers is None else workers)

    def _data_parallel(self) -> DistributedDataParallel | None:
        """DDP over the trained parameters (None for one process): it averages their gradients over ranks
        during backward. Frozen parts are not DDP's: nothing of them is broadcast or reduced."""
        if self.world.size == 1:
            return None
        # some trained parameters take no part in a step (self-conditioning off for a whole batch, a dropped
        # auxiliary): DDP finds them in the graph and marks them ready
        return DistributedDataParallel(StageLoss(self.stage, self.params), broadcast_buffers=False,
                                       find_unused_parameters=True)

    # ------------------------------------------------------------------ state

    def describe(self) -> str:
        trained = sum(p.numel() for p in self.params)
        frozen = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
        parts = ", ".join(self.stage.trains)
        return (f"stage {self.config.stage}: trains {trained:,} parameters ({parts}); "
                f"{frozen:,} frozen; {self.world.size} process(es) on {self.device} ({self.config.parallel})")

    def _comparable(self) -> dict:
        cfg = {k: v for k, v in dataclasses.asdict(self.config).items() if k not in RESUMABLE_CHANGES}
        cfg["betas"] = list(cfg["betas"])
        return {"train": cfg, "model": json.loads(json.dumps(self.model.config.to_dict()))}

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "seconds": self.seconds,
            "params": {n: p.detach().cpu().clone() for n, p in self.named_params},
            "ema": None if self.ema is None else {n: t.cpu().clone() for n, t in self.ema.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": global_rng_state(),
            "identity": self._comparable(),
        }

    def sharded_state(self) -> dict:
        """An fsdp run's parameters, AdamW state and EMA, as tensors each rank holds its shards of (whole ones
        on one process): what checkpoint/shards/ holds."""
        params, optimizer = get_state_dict(self.state_holder, self.optimizer)
        ema = {} if self.ema is None else {n.replace(".", "/"): t for n, t in self.ema.items()}
        return {"params": params, "optimizer": optimizer, "ema": ema}

    def save_checkpoint(self) -> None:
        """Rank 0 writes checkpoint/ (`blip3o.checkpoints.resumable`: a crash at any moment leaves a complete
        one) with every rank's data position; the others wait, so all resume from the same step. Under fsdp
        every rank first writes its shards of the parameters, AdamW state and EMA into it."""
        data = all_gather(self.stream.state_dict(), self.world) if self.stream is not None else None
        if self.config.parallel == "fsdp":
            self._save_sharded(data)
            return
        if self.world.is_main:
            state = {**self.state_dict(), "data": data}
            resumable.save(self.out, self.step, lambda tmp: torch.save(state, tmp / STATE_NAME))
        barrier(self.world)

    def _save_sharded(self, data: list | None) -> None:
        """An fsdp run's checkpoint: every rank's shards in shards/, rank 0's trainer_state.pt beside them."""
        rest = {"step": self.step, "seconds": self.seconds, "scheduler": self.scheduler.state_dict(),
                "rng": global_rng_state(), "identity": self._comparable(), "data": data}

        def fill(tmp: Path) -> None:
            resumable.save_shards(self.sharded_state(), tmp / resumable.SHARDS)
            if self.world.is_main:
                torch.save(rest, tmp / STATE_NAME)

        resumable.save_shared(self.out, self.step, fill, self.world)

    def resume(self) -> bool:
        """Continue from out_dir/checkpoint if there is one, after rank 0 recovered the newest complete checkpoint
        an interrupted save left (saying so); refuse one written for another config."""
        if self.world.is_main:
            for note in resumable.recover(self.out):
                print(note, flush=True)
        barrier(self.world)
        folder = self.out / resumable.NAME
        if not os.path.lexists(folder):
            return False
        path = folder / STATE_NAME
        state = load_state(path, SHARDED_STATE_KEYS if self.config.parallel == "fsdp" else STATE_KEYS)
        diff = config_changes(self._comparable(), state["identity"])
        if diff:
            raise checkpoints.CheckpointError(f"refusing to resume {path}: it was written for a different config "
                                              f"({'; '.join(diff)}); use another out_dir or restore the config")
        if self.config.parallel == "fsdp":
            self._load_shards(folder / resumable.SHARDS)
        else:
            self._load_whole(state)
        self.scheduler.load_state_dict(state["scheduler"])
        set_global_rng_state(state["rng"])
        self.step = state["step"]
        self.seconds = self.resumed_seconds = float(state["seconds"])
        self._resume_data(state.get("data"), path)
        if self.world.is_main:
            keep_metrics_to(self.out / METRICS_NAME, self.step)
        return True

    def _load_whole(self, state: dict) -> None:
        """Parameters, EMA and AdamW state from a trainer_state.pt."""
        with torch.no_grad():
            for n, p in self.named_params:
                p.copy_(state["params"][n])
        if self.ema is not None:
            self.ema = {n: t.to(self.device) for n, t in state["ema"].items()}
        self.optimizer.load_state_dict(state["optimizer"])

    def _load_shards(self, folder: Path) -> None:
        """Parameters, EMA and AdamW state from checkpoint/shards/, resharded to this run's processes."""
        state = self.sharded_state()
        resumable.load_shards(state, folder)
        set_state_dict(self.state_holder, self.optimizer, model_state_dict=state["params"],
                       optim_state_dict=state["optimizer"])
        if self.ema is not None:
            with torch.no_grad():
                for n, t in self.ema.items():
                    t.copy_(state["ema"][n.replace(".", "/")])

    def _resume_data(self, data: list | None, path: Path) -> None:
        """Put this rank's stream where the checkpoint left it."""
        if self.stream is None:
            return
        if data is None or len(data) != self.world.size:
            saved = "no data position" if data is None else f"the data positions of {len(data)} processes"
            raise checkpoints.CheckpointError(f"refusing to resume {path}: it holds {saved}, and this run streams "
                                              f"its data on {self.world.size}; resume with the same processes")
        try:
            self.stream.load_state_dict(data[self.world.rank])
        except ValueError as e:
            raise checkpoints.CheckpointError(f"refusing to resume {path}: {e}") from None

    # ------------------------------------------------------------------ the loop

    def local_indices(self, step: int, micro: int = 0) -> list[int]:
        """Global item indices of micro-batch `micro` of this process's share of the global batch at `step`."""
        per_rank = self.config.batch_size // self.world.size
        per_micro = per_rank // self.config.grad_accum
        start = step * self.config.batch_size + self.world.rank * per_rank + micro * per_micro
        return list(range(start, start + per_micro))

    def local_items(self, indices: list[int]) -> list[dict]:
        """The items of a micro-batch: dataset[i] for each global index, or the stream's next micro-batch."""
        if self.stream is not None:
            return self.stream.next_batch()
        return [self.dataset[i] for i in indices]

    def micro_loss(self, micro: int) -> float:
        """Forward and backward of one micro-batch of this step; its gradients add to those of the others."""
        indices = self.local_indices(self.step, micro)
        batch = self.stage.collate(self.local_items(indices), indices, self.config.seed, self.device)
        dtype = autocast_dtype(self.config.precision, self.device)
        last = micro == self.config.grad_accum - 1
        for part in self.sharded:  # FSDP reduce-scatters on the last one
            part.set_requires_gradient_sync(last)
        with nullcontext() if last or self.ddp is None else self.ddp.no_sync():  # DDP reduces on the last one
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = self.ddp(batch) if self.ddp is not None else self.stage.loss(batch)
            (loss / self.config.grad_accum).backward()
        return loss.item()

    def train_step(self) -> float:
        """One optimiser step over grad_accum micro-batches; returns this process's mean loss."""
        loss = sum(self.micro_loss(micro) for micro in range(self.config.grad_accum)) / self.config.grad_accum
        if self.config.parallel == "fsdp":
            average_replicated_grads(self.params, self.world)
            clip_grad_norm(self.params, self.config.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            decay = ema_decay(self.config.ema_decay, self.step)
            with torch.no_grad():
                foreach_lerp_([self.ema[n] for n, _ in self.named_params],
                              [p.detach() for _, p in self.named_params], 1 - decay)
        self.step += 1
        return loss

    def fit(self) -> Path:
        """Train to config.steps (resuming if possible), then export the model; returns its folder."""
        resumed = self.resume()
        if self.world.is_main:
            print(self.describe() + (f"; resumed at step {self.step}" if resumed else ""), flush=True)
            self.logs = TrainLog(self.out, tensorboard=self.config.tensorboard, resumed_at=self.step)
        show = self.config.progress and self.world.is_main
        bar = tqdm(total=self.config.steps, initial=self.step, disable=not show, desc=self.config.stage,
                   dynamic_ncols=True)
        started, done_at_start = time.perf_counter(), self.step
        while self.step < self.config.steps:
            loss = self.train_step()
            self.seconds = self.resumed_seconds + time.perf_counter() - started
            bar.update(1)
            if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                rate = (self.step - done_at_start) * self.config.batch_size / (time.perf_counter() - started)
                self.log(bar, all_mean(loss, self.world), rate)
            if self.step % self.config.checkpoint_every == 0 and self.step < self.config.steps:
                self.save_checkpoint()
        bar.close()
        if self.logs is not None:
            self.logs.close()
        self.save_checkpoint()
        return self.export()

    def skipped(self) -> dict[str, int]:
        """Samples the stream skipped so far, by reason, over every rank (empty for an in-memory dataset)."""
        return {} if self.stream is None else summed(self.stream.stats.bad, self.world)

    def log(self, bar: tqdm, loss: float, rate: float) -> None:
        """One log step: the progress bar's figures, and a line of out_dir/metrics.jsonl and TensorBoard's
        scalars (rank 0). `counts`: what the stage counted so far over every rank (understanding: conversations
        cut or skipped by max_length)."""
        skipped, counts, lr = self.skipped(), summed(self.stage.counts, self.world), self.scheduler.get_last_lr()[0]
        if not self.world.is_main:
            return
        bar.set_postfix(loss=f"{loss:.4f}", items_s=f"{rate:.1f}", lr=f"{lr:.2e}", skipped=sum(skipped.values()),
                        **counts)
        self.logs.write({"step": self.step, "loss": loss, "lr": lr, "samples_per_s": rate, "skipped": skipped,
                         "counts": counts})
        if not self.config.progress:
            reasons = ", ".join(f"{r} {n}" for r, n in skipped.items()) or "none"
            counted = "; " + ", ".join(f"{name} {n}" for name, n in counts.items()) if counts else ""
            print(f"step {self.step}/{self.config.steps}: loss {loss:.4f}, lr {lr:.2e}, {rate:.1f} samples/s, "
                  f"skipped: {reasons}{counted}", flush=True)

    def export(self) -> Path:
        """Write the trained Blip3o (EMA weights where kept) to out_dir/model."""
        target = self.out / "model"
        if self.sharded:
            self._export_gathered(target)
        elif self.world.is_main:
            with torch.no_grad(), self.exported_weights():
                self.stage.before_export()  # LoRA adapters, say, merge into the weights
                self.model.save_pretrained(target)
        barrier(self.world)
        return target

    def _export_gathered(self, target: Path) -> None:
        """export of an fsdp run: every rank gathers each sharded weight whole (EMA where kept, in
        export_dtype), rank 0 writes them."""
        dtype, trained = EXPORT_DTYPES[self.config.export_dtype], dict(self.named_params)
        weights = {}
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                source = self.ema[name] if self.ema is not None and name in trained else p.detach()
                weights[name] = full_tensor(source).to(dtype or self.init_dtypes.get(name, p.dtype))
        if not self.world.is_main:
            return
        hook = self.model.register_state_dict_post_hook(lambda module, state, prefix, meta: state.update(weights))
        try:
            self.model.save_pretrained(target)
        finally:
            hook.remove()

    @contextmanager
    def exported_weights(self) -> Iterator[None]:
        """Inside: the parameters hold what export writes (EMA weights where kept, in export_dtype); after: each
        parameter holds its live tensor again."""
        dtype, trained = EXPORT_DTYPES[self.config.export_dtype], dict(self.named_params)
        live = []
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                source = self.ema[name] if self.ema is not None and name in trained else p.data
                live.append((p, p.data))
                p.data = source.to(dtype or self.init_dtypes.get(name, p.dtype))
        try:
            yield
        finally:
            for p, tensor in live:
                p.data = tensor
