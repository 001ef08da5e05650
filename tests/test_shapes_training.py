"""The Shapes world's training auxiliaries (blip3o.shapes.training): object codes and labels, and the turns
it adds to the understanding stage; each plugs in through the stage hook and is switched by its options."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from blip3o import Blip3o
from blip3o.backbone import GENERATION_PROMPT, GENERATION_REQUEST
from blip3o.shapes import make_example
from blip3o.shapes.questions import where
from blip3o.shapes.training import (
    CELL_COLORS,
    CELL_SHAPES,
    CENTRE_LABEL_WIDTH,
    CODE_WIDTH,
    cell_labels,
    code_loss,
    object_codes_of,
)
from blip3o.shapes.world import COLORS, SHAPES, Scene
from blip3o.train import TrainConfig, Trainer
from blip3o.train.stages import ClipStage, UnderstandingStage
from train_helpers import tiny_dataset

CPU = torch.device("cpu")


def shapes_items(n: int, seed: int = 5) -> list[dict]:
    return [{"image": image, "json": meta} for image, meta in (make_example(seed, i) for i in range(n))]


def config(tmp_path, stage, **kw) -> TrainConfig:
    base = dict(stage=stage, init="random:nano", out_dir=str(tmp_path / stage), steps=1, batch_size=8, lr=3e-3,
                warmup_steps=2, progress=False, device="cpu", ema_decay=0.0, checkpoint_every=1000)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def debug_model():
    torch.manual_seed(0)
    return Blip3o.from_preset("debug")


def test_object_codes_put_each_object_on_the_cell_of_its_centre():
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
    plain = tiny_dataset(1)[0]  # no scene: every cell unknown
    assert (object_codes_of(plain)[:, 0] == -1).all() and (cell_labels(plain, 8, 8) == -1).all()


def test_clip_object_codes_read_each_object_from_the_token_of_its_centre(tmp_path):
    """Option object_codes: a read-out head on the (narrowed) tokens; the loss is SigLIP's plus the weighted
    code loss; the head learns; images without a scene add nothing."""
    from blip3o.presets import get_preset

    nano = get_preset("nano")
    cc = dataclasses.replace(nano.clip_encoder, token_dim=32, depth=2)
    cfg = dataclasses.replace(nano, clip_encoder=cc, dit=dataclasses.replace(nano.dit, in_channels=32),
                              decoder=dataclasses.replace(nano.decoder, token_width=32))
    items = shapes_items(16)
    trainer = Trainer(config(tmp_path, "clip", steps=25, batch_size=16, stage_options={"object_codes": 2.0}),
                      items * 25, model=Blip3o(cfg))
    stage, enc = trainer.stage, trainer.model.clip_encoder
    (codes,) = stage.auxiliaries
    assert codes.head.in_features == 32 and codes.head.out_features == CODE_WIDTH
    assert {n for n, _ in trainer.named_params} >= {"aux.object_codes.head.weight", "aux.object_codes.head.bias"}
    batch = stage.collate(items, list(range(16)), 0, CPU)
    assert torch.equal(batch["codes"], torch.stack([object_codes_of(it) for it in items]))  # (16, 64, 7)

    def read_out_error():
        with torch.no_grad():
            return code_loss(codes.head(enc(batch["pixels"])), batch["codes"]).item()

    plain = ClipStage(trainer.model, {})
    assert plain.auxiliaries == []
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
        with pytest.raises(ValueError, match="stage option object_codes must be a weight >= 0"):
            ClipStage(trainer.model, {"object_codes": bad})


def test_understanding_object_labels_on_boxes_read_shape_and_colour_from_vision_tokens(tmp_path):
    """object_labels_at "box" (the default): each merged vision token is labelled with the (shape, colour) of
    the object whose box holds its cell centre; the loss adds the weighted read-out error; the head learns."""
    items = shapes_items(8)
    trainer = Trainer(config(tmp_path, "understanding", steps=10, stage_options={"object_labels": 2.0}), items * 10)
    stage = trainer.stage
    (labels_aux,) = stage.auxiliaries
    assert {n for n, _ in trainer.named_params} >= {"aux.object_labels.head.weight", "aux.object_labels.head.bias"}
    batch = stage.collate(items, list(range(8)), 0, CPU)
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
    inputs, visual = batch["inputs"], trainer.model.backbone.model.model.visual

    def read_out():
        with torch.no_grad():
            out = labels_aux.head(visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output)
            cells, n = batch["cell_labels"], len(CELL_SHAPES)
            return (F.cross_entropy(out[:, :n], cells[:, 0]) + F.cross_entropy(out[:, n:], cells[:, 1])).item()

    plain = UnderstandingStage(trainer.model, {})
    with torch.no_grad():
        torch.testing.assert_close(stage.loss(batch).item(), plain.loss(batch).item() + 2.0 * read_out(),
                                   rtol=1e-4, atol=1e-4)
    before = read_out()
    trainer.fit()
    assert read_out() < 0.7 * before
    with pytest.raises(ValueError, match="stage option object_labels must be a weight >= 0"):
        UnderstandingStage(trainer.model, {"object_labels": -1})


def test_understanding_object_labels_at_centres():
    """object_labels_at "centre": each object labels only the merged token of its box centre, with the code of
    `object_codes_of` (shape, colour, size, offset, position); the loss adds the code loss."""
    model = Blip3o.from_preset("nano", pretrained=False)
    items = shapes_items(8)
    stage = UnderstandingStage(model, {"object_labels": 0.5, "object_labels_at": "centre"})
    (labels_aux,) = stage.auxiliaries
    assert labels_aux.head.out_features == CENTRE_LABEL_WIDTH
    batch = stage.collate(items, list(range(8)), 0, CPU)
    assert torch.equal(batch["cell_labels"], torch.cat([object_codes_of(it, 8, 8) for it in items]))
    inputs, visual = batch["inputs"], model.backbone.model.model.visual
    with torch.no_grad():
        out = labels_aux.head(visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output)
        expected = UnderstandingStage(model, {}).loss(batch) + 0.5 * code_loss(out, batch["cell_labels"])
        torch.testing.assert_close(stage.loss(batch), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="stage option object_labels_at must be 'box' or 'centre', got 'center'"):
        UnderstandingStage(model, {"object_labels": 1.0, "object_labels_at": "center"})


def extra_turns(stage, plain, items):
    """(item, turns before the image turns, turns after them): the image turns are those drawn without the
    auxiliary's options."""
    for i, item in enumerate(items):
        base, image_at = plain.conversation(item, 0, i)
        turns, at = stage.conversation(item, 0, i)
        assert image_at == 0 and turns[at:at + len(base)] == base
        yield item, turns[:at], turns[at + len(base):]


