"""The trainer: frozen parts stay frozen, a killed run resumes exactly, 2 processes match 1."""

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from blip3o import Blip3o
from blip3o.train import TrainConfig, Trainer
from blip3o.train.trainer import ema_decay, lr_factor
from train_helpers import tiny_dataset

DATA = tiny_dataset()


def config(tmp_path, stage="generation", **kw) -> TrainConfig:
    base = dict(stage=stage, init="debug", out_dir=str(tmp_path / stage), steps=4, batch_size=4, lr=1e-3,
                warmup_steps=2, checkpoint_every=2, progress=False, device="cpu", ema_decay=0.9)
    return TrainConfig(**{**base, **kw})


def states(model: Blip3o, part: str) -> dict:
    module = getattr(model, part)
    if isinstance(module, torch.nn.Parameter):
        return {"": module.detach().clone()}
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("stage, trained", [("generation", {"queries", "dit"}), ("decoder", {"decoder"}),
                                            ("understanding", {"backbone"})])
def test_stage_trains_only_its_parts(tmp_path, stage, trained, capsys):
    # adaLN-zero: the DiT's gates open one layer of zeros per step, so the queries move from step 5
    trainer = Trainer(config(tmp_path, stage, steps=6 if stage == "generation" else 2), DATA)
    parts = ("backbone", "queries", "dit", "clip_encoder", "decoder")
    before = {p: states(trainer.model, p) for p in parts}
    trainer.fit()
    for p in parts:
        assert changed(before[p], states(trainer.model, p)) == (p in trained), p
    out = capsys.readouterr().out
    n = sum(p.numel() for _, p in trainer.named_params)
    assert f"stage {stage}: trains {n:,} parameters" in out
    exported = Blip3o.from_pretrained(tmp_path / stage / "model")
    assert exported.num_parameters() == trainer.model.num_parameters()


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
    with pytest.raises(ValueError, match="freeze_language must be true or false"):
        Trainer(config(tmp_path, "understanding", stage_options={"freeze_language": "yes"}), DATA)


def test_clip_stage_runs_on_nano(tmp_path):
    trainer = Trainer(config(tmp_path, "clip", init="nano", steps=2, ema_decay=0.0), DATA)
    before = states(trainer.model, "clip_encoder")
    trainer.fit()
    assert changed(before, states(trainer.model, "clip_encoder"))
    assert not changed(states(trainer.model, "dit"), states(Blip3o.from_pretrained(tmp_path / "clip" / "model"), "dit"))


def test_clip_patch_reconstruction_adds_a_patch_read_out_that_learns(tmp_path):
    from blip3o.train.stages import ClipStage

    trainer = Trainer(config(tmp_path, "clip", init="nano", steps=12, batch_size=8, ema_decay=0.0, lr=3e-3,
                             stage_options={"patch_reconstruction": 5.0}), DATA * 2)
    stage, enc = trainer.stage, trainer.model.clip_encoder
    assert {n for n, _ in trainer.named_params} >= {"aux.patch_head.weight", "aux.patch_head.bias"}
    batch = stage.collate(DATA[:8], list(range(8)), 0, torch.device("cpu"))

    def read_out_error():
        with torch.no_grad():
            return F.mse_loss(stage.patch_head(enc(batch["pixels"])), enc.patches(batch["pixels"])).item()

    plain = ClipStage(trainer.model, {})
    plain.text.load_state_dict(stage.text.state_dict())
    with torch.no_grad():  # the loss is SigLIP's plus the weighted read-out error
        torch.testing.assert_close(stage.loss(batch).item(), plain.loss(batch).item() + 5.0 * read_out_error(),
                                   rtol=1e-4, atol=1e-4)
    before = read_out_error()
    trainer.fit()
    assert read_out_error() < 0.5 * before


def shapes_items(n: int, seed: int = 5) -> list[dict]:
    from blip3o.shapes import make_sample

    return [{"image": image, "json": meta} for image, meta in (make_sample(seed, i) for i in range(n))]


