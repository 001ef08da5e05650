"""The trainer and the generic stages: frozen parts stay frozen, a killed run resumes exactly, 2 processes
match 1, a checkpoint is read without running code, each stage's loss is what it says."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blip3o import Blip3o
from blip3o.checkpoints import CheckpointError
from blip3o.flow import sample_path
from blip3o.train import TrainConfig, Trainer
from blip3o.train.stages import ClipStage, DecoderStage, GenerationStage, UnderstandingStage
from blip3o.train.trainer import ema_decay, load_init, lr_factor
from train_helpers import fit_until_killed, tiny_dataset

DATA = tiny_dataset()
CPU = torch.device("cpu")


def config(tmp_path, stage="generation", **kw) -> TrainConfig:
    base = dict(stage=stage, init="random:debug", out_dir=str(tmp_path / stage), steps=4, batch_size=4, lr=1e-3,
                warmup_steps=2, checkpoint_every=2, progress=False, device="cpu", ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


def states(model: Blip3o, part: str) -> dict:
    module = getattr(model, part)
    if isinstance(module, torch.nn.Parameter):
        return {"": module.detach().clone()}
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


PARTS = ("backbone", "queries", "dit", "clip_encoder", "decoder")


@pytest.mark.parametrize("stage, trained", [("generation", {"queries", "dit"}), ("decoder", {"decoder"}),
                                            ("understanding", {"backbone"})])
def test_stage_trains_only_its_parts(tmp_path, stage, trained, capsys):
    # adaLN-zero: the DiT's gates open one layer of zeros per step, so the queries move from step 5
    trainer = Trainer(config(tmp_path, stage, steps=6 if stage == "generation" else 2), DATA)
    before = {p: states(trainer.model, p) for p in PARTS}
    trainer.fit()
    for p in PARTS:
        assert changed(before[p], states(trainer.model, p)) == (p in trained), p
    n = sum(p.numel() for _, p in trainer.named_params)
    assert f"stage {stage}: trains {n:,} parameters" in capsys.readouterr().out
    exported = Blip3o.from_pretrained(tmp_path / stage / "model")
    assert exported.num_parameters() == trainer.model.num_parameters()


def test_init_names_random_or_shipped_weights_or_a_folder(tmp_path, monkeypatch):
    from blip3o.presets import preset_weights

    shipped = Blip3o.from_pretrained(preset_weights("nano"), dtype=torch.float32)
    random_a, random_b = load_init("random:nano", CPU), load_init("random:nano", CPU)
    assert torch.equal(random_a.queries, random_b.queries)  # the same random weights on every process
    assert not torch.equal(random_a.queries, shipped.queries)
    assert torch.equal(load_init("nano", CPU).queries, shipped.queries)
    random_a.save_pretrained(tmp_path / "model")
    assert torch.equal(load_init(str(tmp_path / "model"), CPU).queries, random_a.queries)
    with pytest.raises(ValueError, match="ships no trained weights for preset 'debug'; use 'random:debug'"):
        load_init("debug", CPU)
    monkeypatch.chdir(tmp_path)
    random_a.save_pretrained(tmp_path / "debug")  # a folder named as a preset: the folder, as --model reads it
    assert torch.equal(load_init("debug", CPU).queries, random_a.queries)
    for bad in ("random:nan", "nano-shipped", str(tmp_path / "missing")):
        with pytest.raises(ValueError, match=f"init '{bad}' is neither a model folder nor a preset"):
            load_init(bad, CPU)
    assert TrainConfig(stage="clip").init == "random:nano"


def test_understanding_freeze_language_trains_the_vision_tower_and_keeps_the_condition(tmp_path, capsys):
    trainer = Trainer(config(tmp_path, "understanding", steps=2, stage_options={"freeze_language": True}), DATA)
    model, prompts = trainer.model, ["a photo of a red circle", "two squares"]
    with torch.no_grad():
        cond = model.condition(prompts)
    named = dict(model.backbone.named_parameters())
    vision = {n for n in named if n.startswith("model.model.visual.")}
    assert vision and len(vision) < len(named)
    before = {n: p.detach().clone() for n, p in named.items()}
    trainer.fit()
    moved = {n for n, p in named.items() if not torch.equal(before[n], p.detach())}
    assert moved and moved <= vision  # the language model did not move; the vision tower did
    assert {n for n, _ in trainer.named_params} == {f"backbone.{n}" for n in vision}
    assert f"trains {sum(named[n].numel() for n in vision):,} parameters" in capsys.readouterr().out
    with torch.no_grad():
        assert torch.equal(model.condition(prompts), cond)
    with pytest.raises(ValueError, match="stage option freeze_language must be true or false, got 'yes'"):
        config(tmp_path, "understanding", stage_options={"freeze_language": "yes"})


def test_clip_stage_trains_the_encoder_against_its_text_tower(tmp_path):
    trainer = Trainer(config(tmp_path, "clip", init="random:nano", steps=2, ema_decay=0.0), DATA)
    stage = trainer.stage
    assert {n for n, _ in trainer.named_params} >= {"aux.text.proj.weight", "aux.logit_scale", "aux.logit_bias"}
    # the text tower starts from the same weights whatever the global random state
    torch.manual_seed(123)
    again = ClipStage(trainer.model, {})
    assert torch.equal(again.text.positions, stage.text.positions)
    batch = stage.collate(DATA[:4], [0, 1, 2, 3], 0, CPU)
    with torch.no_grad():  # SigLIP's loss, recomputed
        img = F.normalize(trainer.model.clip_encoder.embed(batch["pixels"]), dim=-1)
        txt = F.normalize(stage.text(batch["ids"], batch["mask"]), dim=-1)
        logits = img @ txt.T * stage.logit_scale.exp() + stage.logit_bias
        expected = -F.logsigmoid((2 * torch.eye(4) - 1) * logits).sum() / 4
        torch.testing.assert_close(stage.loss(batch), expected)
    before = states(trainer.model, "clip_encoder")
    trainer.fit()
    assert changed(before, states(trainer.model, "clip_encoder"))
    assert not changed(states(trainer.model, "dit"), states(Blip3o.from_pretrained(tmp_path / "clip" / "model"), "dit"))
    with pytest.raises(ValueError, match="EvaClipEncoder has none"):
        ClipStage(Blip3o.from_preset("debug"), {})  # an EVA encoder has no contrastive embedding of its own


def test_generation_loss_is_the_dit_loss_on_each_items_path():
    """Each item gets its own noise, time, condition drop and self-conditioning draw; the loss is the DiT's
    loss on the encoder's tokens with the (kept) condition."""
    torch.manual_seed(0)
    model = Blip3o.from_preset("debug")
    stage = GenerationStage(model, {})
    batch = stage.collate(DATA[:4], [5, 6, 7, 8], 0, CPU)
    c = model.config.dit
    assert batch["x_1"].shape == (4, c.num_tokens, c.in_channels) and batch["t"].shape == batch["keep"].shape == (4,)
    assert len(set(batch["t"].tolist())) == 4
    again = stage.collate(DATA[1:4], [6, 7, 8], 0, CPU)  # an item's draws do not depend on its batch
    assert torch.equal(again["x_1"], batch["x_1"][1:]) and torch.equal(again["t"], batch["t"][1:])
    with torch.no_grad():
        x_0 = model.clip_encoder.encode_images(batch["images"])
        cond = model.condition(batch["prompts"]) * batch["keep"].view(-1, 1, 1).float()
        expected = model.dit.loss(sample_path(x_0, batch["x_1"], batch["t"]), cond, batch["self_condition"])
        torch.testing.assert_close(stage.loss(dict(batch)), expected)
    items, idx = DATA[:4] * 25, list(range(100))
    dropped = ~GenerationStage(model, {"condition_drop": 0.5}).collate(items, idx, 0, CPU)["keep"]
    assert 30 <= int(dropped.sum()) <= 70
    assert not (~GenerationStage(model, {"condition_drop": 0.0}).collate(items, idx, 0, CPU)["keep"]).any()


