"""Blip3o end to end on the debug preset: generate, answer, reconstruct, save/load, bad input."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o import Blip3o, get_preset
from blip3o import checkpoints as ckpt
from blip3o.cli import main as cli_main
from blip3o.images import pil_to_tensor


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Blip3o.from_preset("debug")


def test_the_issue_one_liner(model, tmp_path):
    path = tmp_path / "x.png"
    model.generate(["a red circle"], seed=0)[0].save(path)
    answers = model.answer([Image.open(path)], ["what is this?"])
    assert isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)


def test_generate_batches_and_is_seeded(model):
    images = model.generate(["a red circle", "two blue squares"], num_images=2, seed=1)
    assert len(images) == 4 and all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)
    again = model.generate(["a red circle", "two blue squares"], num_images=2, seed=1)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(images, again, strict=True))
    other = model.generate(["a red circle"], seed=2)[0]
    assert other.tobytes() != images[0].tobytes()


def test_generate_makes_any_size_the_decoder_makes(model):
    # 32 x 56 is 768 x 1344's 4:7 portrait at the debug decoder's scale (its sides are multiples of 4)
    (tall,) = model.generate(["a red circle"], height=56, width=32, seed=4)
    assert tall.size == (32, 56)  # PIL: (width, height)
    (square,) = model.generate(["a red circle"], size=32, seed=4)
    (same,) = model.generate(["a red circle"], height=32, width=32, seed=4)
    assert square.size == (32, 32) and square.tobytes() == same.tobytes()
    with pytest.raises(ValueError, match="height 30 is not a positive multiple of 4"):
        model.generate(["a red circle"], height=30, width=32)
    with pytest.raises(ValueError, match="not both"):
        model.generate(["a red circle"], size=32, width=48)


def test_reconstruct_guides_against_a_zero_image_through_the_tower(model):
    """For an image alone the original's negative is `encode_image(zeros_like(pixels))`: the normalised pixels
    zeroed (the encoder's mean colour, not black), then the tower and the pooling."""
    image = Image.new("RGB", (48, 40), (200, 30, 60))
    seen = []
    decode = model.decoder.decode

    def spy(tokens, **kwargs):
        seen.append(kwargs)
        return decode(tokens, **kwargs)

    model.decoder.decode = spy  # an instance attribute shadows the method
    try:
        (rec,) = model.reconstruct([image], height=24, width=40)
        model.reconstruct([image], guidance=1.0)
    finally:
        del model.decoder.decode
    assert rec.size == (40, 24)
    encoder = model.clip_encoder
    pixels = encoder.prepare(pil_to_tensor([image]))  # (1, 3, S, S), normalised
    with torch.no_grad():
        want = encoder.tokens(torch.zeros_like(pixels))
        black = encoder.encode(torch.zeros(1, 3, 48, 40))
    negative = seen[0]["negative"]
    assert negative.shape == (1, 64, encoder.width) and torch.equal(negative, want)
    assert negative.abs().sum() > 0 and not torch.allclose(negative, black)
    assert seen[1]["negative"] is None  # guidance 1: the conditional branch alone, no negative needed


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.int16))


@pytest.fixture(params=["euler", "stochastic"])
def sampled_by(model, request):
    """The module's model with its DiT sampler set to each of these in turn (restored after)."""
    config = model.config
    model.config = dataclasses.replace(config, sampler=request.param)
    yield model
    model.config = config


def test_per_prompt_seeds_give_each_prompt_its_solo_images(sampled_by):
    # the stochastic sampler draws each step's noise up front, group by group: batching keeps it too
    model = sampled_by
    prompts, seeds = ["a red circle", "two blue squares", "a green triangle"], [5, 6, 7]
    batched = model.generate(prompts, num_images=2, seed=seeds)
    assert len(batched) == 6
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        solo = model.generate([prompt], num_images=2, seed=seed)
        for a, b in zip(batched[2 * i:2 * i + 2], solo, strict=True):  # equal up to rounding between batch sizes
            assert (pixels(a) - pixels(b)).abs().max() <= 2
        assert (pixels(solo[0]) - pixels(solo[1])).abs().max() > 10  # a prompt's images still differ
    # one seed in a list is the plain seed, bit for bit
    one, plain = model.generate(prompts[:1], num_images=2, seed=[5]), model.generate(prompts[:1], num_images=2, seed=5)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(one, plain, strict=True))