def test_object_codes_put_each_object_on_the_cell_of_its_centre():
    from blip3o.shapes.world import COLORS, SHAPES, Scene
    from blip3o.train.stages import object_codes_of

    seen = 0
    for item in shapes_items(200):
        objects = Scene.from_dict(item["json"]["scene"]).objects
        for rows, cols in ((8, 8), (4, 8)):
            codes = object_codes_of(item, rows, cols)
            assert codes.shape == (rows * cols, 7)
            assert int((codes[:, 0] > 0).sum()) == len(objects)  # one cell per object, never shared on 8 px cells
            for o in objects:
                ch, cw = 64 / rows, 64 / cols
                row, col = int(o.cy // ch), int(o.cx // cw)
                x, y = o.x + o.size / 2, o.y + o.size / 2
                expected = [1 + SHAPES.index(o.shape), COLORS.index(o.color), (o.size - 15) / 3,
                            (x - (col + 0.5) * cw) / (cw / 2), (y - (row + 0.5) * ch) / (ch / 2),
                            x / 32 - 1, y / 32 - 1]
                torch.testing.assert_close(codes[row * cols + col], torch.tensor(expected))
                assert codes[row * cols + col, 2:].abs().max() <= 1
                seen += 1
    assert seen > 400
    assert (object_codes_of({"image": DATA[0]["image"], "json": {"caption": "x"}})[:, 0] == -1).all()


def test_clip_object_codes_read_each_object_from_the_token_of_its_centre(tmp_path):
    """Option object_codes: a read-out head on the (narrowed) tokens; the loss is SigLIP's plus the
    weighted code loss; the head learns; images without a scene add nothing."""
    from blip3o.presets import get_preset
    from blip3o.train.stages import CODE_WIDTH, ClipStage, code_loss

    nano = get_preset("nano")
    cc = dataclasses.replace(nano.clip_encoder, token_dim=32, depth=2)
    cfg = dataclasses.replace(nano, clip_encoder=cc, dit=dataclasses.replace(nano.dit, in_channels=32),
                              decoder=dataclasses.replace(nano.decoder, token_width=32))
    model = Blip3o(cfg)
    items = shapes_items(16)
    trainer = Trainer(config(tmp_path, "clip", init="nano", steps=25, batch_size=16, ema_decay=0.0, lr=3e-3,
                             stage_options={"object_codes": 2.0}), items * 25, model=model)
    stage, enc = trainer.stage, trainer.model.clip_encoder
    assert stage.code_head.in_features == 32 and stage.code_head.out_features == CODE_WIDTH
    assert {n for n, _ in trainer.named_params} >= {"aux.code_head.weight", "aux.code_head.bias"}
    batch = stage.collate(items, list(range(16)), 0, torch.device("cpu"))
    assert batch["codes"].shape == (16, 64, 7)

    def read_out_error():
        with torch.no_grad():
            return code_loss(stage.code_head(enc(batch["pixels"])), batch["codes"]).item()

    plain = ClipStage(trainer.model, {})
    plain.text.load_state_dict(stage.text.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(stage.loss(batch).item(), plain.loss(batch).item() + 2.0 * read_out_error(),
                                   rtol=1e-4, atol=1e-4)
        no_scene = dict(batch, codes=torch.full_like(batch["codes"], -1.0))
        torch.testing.assert_close(stage.loss(no_scene).item(), plain.loss(batch).item(), rtol=1e-5, atol=1e-5)
    before = read_out_error()
    trainer.fit()
    assert read_out_error() < 0.6 * before
    for bad in (-1, "4", True, float("nan")):
        with pytest.raises(ValueError, match="object_codes must be a weight >= 0"):
            ClipStage(trainer.model, {"object_codes": bad})


def test_clip_patch_reconstruction_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="patch_reconstruction must be a weight >= 0"):
        Trainer(config(tmp_path, "clip", init="nano", stage_options={"patch_reconstruction": -1}), DATA)
    from blip3o.train.stages import ClipStage

    model = Blip3o.from_preset("debug")  # its encoder is EVA-style: no patch grid of its own
    with pytest.raises(ValueError, match="Shapes encoder"):
        ClipStage(model, {"patch_reconstruction": 1.0})


def test_generation_draws_share_one_condition_per_sample():
    from blip3o.flow import sample_path
    from blip3o.train.stages import GenerationStage

    torch.manual_seed(0)
    model = Blip3o.from_preset("debug")
    one, three = GenerationStage(model, {}), GenerationStage(model, {"draws": 3})
    b1 = one.collate(DATA[:2], [5, 6], 0, torch.device("cpu"))
    b3 = three.collate(DATA[:2], [5, 6], 0, torch.device("cpu"))
    assert b3["x_1"].shape == (6, *b1["x_1"].shape[1:]) and b3["t"].shape == b3["keep"].shape == (6,)
    assert b3["prompts"] == b1["prompts"]
    assert torch.equal(b3["x_1"][0], b1["x_1"][0]) and torch.equal(b3["x_1"][3], b1["x_1"][1])  # first draw = draws 1
    assert len(set(b3["t"].tolist())) == 6  # each draw its own time
    with torch.no_grad():  # the loss is the mean over the 6 rows, each row with its sample's target and condition
        got = three.loss(dict(b3))
        x_0 = model.clip_encoder.encode(b3["pixels"])
        cond = model.condition(b3["prompts"])
        rows = [model.dit.loss(sample_path(x_0[r // 3:r // 3 + 1], b3["x_1"][r:r + 1], b3["t"][r:r + 1]),
                               cond[r // 3:r // 3 + 1] * b3["keep"][r].float()) for r in range(6)]
    torch.testing.assert_close(got, torch.stack(rows).mean(), rtol=1e-5, atol=1e-6)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="draws must be an integer >= 1"):
            GenerationStage(model, {"draws": bad})


def test_killed_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    straight = Trainer(config(tmp_path / "a", steps=6), DATA)
    straight.fit()

    cfg = config(tmp_path / "b", steps=6)
    interrupted = Trainer(cfg, DATA)
    original = Trainer.train_step

    def dies_at_step_5(self):
        if self.step == 4:
            raise KeyboardInterrupt("killed")
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = Trainer(cfg, DATA)  # a fresh process: new model from the preset, state from checkpoint/
    resumed.fit()
    assert resumed.step == 6
    # the loop time of the killed run's first 4 steps (checkpointed at step 4) carries over
    assert 0 < resumed.resumed_seconds < resumed.seconds
    for (n, a), (_, b) in zip(straight.named_params, resumed.named_params, strict=True):
        assert torch.equal(a, b), n
    for n in straight.ema:
        assert torch.equal(straight.ema[n], resumed.ema[n]), n


def test_resume_with_another_config_is_refused(tmp_path):
    Trainer(config(tmp_path, steps=2), DATA).fit()
    with pytest.raises(ValueError, match="refusing to resume.*lr"):
        Trainer(config(tmp_path, steps=4, lr=5e-4), DATA).fit()
    Trainer(config(tmp_path, steps=3), DATA).fit()  # more steps of the same run is fine


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


def test_understanding_conversation_labels_every_answer(tmp_path):
    """Multi-turn conversations: every assistant answer (and only those) is a target, in order."""
    from blip3o.shapes import make_sample

    items = [{"image": image, "json": meta} for image, meta in (make_sample(3, i) for i in range(6))]
    trainer = Trainer(config(tmp_path, "understanding", stage_options={"max_turns": 8}), items)
    batch = trainer.stage.collate(items, list(range(6)), 0, torch.device("cpu"))
    tok = trainer.model.backbone.tokenizer
    for row, item in enumerate(items):
        meta = item["json"]
        expected = sorted([q["answer"] for q in meta["questions"]] + [meta["caption"]])
        labels = batch["labels"][row]
        spans, current = [], []
        for token in labels.tolist():  # contiguous runs of labelled tokens = the answers
            if token != -100:
                current.append(token)
            elif current:
                spans.append(current)
                current = []
        spans += [current] if current else []
        decoded = [tok.decode(span) for span in spans]
        assert all(d.endswith("<|im_end|>") for d in decoded), decoded
        assert sorted(d.removesuffix("<|im_end|>") for d in decoded) == expected
        # the image sits in the first user turn only
        image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
        ids = batch["input_ids"][row].tolist()
        first_answer = next(i for i, t in enumerate(labels.tolist()) if t != -100)
        assert image_pad in ids[:first_answer] and image_pad not in ids[first_answer:]
    # the stage projects only the labelled positions to the vocabulary: the same loss as every position's
    # logits shifted against the labels, averaged per sample, then over samples
    with torch.no_grad():
        reference_batch = {k: v for k, v in batch.items() if k != "labels"}
        logits = trainer.model.backbone.model(**reference_batch).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        mask = (targets != -100).float()
        expected_loss = ((per_token * mask).sum(1) / mask.sum(1)).mean()
        loss = trainer.stage.loss(dict(batch))
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)


def turn_option_trainer(tmp_path, option: str, k: int, *, seed: int, n: int):
    """n Shapes items (make_sample(seed, i)) and an understanding-stage trainer with `option` = k, max_turns 2."""
    from blip3o.shapes import make_sample

    items = [{"image": image, "json": meta} for image, meta in (make_sample(seed, i) for i in range(n))]
    stage_options = {"max_turns": 2, option: k}
    return items, Trainer(config(tmp_path / option, "understanding", stage_options=stage_options), items)


def extra_turns(tmp_path, items, stage):
    """(item, the turns an option added): each conversation begins with the turns drawn without the option."""
    plain = Trainer(config(tmp_path / "plain", "understanding", stage_options={"max_turns": 2}), items).stage
    for i, item in enumerate(items):
        base, turns = plain.pick(item, random.Random(i)), stage.pick(item, random.Random(i))
        assert turns[:len(base)] == base
        yield item, turns[len(base):]


def labels_loss_and_refusal(tmp_path, trainer, items, row: int, option: str) -> None:
    """A batch of `items`: row `row`'s labels are exactly its conversation's answers, each closed by <|im_end|>;
    the loss is finite; and `option` = -1 is refused by name."""
    stage = trainer.stage
    batch = stage.collate(items, list(range(len(items))), 0, torch.device("cpu"))
    labelled = trainer.model.backbone.tokenizer.decode([t for t in batch["labels"][row].tolist() if t != -100])
    assert labelled == "".join(a + "<|im_end|>" for _, a in stage.pick(items[row], random.Random(row)))
    assert torch.isfinite(stage.loss(batch))
    with pytest.raises(ValueError, match=option):
        Trainer(config(tmp_path / "c", "understanding", stage_options={option: -1}), items)


def test_understanding_reading_turns_follow_the_image_turns(tmp_path):
    """Option reading = k: up to k text-only turns about the caption join each conversation after its image
    turns, each labelled like any answer; the image turns are those drawn without the option."""
    items, trainer = turn_option_trainer(tmp_path, "reading", 2, seed=3, n=6)
    stage = trainer.stage
    for item, extra in extra_turns(tmp_path, items, stage):
        assert 1 <= len(extra) <= 2
        for text, answer in extra:
            assert text.startswith(item["json"]["caption"] + ". ") and answer
    batch = stage.collate(items, list(range(6)), 0, torch.device("cpu"))
    tok = trainer.model.backbone.tokenizer
    labelled = tok.decode([t for t in batch["labels"][0].tolist() if t != -100])
    expected = [a for _, a in stage.pick(items[0], random.Random(0 * 7919 + 0))]
    assert labelled == "".join(a + "<|im_end|>" for a in expected)
    assert torch.isfinite(stage.loss(batch))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="reading"):
            Trainer(config(tmp_path / "c", "understanding", stage_options={"reading": bad}), items)


def test_understanding_restate_turns_follow_the_image_turns(tmp_path):
    """Option restate = k: k text-only `the other way round?` turns join each conversation after its image turns,
    labelled like any answer; the image turns are those drawn without the option."""
    items, trainer = turn_option_trainer(tmp_path, "restate", 2, seed=3, n=4)
    stage = trainer.stage
    for _, extra in extra_turns(tmp_path, items, stage):
        assert len(extra) == 2
        assert all(text.endswith(". the other way round?") for text, _ in extra)
    labels_loss_and_refusal(tmp_path, trainer, items, 1, "restate")


def test_understanding_plan_turns_ask_as_generation_does(tmp_path):
    """Option plan = k: k text-only turns ask for a relation prompt in the generation request's words and are
    answered by its layout. They open the conversation (the image turns after them are those drawn without
    the option), so the first reads token for token as the generation prompt: its first answer word is
    predicted where the condition's [IMG] and queries follow."""
    from blip3o.backbone import GENERATION_PROMPT, GENERATION_REQUEST

    items, trainer = turn_option_trainer(tmp_path, "plan", 2, seed=3, n=4)
    stage = trainer.stage
    plain = Trainer(config(tmp_path / "plain", "understanding", stage_options={"max_turns": 2}), items).stage
    for i, item in enumerate(items):
        turns = stage.pick(item, random.Random(i))
        assert turns[2:] == plain.pick(item, random.Random(i))
        for text, answer in turns[:2]:
            assert text.startswith(GENERATION_REQUEST) and (" left of " in answer or " above " in answer)
    batch = stage.collate(items, list(range(4)), 0, torch.device("cpu"))
    tok = trainer.model.backbone.tokenizer
    turns = stage.pick(items[2], random.Random(2))
    labelled = tok.decode([t for t in batch["labels"][2].tolist() if t != -100])
    assert labelled == "".join(a + "<|im_end|>" for _, a in turns)
    text = tok.decode([t for t in batch["input_ids"][2].tolist() if t != tok.pad_token_id])  # left padding
    prompt = GENERATION_PROMPT.format(prompt=turns[0][0].removeprefix(GENERATION_REQUEST))
    assert text.startswith(prompt + turns[0][1] + "<|im_end|>")
    image_at = text.index("<|image_pad|>")  # the image sits in the first turn after the plans
    assert text.rindex(turns[1][1], 0, image_at) > 0 and turns[2][1] in text[image_at:]
    assert torch.isfinite(stage.loss(batch))
    with pytest.raises(ValueError, match="plan"):
        Trainer(config(tmp_path / "c", "understanding", stage_options={"plan": -1}), items)


def test_understanding_locate_turns_follow_the_image_turns(tmp_path):
    """Option locate = k: up to k `where is the X?` turns about the scene join each conversation after its image
    turns, answered from the scene; the image turns are those drawn without the option."""
    from blip3o.shapes.questions import where
    from blip3o.shapes.world import Scene

    items, trainer = turn_option_trainer(tmp_path, "locate", 2, seed=4, n=6)
    stage = trainer.stage
    count = 0
    for item, extra in extra_turns(tmp_path, items, stage):
        assert len(extra) <= 2
        objects = Scene.from_dict(item["json"]["scene"]).objects
        for text, answer in extra:
            assert text.startswith("where is the ")
            assert answer in {where(o) for o in objects}
            count += 1
    assert count >= 6
    batch = stage.collate(items, list(range(6)), 0, torch.device("cpu"))
    assert torch.isfinite(stage.loss(batch))
    for bad in (-1, 0.5, True):
        with pytest.raises(ValueError, match="locate"):
            Trainer(config(tmp_path / "c", "understanding", stage_options={"locate": bad}), items)


def test_understanding_questions_join_the_image_turns(tmp_path):
    """Option questions = k: up to k more scene questions, answered from the scene and none already asked, are
    placed among the image turns: after the `plan` turns, before the text-only `restate` turns; every other
    turn is the one drawn without the option, in its order."""
    from blip3o.shapes import make_sample
    from blip3o.shapes.questions import answer_question
    from blip3o.shapes.world import Scene

    items = [{"image": image, "json": meta} for image, meta in (make_sample(6, i) for i in range(6))]
    common = {"max_turns": 2, "plan": 1, "restate": 1}
    plain = Trainer(config(tmp_path / "plain", "understanding", stage_options=common), items).stage
    trainer = Trainer(config(tmp_path / "q", "understanding", stage_options={**common, "questions": 4}), items)
    stage, added = trainer.stage, 0
    for i, item in enumerate(items):
        base, turns = plain.pick(item, random.Random(i)), stage.pick(item, random.Random(i))
        extra = [t for t in turns if t not in base]
        assert [t for t in turns if t in base] == base and len(turns) == len(base) + len(extra) <= len(base) + 4
        assert turns[0] == base[0] and turns[-1] == base[-1]  # plan first, restate last
        assert len({q for q, _ in turns}) == len(turns)  # no question twice
        objects = Scene.from_dict(item["json"]["scene"]).objects
        for question, answer in extra:
            assert answer == answer_question(question, objects)
        added += len(extra)
    assert added >= 12
    labels_loss_and_refusal(tmp_path, trainer, items, 3, "questions")


def test_understanding_loss_per_turn_weighs_each_answer_once(tmp_path):
    """Option loss_per = "turn": the mean over a conversation's answers of each answer's mean token loss
    (then over samples), recomputed here from the full logits; "token" (the default) is unchanged."""
    from blip3o.shapes import make_sample

    items = [{"image": image, "json": meta} for image, meta in (make_sample(7, i) for i in range(4))]
    options = {"max_turns": 4, "restate": 1}
    trainer = Trainer(config(tmp_path / "t", "understanding", stage_options={**options, "loss_per": "turn"}), items)
    stage = trainer.stage
    batch = stage.collate(items, list(range(4)), 0, torch.device("cpu"))
    labels, turns = batch["labels"], batch["label_turns"]
    assert ((labels == -100) == (turns == -1)).all()
    with torch.no_grad():
        reference = {k: v for k, v in batch.items() if k not in ("labels", "label_turns")}
        logits = trainer.model.backbone.model(**reference).logits[:, :-1].float()
        per_sample = []
        for row in range(4):
            answers = [stage.pick(items[row], random.Random(row))[t][1] for t in range(int(turns[row].max()) + 1)]
            means = []
            for t, answer in enumerate(answers):
                at = (turns[row, 1:] == t).nonzero()[:, 0]
                assert trainer.model.backbone.tokenizer.decode(labels[row, at + 1]) == answer + "<|im_end|>"
                means.append(F.cross_entropy(logits[row, at], labels[row, at + 1]))
            per_sample.append(torch.stack(means).mean())
        torch.testing.assert_close(stage.loss(dict(batch)), torch.stack(per_sample).mean(), rtol=1e-5, atol=1e-6)
        targets = labels[:, 1:]
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
        mask = (targets != -100).float()
        token_mean = ((per_token * mask).sum(1) / mask.sum(1)).mean()  # what loss_per "token" gives
        assert abs(float(token_mean) - float(stage.loss(dict(batch)))) > 1e-3
        plain = Trainer(config(tmp_path / "p", "understanding", stage_options=options), items).stage
        assert "label_turns" not in plain.collate(items, list(range(4)), 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="loss_per"):
        Trainer(config(tmp_path / "c", "understanding", stage_options={"loss_per": "answer"}), items)


def test_understanding_object_labels_read_shape_and_colour_from_vision_tokens(tmp_path):
    """Option object_labels: each merged vision token's (shape, colour) label is the object whose box
    holds the cell centre; the loss adds the weighted read-out error; the head learns; no scene = no labels."""
    from blip3o.shapes import make_sample
    from blip3o.shapes.world import Scene
    from blip3o.train.stages import CELL_COLORS, CELL_SHAPES, UnderstandingStage, cell_labels

    items = [{"image": image, "json": meta} for image, meta in (make_sample(5, i) for i in range(8))]
    trainer = Trainer(config(tmp_path, "understanding", init="nano", steps=10, batch_size=8, ema_decay=0.0, lr=3e-3,
                             stage_options={"object_labels": 2.0}), items * 10)
    stage = trainer.stage
    assert {n for n, _ in trainer.named_params} >= {"aux.object_head.weight", "aux.object_head.bias"}
    batch = stage.collate(items, list(range(8)), 0, torch.device("cpu"))
    assert batch["cell_labels"].shape == (8 * 64, 2)  # 64 px images, 4 px patches merged 2 x 2: 8 x 8 cells
    for row, item in enumerate(items):  # every label from the scene, recomputed pixel by pixel
        labels = batch["cell_labels"][row * 64:(row + 1) * 64]
        for cell in range(64):
            cx, cy = 8 * (cell % 8) + 4, 8 * (cell // 8) + 4
            hits = [o for o in Scene.from_dict(item["json"]["scene"]).objects
                    if o.x <= cx < o.x + o.size and o.y <= cy < o.y + o.size]
            expected = [CELL_SHAPES.index(hits[0].shape), CELL_COLORS.index(hits[0].color)] if hits else [0, 0]
            assert labels[cell].tolist() == expected
    assert (batch["cell_labels"][:, 0] > 0).any()
    no_scene = {"image": items[0]["image"], "json": {"caption": "a red circle"}}
    assert (cell_labels(no_scene, 8, 8) == -1).all()

    visual = trainer.model.backbone.model.model.visual

    def read_out():
        with torch.no_grad():
            px = batch["pixel_values"]
            out = stage.object_head(visual(px, grid_thw=batch["image_grid_thw"]).pooler_output)
            cells, n = batch["cell_labels"], len(CELL_SHAPES)
            return (F.cross_entropy(out[:, :n], cells[:, 0]) + F.cross_entropy(out[:, n:], cells[:, 1])).item()

    plain = UnderstandingStage(trainer.model, {})
    with torch.no_grad():
        text_only = plain.loss({k: v for k, v in batch.items() if k != "cell_labels"})
        torch.testing.assert_close(stage.loss(dict(batch)).item(), text_only.item() + 2.0 * read_out(),
                                   rtol=1e-4, atol=1e-4)
    before = read_out()
    trainer.fit()
    assert read_out() < 0.7 * before
    with pytest.raises(ValueError, match="object_labels must be >= 0"):
        UnderstandingStage(trainer.model, {"object_labels": -1})


def test_understanding_object_labels_at_centres(tmp_path):
    """object_labels_at="centre": each object labels only the merged token of its box centre, with the
    code of `object_codes_of` (shape, colour, size, offset, position); the loss adds the code loss."""
    from blip3o.train.stages import UnderstandingStage, code_loss, object_codes_of

    items = shapes_items(8)
    trainer = Trainer(config(tmp_path, "understanding", init="nano", steps=1, batch_size=8, ema_decay=0.0,
                             stage_options={"object_labels": 0.5, "object_labels_at": "centre"}), items)
    stage = trainer.stage
    batch = stage.collate(items, list(range(8)), 0, torch.device("cpu"))
    assert torch.equal(batch["cell_labels"], torch.cat([object_codes_of(it, 8, 8) for it in items]))
    visual = trainer.model.backbone.model.model.visual
    plain = UnderstandingStage(trainer.model, {})
    with torch.no_grad():
        out = stage.object_head(visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output)
        expected = plain.loss({k: v for k, v in batch.items() if k != "cell_labels"}) + 0.5 * code_loss(
            out, batch["cell_labels"])
        torch.testing.assert_close(stage.loss(dict(batch)), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="object_labels_at must be 'box' or 'centre'"):
        UnderstandingStage(trainer.model, {"object_labels": 1.0, "object_labels_at": "center"})


def test_understanding_one_turn_by_default(tmp_path):
    trainer = Trainer(config(tmp_path, "understanding"), DATA)
    batch = trainer.stage.collate(DATA[:4], list(range(4)), 0, torch.device("cpu"))
    runs = [(row != -100).int().diff().eq(1).sum().item() + int(row[0] != -100) for row in batch["labels"]]
    assert runs == [1, 1, 1, 1]


def test_decoder_token_noise_option(tmp_path):
    plain = Trainer(config(tmp_path / "a", "decoder"), DATA).stage.collate(DATA[:8], list(range(8)), 0,
                                                                           torch.device("cpu"))
    assert not plain["token_noise"].any()
    noisy = Trainer(config(tmp_path / "b", "decoder", stage_options={"token_noise": 0.3}), DATA)
    batch = noisy.stage.collate(DATA[:8], list(range(8)), 0, torch.device("cpu"))
    per_sample = batch["token_noise"].std(dim=(1, 2))
    assert (per_sample > 0).all() and (per_sample < 0.35).all() and per_sample.max() - per_sample.min() > 0.02
    assert torch.isfinite(noisy.stage.loss(batch))


def test_generation_with_token_whitening_fits_it_learns_whitened_tokens_and_samples_tokens(tmp_path):
    """DiTConfig.token_whitening: the stage fits the whitening on the frozen encoder's tokens before
    training; the DiT's targets are whitened tokens; sample_tokens returns raw tokens; the fitted
    transform is saved with the model and survives a reload."""
    model = Blip3o.from_preset("debug")
    model.config.dit = dataclasses.replace(model.config.dit, token_whitening=0.01)
    from blip3o.dit import DiT

    model.dit = DiT(model.config.dit)
    trainer = Trainer(config(tmp_path, "generation", steps=2), DATA, model=model)
    white = trainer.model.dit.token_whitening
    assert white.is_fitted
    from blip3o.images import pil_to_tensor

    with torch.no_grad():
        tokens = model.clip_encoder.encode(pil_to_tensor([it["image"] for it in DATA]))
        z = model.dit.to_model_space(tokens).reshape(-1, tokens.shape[-1])
    torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[-1]), atol=1e-4, rtol=0)  # fitted on these tokens
    # the loss is the DiT's loss on the whitened targets
    batch = trainer.stage.collate(DATA[:4], list(range(4)), 0, torch.device("cpu"))
    from blip3o.flow import sample_path

    with torch.no_grad():
        cond = model.condition(batch["prompts"]) * batch["keep"].view(-1, 1, 1)
        target = model.dit.to_model_space(model.clip_encoder.encode(batch["pixels"]))
        expected = model.dit.loss(sample_path(target, batch["x_1"], batch["t"]), cond)
        torch.testing.assert_close(trainer.stage.loss(dict(batch)), expected)
    path = trainer.fit()
    loaded = Blip3o.from_pretrained(path)
    assert loaded.dit.token_whitening.is_fitted
    torch.testing.assert_close(loaded.dit.token_whitening.color, model.dit.token_whitening.color)
    # sampling: the same loop in whitened space, mapped back to tokens
    cond = loaded.condition(["a red square"])
    with torch.no_grad():
        out = loaded.sample_tokens(cond, steps=3, guidance=1.0, generator=torch.Generator().manual_seed(0))
        loaded.dit.token_whitening = None
        raw = loaded.sample_tokens(cond, steps=3, guidance=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, raw @ model.dit.token_whitening.color.T + model.dit.token_whitening.mean)


def test_generation_self_conditioning_draws_its_share_and_leaves_other_draws_unchanged():
    from blip3o.dit import DiT
    from blip3o.train.stages import GenerationStage

    model = Blip3o.from_preset("debug")
    items, idx = DATA[:4] * 8, list(range(32))
    plain = GenerationStage(model, {}).collate(items, idx, 0, torch.device("cpu"))
    assert 4 <= int(plain["self_condition"].sum()) <= 28  # about half at the default rate 0.5
    none = GenerationStage(model, {"self_condition_rate": 0.0}).collate(items, idx, 0, torch.device("cpu"))
    assert not none["self_condition"].any()
    for key in ("x_1", "t", "keep"):  # drawn before: identical whatever the rate
        assert torch.equal(plain[key], none[key])
    # a self-conditioned DiT trains through the stage, and the share reaches its loss
    model.config.dit = dataclasses.replace(model.config.dit, self_condition=True)
    model.dit = DiT(model.config.dit)
    stage = GenerationStage(model, {})
    batch = stage.collate(DATA[:4], list(range(4)), 0, torch.device("cpu"))
    from blip3o.flow import sample_path

    with torch.no_grad():
        model.dit.self_condition.weight.normal_()  # make the estimate matter
        cond = model.condition(batch["prompts"]) * batch["keep"].view(-1, 1, 1)
        target = model.clip_encoder.encode(batch["pixels"])
        path = sample_path(target, batch["x_1"], batch["t"])
        torch.testing.assert_close(stage.loss(dict(batch)), model.dit.loss(path, cond, batch["self_condition"]))


def test_decoder_dit_tokens_option_reads_a_share_of_samples_through_the_frozen_dit(tmp_path):
    plain = Trainer(config(tmp_path / "a", "decoder", stage_options={"token_noise": 0.3}), DATA)
    want = plain.stage.collate(DATA[:8], list(range(8)), 0, torch.device("cpu"))
    assert "dit" not in want
    trainer = Trainer(config(tmp_path / "b", "decoder", stage_options={"token_noise": 0.3, "dit_tokens": 0.5,
                                                                       "dit_steps": 2}), DATA)
    stage, model = trainer.stage, trainer.model
    batch = stage.collate(DATA[:8], list(range(8)), 0, torch.device("cpu"))
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
    read = seen["tokens"]
    keep = ~use
    torch.testing.assert_close(read[keep], clean[keep] + batch["token_noise"][keep])  # as without the option
    prompts = [p for p, u in zip(batch["dit_prompts"], use.tolist(), strict=True) if u]
    redrawn = stage.dit_redraw(clean[use], prompts, batch["dit_x_1"][use], batch["dit_from"])
    torch.testing.assert_close(read[use], redrawn)  # the DiT's SDEdit of the real tokens, without added noise
    assert not torch.allclose(read[use], clean[use], atol=1e-3)
    assert torch.isfinite(stage.loss(batch))
    parts = ("backbone", "queries", "dit", "clip_encoder", "decoder")
    before = {p: states(model, p) for p in parts}
    trainer.fit()  # only the decoder trains; the DiT and the condition it reads stay frozen
    assert [p for p in parts if changed(before[p], states(model, p))] == ["decoder"]
    for bad, match in [({"dit_tokens": 1.5}, "dit_tokens must be a share"),
                       ({"dit_from": [0.8, 0.2]}, "dit_from must be"), ({"dit_steps": 0}, "dit_steps must be")]:
        with pytest.raises(ValueError, match=match):
            Trainer(config(tmp_path / "c", "decoder", stage_options=bad), DATA)


def test_generation_prompt_share_option_picks_the_prompt_that_often():
    from blip3o.train.stages import GenerationStage, generation_text

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
    stage = GenerationStage(model, {"prompt_share": 1.0})
    batch = stage.collate([drawn, scene], [0, 1], 0, torch.device("cpu"))
    assert batch["prompts"] == ["a photo of a square below a circle", "a green cross"]
    for bad in (1.5, -0.1, True, "half"):
        with pytest.raises(ValueError, match="prompt_share must be a share"):
            GenerationStage(model, {"prompt_share": bad})


def test_generation_code_loss_reads_the_dits_estimate_through_a_frozen_fitted_head():
    """Option code_loss: a linear object-code read-out, fitted before training on the frozen encoder's tokens
    (deterministic, frozen), applied to the DiT's clean estimate; its weighted code loss joins the flow loss."""
    from blip3o.presets import get_preset
    from blip3o.train.stages import CODE_WIDTH, GenerationStage, code_loss

    nano = get_preset("nano")
    cfg = dataclasses.replace(nano, clip_encoder=dataclasses.replace(nano.clip_encoder, token_dim=32, depth=2),
                              dit=dataclasses.replace(nano.dit, num_layers=1))
    torch.manual_seed(0)
    model = Blip3o(cfg)
    items = shapes_items(48)
    stage = GenerationStage(model, {"code_loss": 0.5})
    stage.prepare(items)
    head = stage.code_head
    assert (head.in_features, head.out_features) == (32, CODE_WIDTH) and not head.weight.requires_grad
    again = GenerationStage(model, {"code_loss": 0.5})
    again.prepare(items)
    torch.testing.assert_close(again.code_head.weight, head.weight)  # the same data fits the same head
    batch = stage.collate(items[:8], list(range(8)), 0, torch.device("cpu"))
    with torch.no_grad():  # the fit learned something: better than the untrained start of the fit
        tokens = model.clip_encoder.encode(batch["pixels"])
        start = torch.nn.Linear(32, CODE_WIDTH)
        torch.nn.init.normal_(start.weight, std=0.01)
        torch.nn.init.zeros_(start.bias)
        assert code_loss(head(tokens), batch["codes"]) < 0.5 * code_loss(start(tokens), batch["codes"])
    names = [n for n, _ in stage.trainable(model)]
    assert not any("code_head" in n for n in names)
    torch.nn.init.normal_(model.dit.norm_out.linear_2.weight, std=0.02)  # a DiT whose output moves
    plain = GenerationStage(model, {})
    with torch.no_grad():
        x_0 = model.clip_encoder.encode(batch["pixels"])
        from blip3o.flow import sample_path

        path = sample_path(x_0, batch["x_1"], batch["t"])
        flow, estimate = model.dit.loss(path, model.condition(batch["prompts"]) * batch["keep"].view(-1, 1, 1),
                                        batch["self_condition"], with_estimate=True)
        expected = flow + 0.5 * code_loss(head(estimate), batch["codes"])
        torch.testing.assert_close(stage.loss(batch), expected)
        torch.testing.assert_close(plain.loss({k: v for k, v in batch.items() if k != "codes"}), flow)
    stage.loss(batch).backward()
    assert model.queries.grad is not None and model.dit.norm_out.linear_2.weight.grad.abs().sum() > 0
    for bad in (-1.0, True, "much"):
        with pytest.raises(ValueError, match="code_loss must be a weight >= 0"):
            GenerationStage(model, {"code_loss": bad})
    with pytest.raises(ValueError, match="code_loss needs Shapes scenes"):
        GenerationStage(model, {"code_loss": 0.5}).prepare(DATA)


def test_understanding_text_weight_scales_the_text_only_turns(tmp_path):
    """Option text_weight = w: the answer tokens of text-only turns (`plan`, `restate`) weigh w against 1 for
    the image turns' (a weighted mean per sample, then the mean over samples), recomputed here from the full
    logits, and with loss_per "turn" each answer's mean weighs its turn's weight; the turns' kinds are what
    `turns` says, and a bad weight is refused."""
    from blip3o.shapes import make_sample

    items = [{"image": image, "json": meta} for image, meta in (make_sample(8, i) for i in range(4))]
    options = {"max_turns": 3, "restate": 1, "plan": 1}
    trainer = Trainer(config(tmp_path / "w", "understanding", stage_options={**options, "text_weight": 0.25}), items)
    stage = trainer.stage
    for i, item in enumerate(items):
        turns, text_only = stage.turns(item, random.Random(i))
        assert turns == stage.pick(item, random.Random(i))
        assert text_only == [True] + [False] * (len(turns) - 2) + [True]  # the plan first, the restate last
    batch = stage.collate(items, list(range(4)), 0, torch.device("cpu"))
    labels, weights = batch["labels"], batch["label_weights"]
    tok = trainer.model.backbone.tokenizer
    with torch.no_grad():
        reference = {k: v for k, v in batch.items() if k not in ("labels", "label_weights")}
        logits = trainer.model.backbone.model(**reference).logits[:, :-1].float()
        per_sample = []
        for row in range(4):
            turns, text_only = stage.turns(items[row], random.Random(row))
            at = (labels[row, 1:] != -100).nonzero()[:, 0]
            w = weights[row, at + 1]
            # the text-only answers' tokens (and only they) carry 0.25
            light = tok.decode(labels[row, at + 1][w == 0.25])
            assert light == "".join(a + "<|im_end|>" for (_, a), t in zip(turns, text_only, strict=True) if t)
            assert set(w.tolist()) == {0.25, 1.0}
            per_token = F.cross_entropy(logits[row, at], labels[row, at + 1], reduction="none")
            per_sample.append((w * per_token).sum() / w.sum())
        loss = stage.loss(dict(batch))
        torch.testing.assert_close(loss, torch.stack(per_sample).mean(), rtol=1e-5, atol=1e-6)
        # with loss_per "turn" each answer's mean token loss weighs its turn's weight
        per_turn = Trainer(config(tmp_path / "t", "understanding", stage_options={
            **options, "text_weight": 0.25, "loss_per": "turn"}), items).stage
        turn_batch = per_turn.collate(items, list(range(4)), 0, torch.device("cpu"))
        expected = []
        for row in range(4):
            _, text_only = per_turn.turns(items[row], random.Random(row))
            means, ws = [], []
            for t, text in enumerate(text_only):
                at = (turn_batch["label_turns"][row, 1:] == t).nonzero()[:, 0]
                means.append(F.cross_entropy(logits[row, at], labels[row, at + 1]))
                ws.append(0.25 if text else 1.0)
            ws = torch.tensor(ws)
            expected.append((ws * torch.stack(means)).sum() / ws.sum())
        torch.testing.assert_close(per_turn.loss(dict(turn_batch)), torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)
        plain = Trainer(config(tmp_path / "p", "understanding", stage_options=options), items).stage
        plain_batch = plain.collate(items, list(range(4)), 0, torch.device("cpu"))
        assert "label_weights" not in plain_batch
        assert abs(float(plain.loss(plain_batch)) - float(loss)) > 1e-3
    for bad in (-1, True, "x"):
        with pytest.raises(ValueError, match="text_weight"):
            Trainer(config(tmp_path / "c", "understanding", stage_options={"text_weight": bad}), items)