def labels_and_loss(stage, items, row: int) -> dict:
    """A batch of `items`: row `row` is labelled with exactly its conversation's answers; the loss is finite."""
    batch = stage.collate(items, list(range(len(items))), 0, CPU)
    labelled = stage.model.backbone.tokenizer.decode([t for t in batch["labels"][row].tolist() if t != -100])
    assert labelled == "".join(a + "<|im_end|>" for _, a in stage.conversation(items[row], 0, row)[0])
    with torch.no_grad():
        assert torch.isfinite(stage.loss(batch))
    return batch


@pytest.mark.parametrize("option", ["plan", "reading", "locate", "restate"])
def test_turn_options_refuse_bad_counts(debug_model, option):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"stage option {option} must be an integer >= 0"):
            UnderstandingStage(debug_model, {option: bad})


def test_restate_and_reading_turns_follow_the_image_turns(debug_model):
    """restate = k: k text-only `the other way round?` turns; reading = k: up to k turns about the caption; both
    after the image turns, labelled like any answer, each from its own stream (one does not move the other)."""
    items = shapes_items(6, seed=3)
    plain = UnderstandingStage(debug_model, {"max_turns": 2})
    restate = UnderstandingStage(debug_model, {"max_turns": 2, "restate": 2})
    both = UnderstandingStage(debug_model, {"max_turns": 2, "restate": 2, "reading": 2})
    for (item, before, after), (_, _, after_both) in zip(extra_turns(restate, plain, items),
                                                        extra_turns(both, plain, items), strict=True):
        assert before == [] and len(after) == 2 and all(q.endswith(". the other way round?") for q, _ in after)
        reading = after_both[:-2]
        assert after_both[-2:] == after and 1 <= len(reading) <= 2
        assert all(q.startswith(item["json"]["caption"] + ". ") and a for q, a in reading)
    labels_and_loss(both, items, 1)


def test_plan_turns_ask_as_generation_does(debug_model):
    """plan = k: k text-only turns ask for a relation prompt in the generation request's words and are answered
    by its layout. They open the conversation, so the first reads token for token as the generation prompt."""
    items = shapes_items(4, seed=3)
    plain = UnderstandingStage(debug_model, {"max_turns": 2})
    stage = UnderstandingStage(debug_model, {"max_turns": 2, "plan": 2})
    for _, before, after in extra_turns(stage, plain, items):
        assert len(before) == 2 and after == []
        for text, answer in before:
            assert text.startswith(GENERATION_REQUEST) and (" left of " in answer or " above " in answer)
    batch = labels_and_loss(stage, items, 2)
    tok, turns = debug_model.backbone.tokenizer, stage.conversation(items[2], 0, 2)[0]
    text = tok.decode([t for t in batch["inputs"]["input_ids"][2].tolist() if t != tok.pad_token_id])
    prompt = GENERATION_PROMPT.format(prompt=turns[0][0].removeprefix(GENERATION_REQUEST))
    assert text.startswith(prompt + turns[0][1] + "<|im_end|>")
    image_at = text.index("<|image_pad|>")  # the image sits in the first turn after the plans
    assert text.rindex(turns[1][1], 0, image_at) > 0 and turns[2][1] in text[image_at:]


def test_locate_turns_follow_the_image_turns(debug_model):
    """locate = k: up to k `where is the X?` turns about the scene, answered from it, after the image turns."""
    items = shapes_items(6, seed=4)
    plain = UnderstandingStage(debug_model, {"max_turns": 2})
    stage = UnderstandingStage(debug_model, {"max_turns": 2, "locate": 2})
    count = 0
    for item, before, after in extra_turns(stage, plain, items):
        assert before == [] and len(after) <= 2
        objects = Scene.from_dict(item["json"]["scene"]).objects
        for text, answer in after:
            assert text.startswith("where is the ") and answer in {where(o) for o in objects}
            count += 1
    assert count >= 6
    labels_and_loss(stage, items, 0)


def test_the_recipe_understanding_options_run_through_the_stage(tmp_path):
    """nano's understanding options: every auxiliary on, a step trains, and a plain item (no scene) still works."""
    from blip3o.train.recipe import NANO_STAGES

    options = next(c for c in NANO_STAGES if c.stage == "understanding").stage_options
    items = shapes_items(3) + tiny_dataset(1)
    trainer = Trainer(config(tmp_path, "understanding", batch_size=4, stage_options=options), items)
    assert {type(a).__name__ for a in trainer.stage.auxiliaries} == {"ObjectLabels", "ShapesTurns"}
    assert torch.isfinite(torch.tensor(trainer.train_step()))