@pytest.mark.parametrize("seed, match", [([1], "one int per prompt"), ([1, "2"], "integers"), ("12", "one int"),
                                         (1.5, "one int per prompt")])
def test_bad_seeds_are_named(model, seed, match):
    with pytest.raises(ValueError, match=match):
        model.generate(["a red circle", "a blue square"], seed=seed)


def test_a_generator_per_prompt_must_match_the_prompts(model):
    with pytest.raises(ValueError, match="one per prompt"):
        model.generate(["a red circle", "a blue square"], generator=[torch.Generator().manual_seed(0)])


def test_parts_are_named_and_backbone_frozen(model):
    for part in ("backbone", "queries", "dit", "clip_encoder", "decoder"):
        assert hasattr(model, part)
    assert model.queries.shape == (1, 64, model.config.backbone.hidden_size)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert model.queries.requires_grad and all(p.requires_grad for p in model.dit.parameters())


def test_sampled_tokens_live_in_the_encoder_space(model):
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    tokens = model.encode_images([image])
    cond = model.condition(["a red circle"])
    sampled = model.sample_tokens(cond, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == tokens.shape == (1, 64, model.config.dit.in_channels)
    (rec,) = model.reconstruct([image])
    assert isinstance(rec, Image.Image)


def test_save_load_roundtrip(model, tmp_path):
    out = model.save_pretrained(tmp_path / "ckpt")
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    loaded = Blip3o.from_pretrained(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    a = model.generate(["a red circle"], seed=3)[0]
    b = loaded.generate(["a red circle"], seed=3)[0]
    assert a.tobytes() == b.tobytes()
    q = ["what is this?"]
    img = [Image.new("RGB", (32, 32), (220, 40, 40))]
    assert model.answer(img, q) == loaded.answer(img, q)


def test_sharded_save_loads(model, tmp_path):
    out = model.save_pretrained(tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((out / ckpt.INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = Blip3o.from_pretrained(out)
    assert torch.equal(loaded.queries, model.queries)


def test_interrupted_save_keeps_previous_checkpoint(model, tmp_path, monkeypatch):
    target = model.save_pretrained(tmp_path / "ckpt")
    before = (target / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_weights", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(target)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the partial folder was removed


def test_mismatched_checkpoint_is_refused(model, tmp_path):
    out = model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    config["dit"]["num_layers"] = 3  # the weights have 2 layers
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ckpt.CheckpointError, match="missing.*layers.2"):
        Blip3o.from_pretrained(out)
    config["dit"]["num_layers"] = 2
    config["decoder"]["token_width"] = config["dit"]["in_channels"] = config["clip_encoder"]["width"] = 48
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ckpt.CheckpointError, match="wrong shape"):
        Blip3o.from_pretrained(out)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        Blip3o.from_pretrained(tmp_path)


def test_bad_input_is_named(model):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        Blip3o.from_preset("huge")
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        model.generate(["a red circle", "  "])
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a str"):
        model.generate([3])
    with pytest.raises(TypeError, match="must be a list of strings, got str"):
        model.generate("a red circle")
    with pytest.raises(ValueError, match="num_images"):
        model.generate(["a red circle"], num_images=0)
    with pytest.raises(ValueError, match="one entry .PIL image or None. per question; got 2 for 1"):
        model.answer([Image.new("RGB", (32, 32))] * 2, ["what?"])
    with pytest.raises(ValueError, match="mode 'I;16'"):
        model.answer([Image.new("I;16", (32, 32))], ["what?"])
    with pytest.raises(ValueError, match="at least 8 px"):
        model.reconstruct([Image.new("RGB", (4, 32))])
    with pytest.raises(ValueError, match="inconsistent Blip3oConfig"):
        cfg = get_preset("debug")
        type(cfg)(backbone=get_preset("nano").backbone, dit=cfg.dit, clip_encoder=cfg.clip_encoder,
                  decoder=cfg.decoder)
    with pytest.raises(ValueError, match="sampler 'ddim' is not one of euler, heun, stochastic"):
        dataclasses.replace(get_preset("debug"), sampler="ddim")
    with pytest.raises(ValueError, match=r"eta 2.0 is not in \[0, 1\]"):
        dataclasses.replace(get_preset("debug"), sampler="stochastic", eta=2.0)


def test_official_8b_builds_on_meta():
    model = Blip3o.from_preset("blip3o-8b", device="meta")
    counts = model.num_parameters()
    assert model.queries.shape == (1, 64, 3584)
    assert 1.30e9 < counts["dit"] < 1.42e9
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_cli_demo_and_errors(tmp_path, capsys):
    assert cli_main(["demo", "--model", "debug", "--outdir", str(tmp_path)]) == 0
    assert (tmp_path / "generated.png").exists()
    assert cli_main(["info", "--model", "blip3o-4b", "--meta"]) == 0
    assert "dit" in capsys.readouterr().out
    assert cli_main(["generate", "--model", "nope/not-here", "a circle"]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_changing_a_models_config_leaves_the_preset_alone():
    model = Blip3o.from_preset("debug")
    model.config.dit = dataclasses.replace(model.config.dit, cross_gate_init=0.5)
    model.config.guidance = 9.0
    fresh = get_preset("debug")
    assert fresh.dit.cross_gate_init == 0.0 and fresh.guidance != 9.0
    assert Blip3o.from_preset("debug").config.dit.cross_gate_init == 0.0


def test_decoder_negative_is_generated_from_one_space():
    """The original pipeline's negative prompt is " " without the chat template: the space's token, [IMG], the
    queries."""
    model = Blip3o.from_preset("debug").eval()
    tokenizer, backbone = model.backbone.tokenizer, model.backbone
    space = tokenizer(" ", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(space) == ["Ġ"]
    with torch.no_grad():
        ids = torch.tensor([space + [backbone.img_token_id]])
        embeds = torch.cat([backbone.model.get_input_embeddings()(ids), model.queries], dim=1)
        want = backbone.model.model.language_model(inputs_embeds=embeds).last_hidden_state[:, -64:]
        got = backbone.negative_condition(model.queries)
        empty = backbone._hidden_at_queries([""], model.queries)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, empty)  # the one space is read


def test_decoder_negative_cache_follows_sampling_settings_and_weights():
    torch.manual_seed(0)
    model = Blip3o.from_preset("debug").eval()
    with torch.no_grad():
        for p in model.dit.parameters():  # open the zero-initialised gates and output: the DiT's tokens move
            if not p.any():
                p.normal_(0, 0.02)
    first = model.negative_tokens(None, None)
    assert model.negative_tokens(None, None) is first  # kept while nothing it depends on changes
    model.config.sampler = "heun"
    heun = model.negative_tokens(None, None)
    assert heun is not first and not torch.equal(heun, first)
    model.config.sampler = "euler"
    again = model.negative_tokens(None, None)
    assert torch.equal(again, first)
    with torch.no_grad():
        model.dit.layers[0].feed_forward.linear_2.weight.mul_(1.5)  # an in-place weight update
    updated = model.negative_tokens(None, None)
    assert not torch.equal(updated, first)
    with torch.no_grad():
        model.queries.add_(0.1)
    assert not torch.equal(model.negative_tokens(None, None), updated)