def test_killed_run_resumes_to_identical_weights(tmp_path):
    straight = Trainer(config(tmp_path / "a", steps=6), DATA)
    straight.fit()

    cfg = config(tmp_path / "b", steps=6)
    fit_until_killed(Trainer(cfg, DATA), 4)
    resumed = Trainer(cfg, DATA)  # a fresh process: new model from the preset, state from checkpoint/
    resumed.fit()
    assert resumed.step == 6
    # the loop time of the killed run's first 4 steps (checkpointed at step 4) carries over
    assert 0 < resumed.resumed_seconds < resumed.seconds
    for (n, a), (_, b) in zip(straight.named_params, resumed.named_params, strict=True):
        assert torch.equal(a, b), n
    for n in straight.ema:
        assert torch.equal(straight.ema[n], resumed.ema[n]), n


def test_checkpoint_restores_the_global_random_states(tmp_path):
    import random

    import numpy as np

    trainer = Trainer(config(tmp_path, steps=1), DATA)
    trainer.fit()  # writes the checkpoint: the states as they are now
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.rand(5), random.random(), np.random.rand(7)  # the states move on
    assert Trainer(config(tmp_path, steps=1), DATA).resume()
    assert torch.equal(torch.get_rng_state(), saved[0]) and random.getstate() == saved[1]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), saved[2], strict=True))


