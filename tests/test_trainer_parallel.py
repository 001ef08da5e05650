"""Parallel training on CPU processes (gloo): FSDP2 over 2 processes takes the steps of 1 process over the same
global batch, its sharded checkpoint resumes at 1 and at 2 processes, a crafted checkpoint's metadata runs
nothing, and activation checkpointing changes neither loss nor gradients."""

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip3o import Blip3o
from blip3o.checkpoints import CheckpointError, resumable
from blip3o.train import TrainConfig, Trainer
from train_helpers import tiny_dataset

DATA = tiny_dataset()
HERE = Path(__file__).parent


def config(tmp_path: Path, name: str, **kw) -> TrainConfig:
    # a constant learning rate after warm-up (min_lr_ratio 1): a run stopped at step 2 and resumed with more
    # steps follows the schedule of one run straight through
    base = dict(stage="generation", init="random:debug", out_dir=str(tmp_path / name), steps=4, batch_size=4,
                lr=1e-3, warmup_steps=2, min_lr_ratio=1.0, checkpoint_every=2, progress=False, device="cpu",
                ema_decay=0.9, parallel="fsdp")
    return TrainConfig(**{**base, **kw})


def torchrun(cfg: TrainConfig, nproc: int) -> Blip3o:
    """Train `cfg` under torchrun with `nproc` processes; the exported model."""
    path = Path(cfg.out_dir).with_suffix(".json")
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29600 + nproc + os.getpid() % 1000), str(HERE / "train_helpers.py"), str(path)]
    done = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return Blip3o.from_pretrained(Path(cfg.out_dir) / "model")


def weights(model: Blip3o) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k == "queries" or k.startswith("dit.")}


def assert_same_weights(a: Blip3o, b: Blip3o) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4, msg=k)


def test_fsdp_on_two_processes_matches_one_and_its_checkpoint_resumes_at_one_and_at_two(tmp_path):
    one = Trainer(config(tmp_path, "one", parallel="ddp"), DATA)
    one.fit()
    straight = Blip3o.from_pretrained(tmp_path / "one" / "model")
    assert_same_weights(torchrun(config(tmp_path, "two"), 2), straight)
    # stopped at step 2, its checkpoint sharded over 2 processes ...
    torchrun(config(tmp_path, "half", steps=2), 2)
    shards = tmp_path / "half" / "checkpoint" / resumable.SHARDS
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    shutil.copytree(tmp_path / "half", tmp_path / "saved")
    # ... resumed at 1 process and at 2, to the uninterrupted run's weights (and EMA: the exported ones)
    resumed = Trainer(config(tmp_path, "half"), DATA)
    resumed.fit()
    assert resumed.step == 4
    assert_same_weights(Blip3o.from_pretrained(tmp_path / "half" / "model"), straight)
    shutil.rmtree(tmp_path / "half")
    (tmp_path / "saved").rename(tmp_path / "half")
    assert_same_weights(torchrun(config(tmp_path, "half", steps=4), 2), straight)


def test_fsdp_accumulates_micro_batches_and_exports_in_the_dtype_asked(tmp_path):
    """2 processes x 2 micro-batches under fsdp take the steps of 1 process on the whole batch; the gathered
    export is written in bf16."""
    Trainer(config(tmp_path, "one", parallel="ddp", export_dtype="bf16"), DATA).fit()
    one = Blip3o.from_pretrained(tmp_path / "one" / "model")
    two = torchrun(config(tmp_path, "two", grad_accum=2, export_dtype="bf16"), 2)
    wa, wb = weights(two), weights(one)
    assert wa.keys() == wb.keys() and {t.dtype for t in wa.values()} == {torch.bfloat16}
    for k in wa:  # one bf16 step apart at most: both round the same fp32 weights up to float noise
        torch.testing.assert_close(wa[k].float(), wb[k].float(), atol=1e-5, rtol=8e-3, msg=k)


def test_fsdp_shards_the_backbone_the_understanding_stage_trains(tmp_path):
    """The understanding stage calls the backbone's body and its vocabulary projection apart: each is a unit."""
    one = Trainer(config(tmp_path, "one", stage="understanding", parallel="ddp", steps=2), DATA)
    before = {k: v.clone() for k, v in one.model.backbone.state_dict().items()}
    one.fit()
    two = torchrun(config(tmp_path, "two", stage="understanding", steps=2), 2)
    assert any(not torch.equal(before[k], v) for k, v in one.model.backbone.state_dict().items())
    mine = Blip3o.from_pretrained(tmp_path / "one" / "model").backbone.state_dict()  # EMA weights, as exported
    theirs = two.backbone.state_dict()
    for k in mine:
        torch.testing.assert_close(theirs[k], mine[k], atol=1e-5, rtol=1e-4, msg=k)


def test_activation_checkpointing_keeps_the_loss_and_gradients(tmp_path):
    results = []
    for checkpointing in (False, True):
        trainer = Trainer(config(tmp_path, str(checkpointing), activation_checkpointing=checkpointing), DATA)
        torch.manual_seed(0)
        loss = trainer.micro_loss(0)
        results.append((loss, {n: p.grad.clone() for n, p in trainer.named_params if p.grad is not None}))
    (plain_loss, plain), (loss, grads) = results
    assert loss == plain_loss
    assert plain.keys() == grads.keys() and any(n.startswith("dit.layers.") for n in grads)
    for n in plain:
        torch.testing.assert_close(grads[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)
    blocks = [m for m in Trainer(config(tmp_path, "x", activation_checkpointing=True), DATA).model.dit.layers]
    assert blocks and all(m._forward_pre_hooks for m in blocks)  # each block recomputes in backward


class Payload:
    """Pickles as a call that creates a file: what crafted metadata could run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_crafted_shard_metadata_is_refused_and_runs_nothing(tmp_path):
    cfg = config(tmp_path, "run", steps=2)
    Trainer(cfg, DATA).fit()
    metadata = tmp_path / "run" / "checkpoint" / resumable.SHARDS / ".metadata"
    assert resumable.read_metadata(metadata).state_dict_metadata  # the real one reads
    marker = tmp_path / "ran"
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))  # the payload is live: unpickled without restriction, it runs
    assert probe.exists()
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=f"refusing to load {metadata}: it holds objects checkpoint metadata"):
        Trainer(config(tmp_path, "run", steps=3), DATA).fit()
    assert not marker.exists()
    metadata.write_bytes(pickle.dumps({"state_dict_metadata": {}}))  # nothing to run, but not metadata either
    with pytest.raises(CheckpointError, match="it is not checkpoint metadata"):
        Trainer(config(tmp_path, "run", steps=3), DATA).fit()


def test_a_crafted_shard_entry_is_refused_and_runs_nothing(tmp_path):
    """Numbers and strings in the shards (the optimizer's hyper-parameters) are read as weights_only reads them."""
    marker, folder = tmp_path / "ran", tmp_path / "shards"
    resumable.save_shards({"lr": 0.5, "payload": Payload(marker)}, folder)
    state = {"lr": 0.0}
    resumable.load_shards(state, folder)
    assert state == {"lr": 0.5}
    with pytest.raises(CheckpointError, match=f"refusing to load {folder}: entry payload holds objects"):
        resumable.load_shards({"payload": None}, folder)
    assert not marker.exists()


def test_parallel_is_checked():
    with pytest.raises(ValueError, match="parallel 'zero3' is not one of ddp, fsdp"):
        TrainConfig(stage="generation", parallel="zero3")
