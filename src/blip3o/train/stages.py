"""The four training stages of the recipe; each names what it trains and freezes the rest.

    clip           the CLIP encoder (+ a text tower kept only for training), sigmoid contrastive
    understanding  the backbone, next-token loss on answers and captions in the chat template
    decoder        the decoder: frozen encoder tokens -> pixels (its own diffusion loss)
    generation     queries + DiT: flow matching on the frozen encoder's tokens, backbone frozen

A dataset item is {"image": PIL.Image, "json": dict} (the Shapes shards' layout: `prompts`,
`questions`, `caption`; or `text` for plain image-text shards). All randomness of a
sample comes from `sample_generator(seed, index)`.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from blip3o.backbone import GENERATION_REQUEST
from blip3o.flow import call_times, sample, sample_path, sample_t
from blip3o.images import pil_to_tensor
from blip3o.model import Blip3o
from blip3o.shapes.questions import (
    locate_questions,
    more_questions,
    plan_questions,
    reading_questions,
    restate_questions,
)
from blip3o.shapes.world import COLORS, SHAPES, Scene

CAPTION_REQUEST = "describe the image."


def sample_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """The generator that owns all randomness of global sample `index` of a run. An option added later
    draws from its own `stream` (> 0), so runs without it draw exactly as before."""
    key = seed * 1_000_003 + index
    return torch.Generator().manual_seed((key if stream == 0 else key * 31 + stream) % (2**63 - 1))


def captions_of(item: dict) -> list[str]:
    meta = item.get("json") or {}
    caps = [meta["caption"]] if meta.get("caption") else []
    caps += [p["prompt"] for p in meta.get("prompts", [])]
    if meta.get("text"):  # plain image-text shards (txt member)
        caps.append(meta["text"])
    if not caps:
        raise ValueError("sample has no caption, prompt or text to train on")
    return caps


def int_option(options: dict, name: str, default: int, *, minimum: int) -> int:
    """A stage option that must be an integer >= minimum (bools are refused); `default` when absent."""
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"stage option {name} must be an integer >= {minimum}, got {value!r}")
    return value


def share_option(options: dict, name: str) -> float | None:
    """A stage option that must be a share in [0, 1]; None when absent."""
    value = options.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"stage option {name} must be a share in [0, 1], got {value!r}")
    return float(value)


def weight_option(options: dict, name: str, default: float = 0.0) -> float:
    """A stage option that must be a loss weight >= 0 (bools and NaN are refused); `default` when absent."""
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"stage option {name} must be a weight >= 0, got {value!r}")
    return float(value)


class Stage:
    name = ""
    trains: tuple[str, ...] = ()  # attributes of Blip3o this stage trains

    def __init__(self, model: Blip3o, options: dict) -> None:
        self.model = model
        self.options = dict(options)

    def trainable(self, model: Blip3o) -> list[tuple[str, nn.Parameter]]:
        """Freeze every part but `trains` (frozen parts also go to eval mode); return what trains."""
        model.requires_grad_(False)
        for part in ("backbone", "dit", "clip_encoder", "decoder"):
            getattr(model, part).train(part in self.trains).requires_grad_(part in self.trains)
        model.queries.requires_grad_("queries" in self.trains)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return named + [(f"aux.{n}", p) for n, p in self.aux_parameters()]

    def aux_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return []

    def prepare(self, dataset) -> None:
        """Called once before training (and again on resume) with the whole dataset."""

    def collate(self, items: list[dict], indices: list[int], seed: int, device: torch.device) -> dict:
        raise NotImplementedError

    def loss(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------- generation


def complete_texts(item: dict) -> list[str]:
    """Texts that describe the whole image: the Shapes prompt a scene was drawn for and its caption
    (plain image-text shards: their text). Generation trains on these, so that every object of the
    target is named by the condition; prompts a random scene merely satisfies would leave the
    target mostly unexplained by the text and teach the DiT to ignore its condition."""
    meta = item.get("json") or {}
    texts = [meta["prompt"]["prompt"]] if meta.get("prompt") else []
    texts += [meta["caption"]] if meta.get("caption") else []
    return texts or captions_of(item)


def generation_text(item: dict, seed: int, index: int, prompt_share: float | None = None) -> str:
    """The text a generation-stage sample is conditioned on (one of its complete texts, fixed by seed
    and index); the decoder's `dit_tokens` redraw uses the same one.

    `prompt_share` = p (stage option, default None: each complete text equally likely): a sample drawn
    for a GenEval prompt is conditioned on that prompt with probability p, on its caption otherwise.
    With data written prompt-first (`blip3o data shapes --prompt-first 1`), p > 0.5 oversamples the
    prompt forms the evaluation asks for."""
    rng, texts = random.Random(seed * 7919 + index), complete_texts(item)
    if prompt_share is None or len(texts) < 2 or not (item.get("json") or {}).get("prompt"):
        return rng.choice(texts)
    return texts[0] if rng.random() < prompt_share else rng.choice(texts[1:])


WHITENING_IMAGES = 2048  # images whose tokens fit the DiT's token whitening (131k token vectors)


class GenerationStage(Stage):
    """Backbone frozen; the queries and the DiT learn to flow from noise to the encoder's tokens.

    Stage option `draws` = K (default 1): each sample's condition and target serve K path samples,
    each with its own time, noise and CFG drop. The frozen backbone's forward and backward (to the
    queries) runs once per prompt and the DiT trains on K x the batch: on a 2-core CPU the nano backbone's
    forward and backward take 0.26 s and the DiT's 0.21 s at batch 32 (0.85 s at 128), so K = 4 gives 4x
    the DiT's samples for ~2.4x the time. Per second it trains a worse DiT (nano, 640 steps at K = 4 against 1500
    at K = 1 in the same time: 0.08 against 0.22 at guidance 7): more prompts beat more draws of the same ones.

    Stage option `self_condition_rate` (default 0.5), for a DiT built with `self_condition=True`: the share
    of path samples that read the DiT's own clean estimate from a first, gradient-free pass (the rest read
    zeros, as the first sampling step does).

    Stage option `code_loss` = w (default 0; Shapes scenes): w times the object-code loss (`code_loss`: each
    cell's shape or none, each centre's colour, size and offset) of a frozen linear read-out applied to the
    DiT's clean estimate. Which named object sits where is worth little of the token MSE while the layout
    is still uncertain (for two-object prompts the order of the names explains 0.5% of the token variance,
    docs/training.md, session 12); cross-entropy on the read-out weighs a cell's shape as much as its
    presence. The read-out is fitted once, before training, on the frozen encoder's tokens of the first
    CODE_FIT_IMAGES samples (deterministic: every rank and a resumed run fit the same one).
    """

    name, trains = "generation", ("queries", "dit")

    def __init__(self, model: Blip3o, options: dict) -> None:
        super().__init__(model, options)
        self.draws = int_option(self.options, "draws", 1, minimum=1)
        self.prompt_share = share_option(self.options, "prompt_share")
        self.code_weight = weight_option(self.options, "code_loss")
        self.code_head: nn.Linear | None = None

    def prepare(self, dataset) -> None:
        self.fit_whitening(dataset)
        if self.code_weight > 0:
            self.code_head = fit_code_head(self.model, dataset)

    def fit_whitening(self, dataset) -> None:
        """Fit the DiT's token whitening (DiTConfig.token_whitening) on the frozen encoder's tokens of the
        first WHITENING_IMAGES samples, unless the DiT already carries a fitted one. Deterministic, so every
        rank, and a resumed run, fits the same transform."""
        white = self.model.dit.token_whitening
        if white is None or white.is_fitted:
            return
        white.fit(encode_first(self.model, dataset, WHITENING_IMAGES)[0])

    def collate(self, items, indices, seed, device):
        c, k = self.model.config.dit, self.draws
        prompts, x_1, t, keep, self_cond = [], [], [], [], []
        for item, i in zip(items, indices, strict=True):
            g = sample_generator(seed, i)
            prompts.append(generation_text(item, seed, i, self.prompt_share))
            x_1.append(torch.randn(k, c.num_tokens, c.in_channels, generator=g))
            t.append(sample_t(k, self.options.get("time_sampling", "uniform"), generator=g))
            keep.append(torch.rand(k, generator=g) >= self.options.get("condition_drop", 0.1))
            # drawn after the others, so runs without self-conditioning draw exactly as before
            self_cond.append(torch.rand(k, generator=g) < self.options.get("self_condition_rate", 0.5))
        codes = {}
        if self.code_head is not None:  # the read-out's targets
            codes["codes"] = torch.stack([object_codes_of(it) for it in items]).to(device)  # (B, 64, 7)
        return codes | {
            "prompts": prompts,
            "pixels": pil_to_tensor([it["image"] for it in items]).to(device),
            "x_1": torch.cat(x_1).to(device),  # (B K, 64, C), a sample's K draws consecutive
            "t": torch.cat(t).to(device),  # (B K,)
            "keep": torch.cat(keep).to(device),  # (B K,) False = condition dropped (CFG)
            "self_condition": torch.cat(self_cond).to(device),  # (B K,) read a first pass's estimate
        }

    def loss(self, batch):
        model = self.model
        x_0 = model.dit.to_model_space(model.clip_encoder.encode(batch["pixels"]))  # (B, 64, C) targets
        x_0 = x_0.repeat_interleave(self.draws, 0)  # (B K, 64, C)
        cond = model.condition(batch["prompts"])  # (B, 64, H), gradients reach the queries
        cond = cond.repeat_interleave(self.draws, 0) * batch["keep"].view(-1, 1, 1).to(cond.dtype)
        path = sample_path(x_0, batch["x_1"].to(x_0.dtype), batch["t"])
        if self.code_head is None:
            return model.dit.loss(path, cond, batch["self_condition"])
        loss, estimate = model.dit.loss(path, cond, batch["self_condition"], with_estimate=True)
        read = self.code_head(model.dit.to_tokens(estimate).float())  # (B K, 64, CODE_WIDTH)
        return loss + self.code_weight * code_loss(read, batch["codes"].repeat_interleave(self.draws, 0))


def encode_first(model: Blip3o, dataset, n: int) -> tuple[torch.Tensor, list[dict]]:
    """The frozen encoder's tokens (fp32) of the first n samples (fewer if the dataset is smaller), in
    chunks of 128, and those samples."""
    items = [dataset[i] for i in range(min(len(dataset), n))]
    with torch.no_grad():
        tokens = [model.clip_encoder.encode(pil_to_tensor([it["image"] for it in items[s:s + 128]]).to(model.device))
                  for s in range(0, len(items), 128)]
    return torch.cat(tokens).float(), items


CODE_FIT_IMAGES, CODE_FIT_STEPS = 2048, 300  # the generation stage's frozen object-code read-out (`code_loss`)


def fit_code_head(model: Blip3o, dataset) -> nn.Linear:
    """A linear read-out of the object codes (`code_loss`) from the frozen encoder's tokens of the first
    CODE_FIT_IMAGES samples: full-batch Adam from a seeded start, so the same data gives the same head.
    Frozen (no gradient to its weights; the DiT's estimate gets one through it)."""
    tokens, items = encode_first(model, dataset, CODE_FIT_IMAGES)
    codes = torch.stack([object_codes_of(it) for it in items]).to(model.device)
    if not bool((codes[..., 0] >= 0).any()):
        raise ValueError("stage option code_loss needs Shapes scenes (json `scene`); the data has none")
    head = nn.Linear(tokens.shape[-1], CODE_WIDTH).to(model.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    opt = torch.optim.Adam(head.parameters(), lr=0.03)
    with torch.enable_grad():
        for _ in range(CODE_FIT_STEPS):
            opt.zero_grad()
            code_loss(head(tokens), codes).backward()
            opt.step()
    return head.requires_grad_(False)


# ---------------------------------------------------------------------------- decoder


class DecoderStage(Stage):
    """The decoder learns pixels from the frozen encoder's tokens (its own loss and noise).

    Stage option `token_noise` (default 0): each sample's tokens get Gaussian noise of a standard
    deviation drawn uniformly from [0, token_noise] (noise-conditioning augmentation, as in cascaded
    diffusion). At generation time the decoder sees the DiT's tokens, which are never exactly on the
    encoder's manifold; a decoder trained on exact tokens turns small token errors (RMS 0.05) into
    broken shapes, one trained with this augmentation draws the clean image they are closest to.

    Stage option `dit_tokens` = p (default 0): a share p of the samples are read through the frozen DiT
    instead: their tokens noised to a time drawn from `dit_from` (default [0.3, 0.7]; one per batch) and
    sampled back with one of the image's complete texts (`dit_steps` Euler steps, default 8, at the
    model's guidance). The decoder then learns to draw the real image from tokens with the DiT's own
    kind of error (shapes between two codes, a wrong size), rather than only isotropic noise. It needs a
    trained DiT and queries, so a stage with it runs after the generation stage.
    """

    name, trains = "decoder", ("decoder",)

    def __init__(self, model: Blip3o, options: dict) -> None:
        super().__init__(model, options)
        self.dit_share = share_option(self.options, "dit_tokens") or 0.0
        lo, hi = self.options.get("dit_from", (0.3, 0.7))
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"stage option dit_from must be [lo, hi] with 0 < lo <= hi <= 1, got {[lo, hi]}")
        self.dit_from = (float(lo), float(hi))
        self.dit_steps = int_option(self.options, "dit_steps", 8, minimum=1)
        self.prompt_share = share_option(self.options, "prompt_share")  # the redraw's texts, as the generation stage's

    def collate(self, items, indices, seed, device):
        g = sample_generator(seed, indices[0])
        c = self.model.config.dit
        sigma = torch.rand(len(items), 1, 1, generator=g) * self.options.get("token_noise", 0.0)
        batch = {"pixels": pil_to_tensor([it["image"] for it in items]).to(device),
                 "token_noise": (sigma * torch.randn(len(items), c.num_tokens, c.in_channels, generator=g)).to(device),
                 "generator": g}
        if self.dit_share > 0:  # drawn from streams of their own: runs without the option are unchanged
            use, prompts, x_1 = [], [], []
            for item, i in zip(items, indices, strict=True):
                gi = sample_generator(seed, i, stream=1)
                use.append(bool(torch.rand((), generator=gi) < self.dit_share))
                x_1.append(torch.randn(c.num_tokens, c.in_channels, generator=gi))
                prompts.append(generation_text(item, seed, i, self.prompt_share))
            lo, hi = self.dit_from
            first = sample_generator(seed, indices[0], stream=2)
            batch.update(dit=torch.tensor(use, device=device), dit_prompts=prompts, dit_x_1=torch.stack(x_1).to(device),
                         dit_from=lo + (hi - lo) * torch.rand((), generator=first).item())
        return batch

    def loss(self, batch):
        tokens = self.model.clip_encoder.encode(batch["pixels"])
        noisy = tokens + batch["token_noise"].to(tokens.dtype)
        if "dit" in batch and batch["dit"].any():
            use = batch["dit"]
            prompts = [p for p, u in zip(batch["dit_prompts"], use.tolist(), strict=True) if u]
            redrawn = self.dit_redraw(tokens[use], prompts, batch["dit_x_1"][use], batch["dit_from"])
            noisy = noisy.clone()  # the frozen encoder's output: no graph to keep
            noisy[use] = redrawn.to(noisy.dtype)
        return self.model.decoder.loss(noisy, batch["pixels"], generator=batch["generator"])

    @torch.no_grad()
    def dit_redraw(self, tokens: torch.Tensor, prompts: list[str], x_1: torch.Tensor, t_0: float) -> torch.Tensor:
        """The frozen DiT's version of real tokens (SDEdit): noise them to t_0, then sample back to 0 with
        the text, `dit_steps` Euler steps at the model's guidance. What the decoder sees at generation time:
        tokens that say the scene, with the DiT's kind of error."""
        model, dit = self.model, self.model.dit
        x_t = (1 - t_0) * dit.to_model_space(tokens) + t_0 * x_1.to(tokens.dtype)
        times = [t_0 * (1 - k / self.dit_steps) for k in range(self.dit_steps + 1)]
        velocity = dit.sampling_velocity(model.condition(prompts), model.config.guidance, times=call_times(times))
        return dit.to_tokens(sample(velocity, x_t, times))


# ---------------------------------------------------------------------------- understanding


class UnderstandingStage(Stage):
    """Next-token loss on the answers (and their end tokens) of a conversation about one image.

    A conversation is up to `max_turns` (stage option, default 1) of the image's questions and its
    caption request, in random order, the image in the first user turn: LLaVA-style multi-turn data,
    which gives several answers per image forward. Every assistant turn is a target.

    Stage option `object_labels` (default 0) weighs an extra loss for scenes with a `scene` in their
    json (the Shapes shards): a linear head (kept only for training) reads, from each of the vision
    tower's merged tokens, the shape and the colour of the object whose box holds the token's cell
    centre (or "none"). Without it the tokens say colour clearly but shape only weakly (a probe reads
    the shape of 61% of object cells, 4 classes): attention can find objects by colour but not by
    shape, and "how many circles?" or "is the circle left of the square?" stay at the majority answer.
    Our vision tower starts from nothing, where Qwen2.5-VL's comes pretrained; this is its pretraining.
    Measured (docs/training.md, session 6): the probe then reads shape at 0.99, but count and position
    accuracy do not move (the LLM still answers "one" and "yes").

    Stage option `object_labels_at` = "box" (default, as above) or "centre": each object is labelled on
    the one merged token whose cell holds its box centre only, with its shape, colour, size, offset in
    the cell and centre in the image (`object_codes_of`); every other cell reads "none". Objects then
    become single tokens that can be counted, and their positions can be compared, without first
    grouping the 2 x 2 to 3 x 3 cells each one covers. Measured (session 7, the recipe's stage, weight
    1): VQA 0.961 against 0.840 (count 0.94 against 0.67, colour 1.0 against 0.72); nano uses it.
    Training the tower first on that read-out alone (no language model; 400 steps of batch 32, 0.66 s a step,
    `scripts/diagnostics/vision_first.py`) does not speed the stage up: the recipe's 1000 steps from such a
    tower reach VQA 0.727 against 0.734 (session 22). The language model's reading is what takes the steps.

    Stage option `reading` = k (default 0) adds up to k text-only turns to each conversation: the
    image's caption followed by a question answered from that text alone (`shapes.reading_questions`:
    relations, their converses, counts, colours, shapes). The stage's image questions leave position
    at the majority answer, so the relation words' (tied) embeddings collapse onto one another and the
    frozen backbone's generation condition barely tells `above` from `below`; these turns teach the
    words' meaning from text (docs/training.md, session 9).

    Stage option `locate` = k (default 0) adds up to k turns `where is the {shape}?` -> `top left`, ...,
    `centre`, ... (`shapes.locate_questions`): one object's absolute position, a first-order lookup
    that comes before the position questions' comparison of two objects (session 11).

    Stage option `restate` = k (default 0) adds k text-only turns `{A rel B}. the other way round?` ->
    `{B converse A}` (`shapes.restate_questions`). The answer's relation word follows from the question's
    alone, so the language model must carry what that word says, which nothing else in the stage asks of
    it: the relation questions are yes/no and stay at the majority answer, and without these turns the
    generation condition of `a square left of a circle` differs from `right of` by 4% (session 15).

    Stage option `plan` = k (default 0) adds k text-only turns that ask for a relation prompt exactly as
    generation does (`Please generate image based on the following caption: a photo of a square below a
    circle`) and are answered by its layout in reading order, the shape drawn left or on top first
    (`circle above square`; `shapes.plan_questions`). They open the conversation, before the image turn,
    so the first one reads token for token as the generation prompt (system, request, assistant header)
    and its first answer word is predicted at the very token the condition's `[IMG]` and queries follow:
    the backbone must work out there which named shape goes where, what `right of` and `below` prompts
    need and restate alone left weak (session 16). Asked after the image turns instead, they were learned
    in that place only (first shape 0.66 there, 0.06 after a single image turn).

    Stage option `questions` = k (default 0) adds up to k more of the scene's image questions
    (`shapes.more_questions`: the six types in turn, none already in the conversation), placed at random
    among its image turns: more one-word answers per image forward. Off in nano: measured (session 20),
    8 more questions make a step 1.45x longer (a question turn is ~15 tokens for a 2-token answer, so the
    answer tokens per second even fall), and at the recipe's time (680 steps; with `loss_per` "turn")
    VQA fell to 0.535 against 0.734: the stage learns by the images it sees, not the answers.

    Stage option `loss_per` = "token" (default) or "turn": how a conversation's answer loss is averaged.
    Per token, the caption (about 30 tokens) outweighs every one-word answer of the conversation
    together (2 tokens each, its word and `<|im_end|>`); per turn, each answer's mean counts once.
    Off in nano: measured (session 20, the recipe's stage otherwise), VQA 0.649 against 0.734, colour
    0.62 against 0.97. A likely reason (not isolated): the caption cannot be predicted without looking at
    every object, while one-word answers can first be fitted from their priors (yes/no, zero).

    Stage option `text_weight` = w (default 1): each answer token of a text-only turn (`plan`, `reading`,
    `restate`: answered from its own words, not the image) weighs w in its conversation's weighted mean, an
    image turn's 1. With nano's `plan` 2 and `restate` 2 those turns hold 55.5% of a conversation's answer
    tokens (24.0 a conversation against 19.2 for its image answers, 256 conversations of the recipe's shards),
    so at w = 1 more than half of the stage's loss is text the image does not help with (session 21). Off in
    nano: measured (session 21, the recipe's stage otherwise), w = 0.25 gave VQA 0.658 against 0.734 (colour
    0.58 against 0.97); 1500 steps at w = 1 gave 0.864: the stage needs more steps, not a different weighting.

    Stage option `freeze_language` (default false): only the vision tower and its merger train; the
    language model (embeddings, layers, norm, lm_head) stays frozen. The generation condition reads
    text alone through the language model, so it stays bit-identical, and a trained DiT keeps working:
    understanding can be improved after generation without retraining it (session 14).
    """

    name, trains = "understanding", ("backbone",)

    def __init__(self, model, options):
        super().__init__(model, options)
        self.object_labels = float(options.get("object_labels", 0.0))
        if self.object_labels < 0:
            raise ValueError(f"object_labels must be >= 0, got {self.object_labels}")
        self.labels_at = options.get("object_labels_at", "box")
        if self.labels_at not in ("box", "centre"):
            raise ValueError(f"object_labels_at must be 'box' or 'centre', got {self.labels_at!r}")
        self.reading = int_option(options, "reading", 0, minimum=0)
        self.locate = int_option(options, "locate", 0, minimum=0)
        self.restate = int_option(options, "restate", 0, minimum=0)
        self.plan = int_option(options, "plan", 0, minimum=0)
        self.questions = int_option(options, "questions", 0, minimum=0)
        self.text_weight = weight_option(options, "text_weight", 1.0)
        self.loss_per = options.get("loss_per", "token")
        if self.loss_per not in ("token", "turn"):
            raise ValueError(f"stage option loss_per must be 'token' or 'turn', got {self.loss_per!r}")
        self.freeze_language = options.get("freeze_language", False)
        if not isinstance(self.freeze_language, bool):
            raise ValueError(f"stage option freeze_language must be true or false, got {self.freeze_language!r}")
        self.object_head = None
        if self.object_labels:
            width = len(CELL_SHAPES) + len(CELL_COLORS) if self.labels_at == "box" else CENTRE_LABEL_WIDTH
            self.object_head = nn.Linear(model.backbone.hidden_size, width).to(model.device)

    def trainable(self, model):
        named = super().trainable(model)
        if not self.freeze_language:
            return named
        vision = {id(p) for p in model.backbone.model.model.visual.parameters()}
        for p in model.backbone.parameters():
            p.requires_grad_(id(p) in vision)
        return [(n, p) for n, p in named if p.requires_grad]

    def aux_parameters(self):
        head = self.object_head.named_parameters() if self.object_head is not None else []
        return [(f"object_head.{n}", p) for n, p in head]

    def collate(self, items, indices, seed, device):
        backbone = self.model.backbone
        texts, conversations, images, texts_only = [], [], [], []
        for item, i in zip(items, indices, strict=True):
            turns, text_only = self.turns(item, random.Random(seed * 7919 + i))
            texts_only.append(text_only)
            messages = []
            # the image comes with the first turn about it; `plan` turns go before it, so the first one
            # reads exactly as the generation prompt does up to where its [IMG] and queries follow
            for k, (question, answer) in enumerate(turns):
                content = [{"type": "image"}, {"type": "text", "text": question}] if k == self.plan else question
                messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
            texts.append(backbone.tokenizer.apply_chat_template(messages, tokenize=False))
            conversations.append([answer for _, answer in turns])
            images.append(item["image"])
        inputs = backbone.processor(text=texts, images=images, padding=True, padding_side="left",
                                    return_tensors="pt")
        inputs["labels"], turns = self.answer_labels(inputs["input_ids"], conversations)
        if self.loss_per == "turn":
            inputs["label_turns"] = turns
        if self.text_weight != 1.0:  # each labelled token's weight: its turn's (text_weight if text-only), else 1
            per_turn = [torch.tensor([self.text_weight if t else 1.0 for t in text_only]) for text_only in texts_only]
            inputs["label_weights"] = torch.stack([
                torch.where(row >= 0, w[row.clamp_min(0)], 1.0) for row, w in zip(turns, per_turn, strict=True)])
        if self.object_head is not None:
            merge = self.model.backbone.config.spatial_merge_size
            labels_of = cell_labels if self.labels_at == "box" else object_codes_of
            inputs["cell_labels"] = torch.cat([
                labels_of(item, int(h) // merge, int(w) // merge)
                for item, (_, h, w) in zip(items, inputs["image_grid_thw"].tolist(), strict=True)])
        return dict(inputs.to(device))

    def pick(self, item: dict, rng: random.Random) -> list[tuple[str, str]]:
        """The (question, answer) turns of one conversation: `max_turns` of the image's pairs, shuffled."""
        return self.turns(item, rng)[0]

    def turns(self, item: dict, rng: random.Random) -> tuple[list[tuple[str, str]], list[bool]]:
        """`pick`'s turns, and for each whether it is text-only (`plan`, `reading`, `restate`: answered
        from its own text, not from the image)."""
        meta = item.get("json") or {}
        pairs = [(q["question"], q["answer"]) for q in meta.get("questions", [])]
        pairs += [(CAPTION_REQUEST, c) for c in captions_of(item)[:1]]
        rng.shuffle(pairs)
        pairs = pairs[: max(1, int(self.options.get("max_turns", 1)))]
        image = len(pairs)  # the turns about the image, asked first after any `plan` turns
        text = [False] * image

        def add(more: list[tuple[str, str]], text_only: bool) -> None:
            pairs.extend(more)
            text.extend([text_only] * len(more))

        if self.reading and meta.get("caption"):  # drawn after the others: runs without it are unchanged
            add(reading_questions(meta["caption"], rng, self.reading), True)
        if self.locate and meta.get("scene"):  # drawn after the others: runs without it are unchanged
            add(locate_questions(Scene.from_dict(meta["scene"]), rng, self.locate), False)
        if self.restate:  # drawn after the others: runs without it are unchanged
            add(restate_questions(rng, self.restate), True)
        if self.plan:  # drawn after the others (runs without it are unchanged) but asked first: see collate
            plans = [(GENERATION_REQUEST + p, layout) for p, layout in plan_questions(rng, self.plan)]
            pairs, text = plans + pairs, [True] * len(plans) + text
        if self.questions and meta.get("scene"):  # drawn last (runs without it are unchanged), asked among image turns
            asked = [q for q, _ in pairs]
            for q in more_questions(Scene.from_dict(meta["scene"]), rng, self.questions, asked):
                at = self.plan + rng.randint(0, image)
                pairs.insert(at, (q.text, q.answer))
                text.insert(at, False)
                image += 1
        return pairs, text

    def answer_labels(self, input_ids: torch.Tensor,
                      conversations: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels = each assistant turn's answer tokens and its <|im_end|>; -100 elsewhere. Also each
        labelled token's turn (0, 1, ... within its row; -1 where unlabelled).

        Assistant turns start after `<|im_start|>assistant\\n`; each must hold exactly its tokenized
        answer, checked, never assumed.
        """
        tok = self.model.backbone.tokenizer
        header = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        labels = torch.full_like(input_ids, -100)
        turns = torch.full_like(input_ids, -1)
        for row, answers in enumerate(conversations):
            ids = input_ids[row].tolist()
            starts = [p + len(header) for p in range(len(ids) - len(header) + 1) if ids[p:p + len(header)] == header]
            if len(starts) != len(answers):
                raise RuntimeError(f"found {len(starts)} assistant turns in a conversation of {len(answers)} answers")
            for turn, (start, answer) in enumerate(zip(starts, answers, strict=True)):
                target = tok(answer + "<|im_end|>", add_special_tokens=False).input_ids
                if ids[start:start + len(target)] != target:
                    raise RuntimeError(f"cannot locate the answer {answer!r} in its tokenized conversation")
                labels[row, start:start + len(target)] = input_ids[row, start:start + len(target)]
                turns[row, start:start + len(target)] = turn
        return labels, turns

    def loss(self, batch):
        labels, cells, turns = batch.pop("labels"), batch.pop("cell_labels", None), batch.pop("label_turns", None)
        weights = batch.pop("label_weights", None)
        seen = []  # the vision tower's merged tokens (all images' cells, raster order), when needed
        visual = self.model.backbone.model.model.visual
        hook = visual.register_forward_hook(lambda _m, _i, out: seen.append(out.pooler_output)) \
            if cells is not None else None
        vlm = self.model.backbone.model
        try:
            hidden = vlm.model(**batch).last_hidden_state  # (B, L, H)
        finally:
            if hook is not None:
                hook.remove()
        # the vocabulary projection only where a label follows (answers are ~1/4 of the tokens): the same
        # loss as over every position's logits, without their time and memory
        targets = labels[:, 1:]  # (B, L-1): token t + 1 is predicted at position t
        mask = targets != -100
        rows = mask.nonzero()[:, 0]
        logits = vlm.lm_head(hidden[:, :-1][mask]).float()  # (answer tokens, V)
        per_token = F.cross_entropy(logits, targets[mask], reduction="none")
        # what is averaged per sample, the sample of each, and its weight (text_weight in text-only turns)
        terms, owner = per_token, rows
        weight = weights[:, 1:][mask].to(per_token) if weights is not None else torch.ones_like(per_token)
        if turns is not None:  # loss_per "turn": each answer's mean, so a one-word answer weighs as much as a caption
            turn = turns[:, 1:][mask]
            width = int(turn.max()) + 1 if len(turn) else 1
            slot = rows * width + turn  # (row, turn) -> one index
            sizes = torch.bincount(slot, minlength=len(mask) * width)
            sums = per_token.new_zeros(len(sizes)).index_add(0, slot, per_token)
            present = sizes > 0
            # one term per turn; a turn's tokens share its weight, so any one of them gives it
            weight = weight.new_zeros(len(sizes)).index_copy(0, slot, weight)[present]
            terms, owner = sums[present] / sizes[present], present.nonzero()[:, 0] // width
        # weighted mean per sample (of its tokens or turns), then the mean over samples: splitting the batch over
        # ranks changes nothing
        totals = weight.new_zeros(len(mask)).index_add(0, owner, weight)
        per_sample = terms.new_zeros(len(mask)).index_add(0, owner, weight * terms)
        loss = (per_sample / totals.clamp_min(1e-12)).mean()
        if cells is None:
            return loss
        out = self.object_head(seen[0].float())  # (cells, read-out)
        if self.labels_at == "centre":
            return loss + self.object_labels * code_loss(out, cells)
        n = len(CELL_SHAPES)
        known = cells[:, 0] >= 0  # cells of images without a scene are -1
        read = F.cross_entropy(out[known, :n], cells[known, 0]) + F.cross_entropy(out[known, n:], cells[known, 1])
        return loss + self.object_labels * read if bool(known.any()) else loss + 0.0 * out.sum()


CELL_SHAPES = ("none", *SHAPES)
CELL_COLORS = ("none", *COLORS)


def cell_labels(item: dict, rows: int, cols: int) -> torch.Tensor:
    """(rows * cols, 2) long: (shape, colour) index of the object whose box holds each cell's centre
    (0 = none) on a rows x cols grid over the image, raster order; -1 everywhere without a scene."""
    scene = (item.get("json") or {}).get("scene")
    labels = torch.full((rows * cols, 2), -1 if scene is None else 0, dtype=torch.long)
    if scene is None:
        return labels
    width, height = item["image"].size
    for obj in Scene.from_dict(scene).objects:
        x0, y0, x1, y1 = obj.box
        for r in range(rows):
            for c in range(cols):
                cx, cy = (c + 0.5) * width / cols, (r + 0.5) * height / rows
                if x0 <= cx < x1 and y0 <= cy < y1:
                    labels[r * cols + c] = torch.tensor([CELL_SHAPES.index(obj.shape), CELL_COLORS.index(obj.color)])
    return labels


# ---------------------------------------------------------------------------- clip


class TextTower(nn.Module):
    """A small transformer over the backbone's tokenizer ids, mean-pooled: the contrastive partner."""

    def __init__(self, vocab: int, width: int, embed_dim: int, layers: int = 2, heads: int = 4, max_len: int = 48):
        super().__init__()
        self.max_len = max_len
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.randn(max_len, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, L) -> embeddings (B, embed_dim)."""
        x = self.tokens(ids) + self.positions[: ids.shape[1]]
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        m = mask.float()[..., None]
        return self.proj((x * m).sum(1) / m.sum(1).clamp_min(1))


class ClipStage(Stage):
    """SigLIP: sigmoid loss on every image-caption pair of the global batch.

    Stage option `patch_reconstruction` (default 0): the weight of an extra loss, the mean squared
    error of a linear read-out of each token to the normalised pixels of its own patch. Contrastive
    training alone leaves the tokens mixed with the whole scene (a probe reads a token's patch back
    with 19% of object pixels wrong), so the DiT has to produce a field of tokens that all depend on
    each other; with the read-out each token also says what is drawn at its place.

    Stage option `object_codes` (default 0): the weight of an object-centric read-out for scenes with a
    `scene` in their json (the Shapes shards). A linear head reads from every token whether an object's
    box centre lies in its cell and, if so, that object's shape, colour, size and the centre's offset in
    the cell (`object_codes_of`). Objects keep 2 px apart, so no cell holds two centres: each object
    becomes one token that says everything the decoder must draw, instead of pieces spread over the
    2 x 2 to 3 x 3 cells it covers, pieces that the DiT has to make agree with each other.
    Measured (docs/training.md, session 7; 1200 steps, encoder `token_dim=32`): a linear probe reads the
    shape of an object from the token of its centre at 0.78 with weight 4 (0.42 with weight 1; run 3's
    patch-reconstruction tokens: 0.24, chance 0.25), its colour at 1.0, and which cells hold a centre at 0.993.
    """

    name, trains = "clip", ("clip_encoder",)

    def __init__(self, model, options):
        super().__init__(model, options)
        enc = model.clip_encoder.config
        self.reconstruction = weight_option(options, "patch_reconstruction")
        if self.reconstruction and not hasattr(model.clip_encoder, "patches"):
            raise ValueError("patch_reconstruction needs an encoder with a patch grid of its own (the Shapes "
                             f"encoder), not {type(model.clip_encoder).__name__}")
        self.text = TextTower(len(model.backbone.tokenizer), options.get("text_width", 128), enc.embed_dim)
        self.text.to(model.device)
        # SigLIP's initialisation: t = log 10, b = -10
        self.logit_scale = nn.Parameter(torch.tensor(2.302585, device=model.device))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0, device=model.device))
        self.codes = weight_option(options, "object_codes")
        width = model.clip_encoder.width  # the tokens' width
        self.patch_head = self.code_head = None
        if self.reconstruction:
            self.patch_head = nn.Linear(width, 3 * enc.patch_size**2).to(model.device)
        if self.codes:
            self.code_head = nn.Linear(width, CODE_WIDTH).to(model.device)

    def aux_parameters(self):
        heads = [(f"{name}.{n}", p) for name in ("patch_head", "code_head") if getattr(self, name) is not None
                 for n, p in getattr(self, name).named_parameters()]
        return [(f"text.{n}", p) for n, p in self.text.named_parameters()] + [
            ("logit_scale", self.logit_scale), ("logit_bias", self.logit_bias)] + heads

    def collate(self, items, indices, seed, device):
        pairs = zip(items, indices, strict=True)
        caps = [random.Random(seed * 7919 + i).choice(captions_of(item)) for item, i in pairs]
        tok = self.model.backbone.tokenizer(caps, padding="max_length", truncation=True, max_length=self.text.max_len,
                                            padding_side="right", return_tensors="pt")
        batch = {"pixels": pil_to_tensor([it["image"] for it in items]).to(device),
                 "ids": tok.input_ids.to(device), "mask": tok.attention_mask.bool().to(device)}
        if self.code_head is not None:
            batch["codes"] = torch.stack([object_codes_of(it) for it in items]).to(device)  # (b, 64, 7)
        return batch

    def loss(self, batch):
        encoder = self.model.clip_encoder
        if self.patch_head is None and self.code_head is None:
            img, extra = encoder.embed(batch["pixels"]), 0.0
        else:
            tokens = encoder(batch["pixels"])  # (b, 64, C)
            img, extra = encoder.pool(tokens), 0.0
            if self.patch_head is not None:
                extra = self.reconstruction * F.mse_loss(self.patch_head(tokens), encoder.patches(batch["pixels"]))
            if self.code_head is not None:
                extra = extra + self.codes * code_loss(self.code_head(tokens), batch["codes"])
        img = F.normalize(img, dim=-1)  # (b, E)
        txt = F.normalize(self.text(batch["ids"], batch["mask"]), dim=-1)
        img, txt = gather(img), gather(txt)  # (B, E): the whole global batch on every rank
        logits = img @ txt.T * self.logit_scale.exp() + self.logit_bias  # (B, B)
        labels = 2 * torch.eye(len(img), device=img.device) - 1
        return -F.logsigmoid(labels * logits).sum() / len(img) + extra


CODE_GRID = 8  # the Shapes encoder's 8 x 8 token grid
N_SHAPE, N_COLOR = len(CELL_SHAPES), len(COLORS)
CODE_WIDTH = N_SHAPE + N_COLOR + 3  # shape (or none), colour, (size, dx, dy): the clip stage's read-out
CENTRE_LABEL_WIDTH = CODE_WIDTH + 2  # ... plus the centre in the image: the understanding stage's read-out


def object_codes_of(item: dict, rows: int = CODE_GRID, cols: int = CODE_GRID) -> torch.Tensor:
    """(rows * cols, 7) float, raster order over a rows x cols grid of cells on the image: per cell
    [shape index (0 = no box centre in the cell, -1 = no scene), colour index, (size - 15) / 3, the
    centre's offset from the cell's centre in half-cells (x, y), the centre in the image (x, y)], all but
    the first only where a centre lies. Sizes 12..18, offsets and image coordinates map to [-1, 1].
    Objects keep 2 px apart, so centres are at least 12 px apart in x or 14 in y: on 8 px cells or finer
    no cell holds two (on coarser grids the first object in the scene keeps the cell)."""
    scene = (item.get("json") or {}).get("scene")
    codes = torch.zeros(rows * cols, 7)
    if scene is None:
        codes[:, 0] = -1
        return codes
    width, height = item["image"].size
    cw, ch = width / cols, height / rows
    for obj in Scene.from_dict(scene).objects:
        col, row = min(int(obj.cx // cw), cols - 1), min(int(obj.cy // ch), rows - 1)
        if codes[row * cols + col, 0] > 0:  # only on grids coarser than 8 x 8 cells: keep the first object
            continue
        codes[row * cols + col] = torch.tensor([
            CELL_SHAPES.index(obj.shape), COLORS.index(obj.color), (obj.size - 15) / 3,
            (obj.cx - (col + 0.5) * cw) / (cw / 2), (obj.cy - (row + 0.5) * ch) / (ch / 2),
            2 * obj.cx / width - 1, 2 * obj.cy / height - 1])
    return codes


def code_loss(out: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """A read-out (..., N_SHAPE + N_COLOR + k) against `object_codes_of` targets (..., 7): cross-entropy
    of each cell's shape (or none) over cells of known scenes; colour cross-entropy and the squared error
    of the first k numbers (size, offset, position) over cells that hold a centre."""
    out, codes = out.reshape(-1, out.shape[-1]).float(), codes.reshape(-1, codes.shape[-1])
    k = out.shape[1] - N_SHAPE - N_COLOR
    known, held = codes[:, 0] >= 0, codes[:, 0] > 0
    if not bool(known.any()):
        return 0.0 * out.sum()  # keeps every parameter in the graph (DDP)
    loss = F.cross_entropy(out[known, :N_SHAPE], codes[known, 0].long())
    if bool(held.any()):
        obj = out[held]
        loss = loss + F.cross_entropy(obj[:, N_SHAPE:N_SHAPE + N_COLOR], codes[held, 1].long())
        loss = loss + F.mse_loss(obj[:, N_SHAPE + N_COLOR:], codes[held, 2:2 + k])
    return loss


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x over ranks with gradients flowing back to each rank's own part."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x))


STAGES: dict[str, type[Stage]] = {s.name: s for s in (ClipStage, UnderstandingStage, DecoderStage, GenerationStage)}