class Payload:
    """Pickles as a call that creates a file: what a crafted checkpoint could run on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys):
    import pickle

    from blip3o.cli.entry import main as cli_main
    from blip3o.shapes import write_shards

    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Payload(probe)))  # the payload is live: unpickled without weights_only, it runs
    assert probe.exists()
    cfg = config(tmp_path, steps=2)
    state = tmp_path / "generation" / "checkpoint" / "trainer_state.pt"
    state.parent.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({"step": 1, "identity": Payload(marker)}, state)
    with pytest.raises(CheckpointError, match=f"refusing to load {state}: it holds objects"):
        Trainer(cfg, DATA).fit()
    assert not marker.exists()
    write_shards(tmp_path / "data", 4, seed=0, shard_size=4)
    (tmp_path / "gen.json").write_text(json.dumps({**dataclasses.asdict(cfg), "data": [str(tmp_path / "data")]}))
    assert cli_main(["train", "generation", "--config", str(tmp_path / "gen.json")]) == 2  # bad input, not a crash
    assert f"refusing to load {state}: it holds objects" in capsys.readouterr().err
    assert not marker.exists()
    torch.save({"step": 1}, state)  # nothing to run, but not a trainer checkpoint either
    with pytest.raises(CheckpointError, match=f"{state} is not a trainer checkpoint: it lacks seconds, params"):
        Trainer(cfg, DATA).fit()


def test_resume_with_another_config_is_refused(tmp_path):
    Trainer(config(tmp_path, steps=2), DATA).fit()
    with pytest.raises(CheckpointError, match="refusing to resume.*lr"):
        Trainer(config(tmp_path, steps=4, lr=5e-4), DATA).fit()
    Trainer(config(tmp_path, steps=3), DATA).fit()  # more steps of the same run is fine


def test_a_train_field_the_checkpoint_lacks_resumes_at_its_default_only():
    from blip3o.train.trainer import config_changes

    saved = {"train": {"lr": 3e-4}, "model": {"width": 8}}
    assert config_changes({"train": {"lr": 3e-4, "parallel": "ddp"}, "model": {"width": 8}}, saved) == []
    assert config_changes({"train": {"lr": 3e-4, "parallel": "fsdp"}, "model": {"width": 8}}, saved) == [
        "train.parallel: checkpoint None vs now 'fsdp'"]
    assert config_changes({"train": {"lr": 3e-4}, "model": {"width": 8, "depth": 2}}, saved) == [
        "model.depth: checkpoint None vs now 2"]


def test_config_files_are_checked_naming_the_file(tmp_path):
    path = tmp_path / "gen.json"
    for raw, match in [({"stage": "generation", "stage_options": {"draws": 4}},
                        "gen.json: stage option draws is not an option of the generation stage"),
                       ({"stage": "decoder", "stage_options": {"dit_steps": 0}},
                        "gen.json: stage option dit_steps must be an integer >= 1 and at most 10000, got 0"),
                       ({"stage": "decoder", "stage_options": {"dit_steps": 10**9}},
                        "gen.json: stage option dit_steps must be an integer >= 1 and at most 10000, got 1000000000"),
                       ({"stage": "clip", "steps": 1e9}, r"gen.json: steps is 1000000000.0; it must be an integer"),
                       ({"stage": "clip", "steps": 10**9}, "gen.json: steps is 1000000000; at most 100000000"),
                       ({"stage": "clip", "batch_size": "32"}, "gen.json: batch_size is '32'; it must be an integer"),
                       ({"stage": "clip", "batch_size": -4}, "gen.json: batch_size is -4; at least 1"),
                       ({"stage": "clip", "lr": float("nan")}, "gen.json: lr is nan; it must be a finite number"),
                       ({"stage": "clip", "betas": [0.9, 1.0]}, r"gen.json: betas\[1\] is 1.0; below 1"),
                       ({"stage": "clip", "precision": "fp16"}, "gen.json: precision 'fp16' is not one of auto"),
                       ({"stage": "clip", "device": "gpu:0"}, "gen.json: device 'gpu:0' is not auto or a torch"),
                       ({"stage": "vision"}, "gen.json: unknown stage 'vision'"),
                       ({"stage": "clip", "lr_max": 1}, r"gen.json: unknown train config fields \['lr_max'\]")]:
        path.write_text(json.dumps(raw))
        with pytest.raises(ValueError, match=match):
            TrainConfig.from_json(path)
    path.write_text('{"stage": "clip",\n "steps": }')
    with pytest.raises(ValueError, match="gen.json: not valid JSON \\(line 2"):
        TrainConfig.from_json(path)


def test_ema_is_warmed_up(tmp_path):
    assert ema_decay(0.998, 0) == pytest.approx(0.1)
    assert ema_decay(0.998, 90) == pytest.approx(0.91)
    assert ema_decay(0.998, 10_000) == 0.998
    trainer = Trainer(config(tmp_path, ema_decay=0.998), DATA)
    init = {n: p.detach().clone() for n, p in trainer.named_params}
    trainer.train_step()  # first step: the average is 0.1 init + 0.9 weights, not 0.998 init
    for n, p in trainer.named_params:
        torch.testing.assert_close(trainer.ema[n], 0.1 * init[n] + 0.9 * p.detach(), rtol=1e-5, atol=1e-6)


def test_lr_schedule():
    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.55)


def test_two_processes_match_one(tmp_path):
    one = config(tmp_path / "one", steps=3)
    two = dataclasses.replace(one, out_dir=str(tmp_path / "two"))
    results = []
    for cfg, nproc in ((one, 1), (two, 2)):
        path = tmp_path / f"{nproc}.json"
        path.write_text(json.dumps(dataclasses.asdict(cfg)))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + nproc + os.getpid() % 1000), str(Path(__file__).parent / "train_helpers.py"), str(path)]
        subprocess.run(cmd, check=True, env=env, timeout=300, capture_output=True)
        results.append(Blip3o.from_pretrained(Path(cfg.out_dir) / "model"))
    a, b = results
    for part in ("queries", "dit"):
        sa, sb = states(a, part), states(b, part)
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], atol=1e-5, rtol=1e-4, msg=f"{part}.{k}")


def labelled_spans(labels: torch.Tensor) -> list[list[int]]:
    """The contiguous runs of labelled tokens of one row: its answers."""
    spans, current = [], []
    for token in labels.tolist():
        if token != -100:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_understanding_conversation_labels_every_answer(tmp_path):
    """Multi-turn conversations: every assistant answer (and only those) is a target; the image sits in the
    first user turn; the loss is the mean per conversation of its answer tokens' loss, then over conversations."""
    from blip3o.shapes import make_example

    items = [{"image": image, "json": meta} for image, meta in (make_example(3, i) for i in range(6))]
    stage = UnderstandingStage(Blip3o.from_preset("debug"), {"max_turns": 8})
    batch = stage.collate(items, list(range(6)), 0, CPU)
    tok, inputs = stage.model.backbone.tokenizer, batch["inputs"]
    for row, item in enumerate(items):
        meta = item["json"]
        expected = sorted([q["answer"] for q in meta["questions"]] + [meta["caption"]])
        decoded = [tok.decode(span) for span in labelled_spans(batch["labels"][row])]
        assert all(d.endswith("<|im_end|>") for d in decoded), decoded
        assert sorted(d.removesuffix("<|im_end|>") for d in decoded) == expected
        turns, image_at = stage.conversation(item, 0, row)
        assert image_at == 0 and [d.removesuffix("<|im_end|>") for d in decoded] == [a for _, a in turns]
        image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
        ids = inputs["input_ids"][row].tolist()
        first_answer = next(i for i, t in enumerate(batch["labels"][row].tolist()) if t != -100)
        assert image_pad in ids[:first_answer] and image_pad not in ids[first_answer:]
    with torch.no_grad():
        logits = stage.model.backbone.model(**inputs).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        mask = (targets != -100).float()
        expected_loss = ((per_token * mask).sum(1) / mask.sum(1)).mean()
        torch.testing.assert_close(stage.loss(batch), expected_loss, rtol=1e-5, atol=1e-6)


