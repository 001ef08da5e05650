"""The generation objective against the original's training, written from its rules: the closed-turn training
sequence token by token, the scheduler-grid sigmas replayed into the noisy input and the time embedding, and the
loss and gradients of `generation_loss` on a converted official folder against the formula."""

import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

import blip3o.dit
from blip3o import Blip3o, get_preset
from blip3o.config import Blip3oConfig
from blip3o.flow import grid_times, scheduler_sigmas
from blip3o.train.objective import GenerationDraws, draw_generation, generation_loss
from blip3o.train.stages import GenerationStage
from test_official_checkpoint import DIT, official_dir, parts  # noqa: F401  (fixtures: a tiny official folder)
from train_helpers import tiny_dataset

CAPTIONS = ["a red circle", "two blue squares left of a green cross", "a cyan triangle"]
SCHEDULER = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)  # the original's
REPLAYED = torch.tensor([999, 489, 500, 0])  # grid indices of sigma 0.001, 0.511, 0.5, 1.0


def written_layout(tokenizer, caption: str, num_queries: int = 64) -> list[int]:
    """The original's training sequence from its rules: each message rendered by its chat template and tokenized
    alone (system, the user's request, the assistant's message emptied), then [IMG] and one <image> per query."""
    messages = [("system", "You are a helpful assistant."),
                ("user", f"Please generate image based on the following caption: {caption}"), ("assistant", "")]
    ids = [i for role, text in messages
           for i in tokenizer(f"<|im_start|>{role}\n{text}<|im_end|>\n", add_special_tokens=False).input_ids]
    return ids + tokenizer.convert_tokens_to_ids(["[IMG]"] + ["<image>"] * num_queries)


def closed_turn(preset: str = "debug") -> Blip3o:
    model = Blip3o.from_preset(preset).eval()
    model.config = dataclasses.replace(model.config, train_layout="closed_turn", train_timesteps="scheduler_grid",
                                       dit=dataclasses.replace(model.config.dit, quantize_timesteps=True))
    model.dit.config = model.config.dit
    return model