def test_understanding_one_turn_by_default_and_max_turns_caps_it():
    stage = UnderstandingStage(Blip3o.from_preset("debug"), {})
    batch = stage.collate(DATA[:4], list(range(4)), 0, CPU)
    assert [len(labelled_spans(row)) for row in batch["labels"]] == [1, 1, 1, 1]
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="stage option max_turns must be an integer >= 1"):
            UnderstandingStage(stage.model, {"max_turns": bad})


def test_decoder_token_noise_option(tmp_path):
    model = Blip3o.from_preset("debug")
    plain = DecoderStage(model, {}).collate(DATA[:8], list(range(8)), 0, CPU)
    assert not plain["token_noise"].any()
    noisy = DecoderStage(model, {"token_noise": 0.3})
    batch = noisy.collate(DATA[:8], list(range(8)), 0, CPU)
    per_item = batch["token_noise"].std(dim=(1, 2))
    assert (per_item > 0).all() and (per_item < 0.35).all() and per_item.max() - per_item.min() > 0.02
    with torch.no_grad():
        assert torch.isfinite(noisy.loss(batch))
    with pytest.raises(ValueError, match="stage option token_noise must be a number >= 0"):
        DecoderStage(model, {"token_noise": -0.1})


def test_generation_self_conditioning_draws_its_share_and_leaves_other_draws_unchanged():
    from blip3o.dit import DiT

    model = Blip3o.from_preset("debug")
    items, idx = DATA[:4] * 8, list(range(32))
    plain = GenerationStage(model, {}).collate(items, idx, 0, CPU)
    assert 4 <= int(plain["self_condition"].sum()) <= 28  # about half at the default rate 0.5
    none = GenerationStage(model, {"self_condition_rate": 0.0}).collate(items, idx, 0, CPU)
    assert not none["self_condition"].any()
    for key in ("x_1", "t", "keep"):  # streams of their own: identical whatever the rate
        assert torch.equal(plain[key], none[key])
    # a self-conditioned DiT trains through the stage, and the share reaches its loss
    model.config.dit = dataclasses.replace(model.config.dit, self_condition=True)
    model.dit = DiT(model.config.dit)
    stage = GenerationStage(model, {})
    batch = stage.collate(DATA[:4], list(range(4)), 0, CPU)
    with torch.no_grad():
        model.dit.self_condition.weight.normal_()  # make the estimate matter
        cond = model.condition(batch["prompts"]) * batch["keep"].view(-1, 1, 1)
        path = sample_path(model.clip_encoder.encode_images(batch["images"]), batch["x_1"], batch["t"])
        torch.testing.assert_close(stage.loss(dict(batch)), model.dit.loss(path, cond, batch["self_condition"]))
    with pytest.raises(ValueError, match="stage option self_condition_rate must be a share in"):
        GenerationStage(model, {"self_condition_rate": 2})


def test_decoder_dit_tokens_option_reads_a_share_of_items_through_the_frozen_dit(tmp_path):
    from blip3o.sampling import run_dit_loop

    want = DecoderStage(Blip3o.from_preset("debug"), {"token_noise": 0.3}).collate(DATA[:8], list(range(8)), 0, CPU)
    assert "dit" not in want
    options = {"token_noise": 0.3, "dit_tokens": 0.5, "dit_steps": 2}
    trainer = Trainer(config(tmp_path / "b", "decoder", stage_options=options), DATA)
    stage, model = trainer.stage, trainer.model
    batch = stage.collate(DATA[:8], list(range(8)), 0, CPU)
    # the other draws are those of a run without the option
    assert torch.equal(batch["token_noise"], want["token_noise"]) and torch.equal(batch["pixels"], want["pixels"])
    use = batch["dit"]
    assert 0 < use.sum() < 8 and 0.3 <= batch["dit_from"] <= 0.7
    seen = {}
    real_loss = model.decoder.loss
    model.decoder.loss = lambda tokens, pixels, generator: seen.setdefault("tokens", tokens).sum() * 0
    try:
        stage.loss(batch)
    finally:
        model.decoder.loss = real_loss
    with torch.no_grad():
        clean = model.clip_encoder.encode(batch["pixels"])
        t_0, prompts = batch["dit_from"], [p for p, u in zip(batch["dit_prompts"], use.tolist(), strict=True) if u]
        x_t = (1 - t_0) * clean[use] + t_0 * batch["dit_x_1"][use]  # SDEdit: real tokens noised to t_0 ...
        times = [t_0, t_0 / 2, 0.0]  # ... and sampled back in 2 Euler steps with the text
        redrawn = run_dit_loop(model.dit, model.condition(prompts), x_t, times, guidance=model.config.guidance,
                               method="euler", eta=1.0, fresh=None)
    read = seen["tokens"]
    torch.testing.assert_close(read[~use], clean[~use] + batch["token_noise"][~use])  # as without the option
    torch.testing.assert_close(read[use], redrawn)  # the DiT's version of the real tokens, without added noise
    assert not torch.allclose(read[use], clean[use], atol=1e-3)
    before = {p: states(model, p) for p in PARTS}
    trainer.fit()  # only the decoder trains; the DiT and the condition it reads stay frozen
    assert [p for p in PARTS if changed(before[p], states(model, p))] == ["decoder"]
    for bad, match in [({"dit_tokens": 1.5}, "dit_tokens must be a share"),
                       ({"dit_from": [0.8, 0.2]}, "dit_from must be \\[lo, hi\\]"),
                       ({"dit_steps": 0}, "dit_steps must be an integer >= 1")]:
        with pytest.raises(ValueError, match=f"stage option {match}"):
            DecoderStage(model, bad)