@pytest.fixture(scope="module")
def official(official_dir):  # noqa: F811
    return Blip3o.from_pretrained(official_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("which", ["builtin", "official"])
def test_training_sequence_is_the_originals_layout_token_by_token(which, request):
    model = closed_turn() if which == "builtin" else request.getfixturevalue("official")
    tokenizer = model.backbone.tokenizer
    ids, mask, slots = model.backbone.training_sequence(CAPTIONS, 64)
    rows = [written_layout(tokenizer, c) for c in CAPTIONS]
    assert ids.shape == mask.shape == slots.shape == (3, max(map(len, rows)))
    assert tokenizer.pad_token == "<|endoftext|>"
    for b, row in enumerate(rows):
        n, padding = len(row), ids.shape[1] - len(row)
        assert ids[b].tolist() == row + [tokenizer.pad_token_id] * padding  # right padded
        assert mask[b].tolist() == [1] * n + [0] * padding
        assert slots[b].nonzero()[:, 0].tolist() == list(range(n - 64, n))  # the 64 slots right after [IMG]
    assert ids[1].tolist() == rows[1]  # the longest caption has no padding
    if which == "builtin":  # (the official fixture's word-level tokenizer does not decode to the text)
        text = tokenizer.decode(ids[0][: len(rows[0]) - 64])
        assert text.endswith("caption: a red circle<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n[IMG]")


def test_replayed_sigmas_reach_the_noisy_input_and_the_time_embedding_unrounded(monkeypatch):
    sigmas = SCHEDULER.sigmas[REPLAYED]
    assert torch.equal(sigmas, torch.tensor([0.001, 0.511, 0.5, 1.0]))
    assert torch.equal(scheduler_sigmas(), SCHEDULER.sigmas)
    assert torch.equal(1000 * scheduler_sigmas(), SCHEDULER.timesteps)
    model, g = closed_turn(), torch.Generator().manual_seed(0)
    times, inputs, features = [], [], blip3o.dit.timestep_features
    monkeypatch.setattr(blip3o.dit, "timestep_features", lambda t, *a: times.append(t.clone()) or features(t, *a))
    model.dit.patch_embedder.proj.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    pixels, noise = torch.rand(4, 3, 32, 32, generator=g), torch.randn(4, 64, 32, generator=g)
    draws = GenerationDraws(noise, sigmas, torch.ones(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))
    with torch.no_grad():
        generation_loss(model, CAPTIONS + ["a purple cross"], pixels, draws)
        x_0 = model.clip_encoder.encode(pixels)
    s = sigmas.view(-1, 1, 1)
    assert torch.equal(inputs[0], (1 - s) * x_0 + s * noise)
    received = 1000 * times[0].float()  # what the embedding's sinusoids read (timestep_features scales by 1000)
    assert torch.equal(received, SCHEDULER.timesteps[REPLAYED])  # 1, 510.99997, 500, 1000: the original's values
    assert received[1].item() == pytest.approx(510.99997, abs=1e-5)
    # sampling floors them as the original's inference does; training does not
    assert (1000 * model.dit.network_time(sigmas)).tolist() == [1.0, 510.0, 500.0, 1000.0]


def test_the_sampler_draws_on_the_grid_from_the_same_streams():
    grid = set(SCHEDULER.sigmas.tolist())
    drawn = draw_generation(2000, get_preset("debug").dit, "scheduler_grid", generator=torch.Generator().manual_seed(0))
    assert set(drawn.t.tolist()) <= grid and len(set(drawn.t.tolist())) > 800
    u = torch.rand(5000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(grid_times(u), SCHEDULER.sigmas[(u * 1000).long()])
    data = tiny_dataset(8)
    grid_batch = GenerationStage(closed_turn(), {}).collate(data, list(range(8)), 0, torch.device("cpu"))
    plain = GenerationStage(Blip3o.from_preset("debug"), {}).collate(data, list(range(8)), 0, torch.device("cpu"))
    assert set(grid_batch["t"].tolist()) <= grid
    assert torch.equal(grid_batch["t"], grid_times(plain["t"]))  # the same uniform draw, taken to the grid
    for key in ("x_1", "keep", "self_condition"):
        assert torch.equal(grid_batch[key], plain[key])


def formula_condition(model: Blip3o, queries: torch.Tensor, caption: str) -> torch.Tensor:
    """One caption's condition (1, 64, H): its written-out training sequence alone, unpadded, the queries in its
    slots, through the language model."""
    lm = model.backbone.model.model.language_model
    prefix = written_layout(model.backbone.tokenizer, caption)[:-64]
    embeds = torch.cat([lm.embed_tokens(torch.tensor([prefix])), queries], dim=1)  # (1, n + 64, H)
    return lm(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -64:]


def formula_velocity(parts, x_t: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # noqa: F811
    """The original's DiT call in training on diffusers' Lumina-Next (the folder's own weights): timestep 1000 sigma
    as a float."""
    b, c = x_t.shape[0], x_t.shape[2]
    out = parts.dit(hidden_states=x_t.transpose(1, 2).reshape(b, c, 8, 8), timestep=1000 * sigma,
                    encoder_hidden_states=parts.projection(cond), encoder_mask=torch.ones(b, cond.shape[1]),
                    image_rotary_emb=get_2d_rotary_pos_embed_lumina(DIT["hidden_size"] // DIT["num_attention_heads"],
                                                                    384, 384),
                    cross_attention_kwargs={}).sample
    return out.flatten(2).transpose(1, 2)  # (B, 64, C)


def test_loss_and_gradients_are_the_formulas_on_an_official_folder(official, parts):  # noqa: F811
    model, g = official, torch.Generator().manual_seed(0)
    assert model.config.dit.quantize_timesteps  # as converted: sampling floors, training must not
    model.requires_grad_(False)
    model.queries.requires_grad_(True)
    model.dit.requires_grad_(True)
    pixels, noise = torch.rand(3, 3, 64, 64, generator=g), torch.randn(3, 64, 32, generator=g)
    draws = GenerationDraws(noise, SCHEDULER.sigmas[REPLAYED[:3]], torch.tensor([True, False, True]),
                            torch.zeros(3, dtype=torch.bool))
    loss = generation_loss(model, CAPTIONS, pixels, draws)
    loss.backward()

    queries = model.queries.detach().clone().requires_grad_(True)
    reference = [parts.dit, parts.projection]
    for module in reference:
        module.zero_grad(set_to_none=True)
    with torch.no_grad():
        x_0 = model.clip_encoder.encode(pixels)
    cond = torch.cat([formula_condition(model, queries, c) for c in CAPTIONS]) * draws.keep.view(-1, 1, 1)
    s = draws.t.view(-1, 1, 1)
    v = formula_velocity(parts, (1 - s) * x_0 + s * noise, draws.t, cond)
    expected = torch.mean((v.float() - (noise - x_0).float()) ** 2)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(model.queries.grad, queries.grad, rtol=1e-4, atol=1e-7)
    theirs = {**{f"caption_projection.{k}": p for k, p in parts.projection.named_parameters()},
              **dict(parts.dit.named_parameters())}
    for name, p in model.dit.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-7, msg=name)
    assert model.queries.grad.abs().sum() > 0 and model.dit.layers[0].gate.grad.abs().sum() > 0
    for module in reference:
        module.zero_grad(set_to_none=True)


def test_official_presets_and_folders_train_as_the_original_and_the_shapes_presets_do_not(official):
    for config in (get_preset("blip3o-8b"), get_preset("blip3o-4b"), official.config):
        assert (config.train_layout, config.train_timesteps) == ("closed_turn", "scheduler_grid")
    for config in (get_preset("nano"), Blip3o.from_preset("nano").config):  # the shipped folder names neither
        assert (config.train_layout, config.train_timesteps) == ("generation_prompt", "uniform")
    with pytest.raises(ValueError, match="train_layout 'open' is not one of generation_prompt, closed_turn"):
        dataclasses.replace(get_preset("debug"), train_layout="open")
    with pytest.raises(ValueError, match="train_timesteps 'logit_normal' is not one of uniform, scheduler_grid"):
        dataclasses.replace(get_preset("debug"), train_timesteps="logit_normal")
    saved = Blip3oConfig.from_dict(get_preset("blip3o-8b").to_dict())
    assert (saved.train_layout, saved.train_timesteps) == ("closed_turn", "scheduler_grid")