def test_generation_prompt_share_option_picks_the_prompt_that_often():
    from blip3o.train.stages.texts import generation_text

    prompt = {"tag": "position", "prompt": "a photo of a square below a circle"}
    drawn = {"image": DATA[0]["image"], "json": {"prompt": prompt, "caption": "a red circle above a blue square"}}
    texts = [generation_text(drawn, 0, i) for i in range(2000)]
    assert abs(texts.count("a photo of a square below a circle") / 2000 - 0.5) < 0.05  # default: either text
    for p in (0.0, 0.8, 1.0):
        texts = [generation_text(drawn, 0, i, p) for i in range(2000)]
        share = texts.count("a photo of a square below a circle") / 2000
        assert abs(share - p) < 0.03 and set(texts) <= {"a photo of a square below a circle",
                                                         "a red circle above a blue square"}
        assert texts == [generation_text(drawn, 0, i, p) for i in range(2000)]  # fixed by (seed, index)
    # a random scene (no prompt) keeps its caption, whatever the share
    scene = {"image": DATA[1]["image"], "json": {"prompt": None, "caption": "a green cross"}}
    assert {generation_text(scene, 0, i, 1.0) for i in range(50)} == {"a green cross"}
    model = Blip3o.from_preset("debug")
    batch = GenerationStage(model, {"prompt_share": 1.0}).collate([drawn, scene], [0, 1], 0, CPU)
    assert batch["prompts"] == ["a photo of a square below a circle", "a green cross"]
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="stage option prompt_share must be a share"):
            GenerationStage(model, {"prompt_share": bad})


def test_each_rank_trains_on_its_own_gpu(monkeypatch):
    from blip3o.distributed import World
    from blip3o.train.trainer import resolve_device

    rank3 = World(rank=7, size=8, local_rank=3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto", rank3) == torch.device("cuda", 3)
    assert resolve_device("cuda", rank3) == torch.device("cuda", 3)
    assert resolve_device("cuda:1", rank3) == torch.device("cuda", 1)  # an explicit index is kept
    assert resolve_device("cpu", rank3) == CPU
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", rank3) == CPU


def test_gradient_accumulation_equals_one_whole_batch(tmp_path):
    """grad_accum=2 (two micro-batches of 2) takes the same steps as grad_accum=1 (one batch of 4)."""
    results = []
    for accum in (1, 2):
        trainer = Trainer(config(tmp_path / str(accum), steps=3, grad_accum=accum, ema_decay=0.0), DATA)
        if accum == 2:
            assert trainer.local_indices(1, 1) == [6, 7]
        trainer.fit()
        results.append({n: p.detach().clone() for n, p in trainer.named_params})
    one, two = results
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="batch_size 4 does not split over 1 processes x grad_accum 3"):
        Trainer(config(tmp_path / "3", grad_accum=3), DATA)
    with pytest.raises(ValueError, match="grad_accum is 0"):
        config(tmp_path, grad_accum=0)


@pytest.mark.parametrize("export_dtype, written", [("same", torch.bfloat16), ("fp32", torch.float32),
                                                   ("fp16", torch.float16)])
def test_a_half_precision_model_trains_fp32_master_weights(tmp_path, export_dtype, written):
    from safetensors.torch import load_file

    model = Blip3o.from_preset("debug", dtype=torch.bfloat16)
    cfg = config(tmp_path, steps=2, precision="bf16", export_dtype=export_dtype, checkpoint_every=10)
    trainer = Trainer(cfg, DATA, model=model)
    trainer.fit()
    assert {p.dtype for p in trainer.params} == {torch.float32}
    assert model.backbone.model.model.visual.patch_embed.proj.weight.dtype == torch.bfloat16  # frozen: as loaded
    moments = [s[k] for s in trainer.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    assert {t.dtype for t in trainer.ema.values()} == {torch.float32}
    weights = {}
    for shard in (tmp_path / "generation" / "model").glob("*.safetensors"):
        weights |= load_file(shard)
    assert weights["dit.norm_out.linear_2.weight"].dtype == written
    assert weights["queries"].dtype == written
    frozen = next(v for k, v in weights.items() if k.startswith("backbone.") and v.is_floating_point())
    assert frozen.dtype == (torch.bfloat16 if export_dtype == "same" else written)
    with pytest.raises(ValueError, match="export_dtype 'int8' is not one of same, fp32, bf16, fp16"):
        config(tmp_path, export_dtype="int8")
