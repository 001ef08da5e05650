"""The understanding stage: next-token loss on the assistant turns of conversations about images.

    a conversation sample (`blip3o.data`: LLaVA records, multi-turn, multi-image or text-only) as it is, or a
    Shapes item's turns (questions and the caption request, shuffled; the auxiliaries' turns before and after)
      -> the backbone's chat template, each image where its part stands -> backbone -> logits at the targets
      -> cross-entropy per target token (each assistant turn's content and its <|im_end|>), averaged per
         conversation, then over conversations
    (+ the auxiliaries' loss terms on the merged vision tokens: the Shapes object labels)

What trains: the whole backbone, the language model alone (`freeze_vision`), the vision tower alone
(`freeze_language`), or LoRA adapters on the language model's projections (`lora_rank` > 0), which merge into
the base weights when the model is exported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip3o.train.options import StageOptions, count, flag, names, positive, share
from blip3o.train.stages.base import Stage
from blip3o.train.stages.hooks import Turn
from blip3o.train.stages.texts import CAPTION_REQUEST, captions_of
from blip3o.train.streams import item_random

# the language model's attention and MLP projections: what LoRA adapts unless `lora_targets` says otherwise
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_SEED = 0  # the adapters' initial weights: the same on every process and for every run


@dataclass(frozen=True)
class UnderstandingOptions(StageOptions):
    # a conversation asks up to this many of the image's questions and its caption request, in random order:
    # several answers per image forward (LLaVA-style multi-turn data); nano: 8. Conversation samples keep
    # every turn they have
    max_turns: int = count(1, minimum=1)
    # only the vision tower and its merger train. The generation condition reads text alone through the
    # language model, so it stays bit-identical and a trained DiT keeps working: understanding can be
    # improved after the generation stage without training the DiT again
    freeze_language: bool = flag(False)
    # the vision tower and its merger stay frozen: the language model alone trains (LLaVA's fine-tuning on
    # a pretrained vision tower)
    freeze_vision: bool = flag(False)
    # > 0: LoRA adapters of this rank on the language model's `lora_targets` train, nothing else; on export
    # they merge into the base weights (the exported folder is a plain model). 0: no adapters
    lora_rank: int = count(0, minimum=0, maximum=4096)
    lora_alpha: float = positive(16.0)  # the adapters' scale is lora_alpha / lora_rank
    lora_dropout: float = share(0.05)  # dropout on the adapters' input while training
    # the names of the language model's linear layers that get adapters (the last part of their names)
    lora_targets: tuple[str, ...] = names(LORA_TARGETS)
    # > 0: a conversation longer than this many tokens (images included) is cut after its last assistant turn
    # that fits; one whose first assistant turn does not fit is skipped. Both are counted (`counts`). 0: no limit
    max_length: int = count(0, minimum=0, maximum=1 << 20)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.freeze_language and (self.freeze_vision or self.lora_rank):
            raise ValueError("stage option freeze_language trains the vision tower alone; it cannot be combined "
                             "with freeze_vision or lora_rank (which train the language model)")


class UnderstandingStage(Stage):
    """The backbone (vision tower and language model, or a part, or LoRA adapters) trains on every assistant
    turn of a conversation. `counts` holds the conversations cut ("truncated") or skipped ("too_long") by
    `max_length` so far."""

    name, trains, Options = "understanding", ("backbone",), UnderstandingOptions
    options: UnderstandingOptions

    def __init__(self, model, options: dict | None = None) -> None:
        super().__init__(model, options)
        self.lora = None  # peft's LoraModel over the language model, once `trainable` added the adapters

    def trainable(self, model):
        named = super().trainable(model)
        o, visual = self.options, model.backbone.model.model.visual
        if o.freeze_vision:
            visual.eval().requires_grad_(False)
        if o.freeze_language:
            vision = {id(p) for p in visual.parameters()}
            for p in model.backbone.parameters():
                p.requires_grad_(id(p) in vision)
        if o.lora_rank:  # the adapters alone train; they join the model after the base listed its parameters
            model.backbone.requires_grad_(False)
            visual.eval()
            self.lora = add_lora(model.backbone.model.model.language_model, o)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad] + \
                [(n, p) for n, p in named if n.startswith("aux.")]
        return [(n, p) for n, p in named if p.requires_grad]

    def before_export(self) -> None:
        """Merge the LoRA adapters into the base weights and take them out of the model: what is saved is a
        plain Blip3o that loads without peft. The adapters are gone afterwards; the stage trains no further."""
        if self.lora is not None:
            self.lora.merge_and_unload()
            self.lora = None

    def conversation(self, item: dict, seed: int, index: int) -> tuple[list[Turn], int]:
        """The (question, answer) turns of global Shapes item `index`'s conversation, and the turn the image comes
        with (the first about the image: after the auxiliaries' opening turns)."""
        meta = item.get("json") or {}
        turns = [(q["question"], q["answer"]) for q in meta.get("questions", [])]
        turns += [(CAPTION_REQUEST, captions_of(item)[0])]
        item_random(seed, index, "turns").shuffle(turns)
        before, after = [], []
        for auxiliary in self.auxiliaries:
            opening, closing = auxiliary.turns(item, seed, index)
            before, after = before + opening, after + closing
        return before + turns[: self.options.max_turns] + after, len(before)

    def messages(self, item: dict, seed: int, index: int) -> list[dict]:
        """The item's conversation in the chat format of `Blip3o.chat`: a conversation sample's messages as they
        are, or a Shapes item's turns with its image in the first turn about it."""
        if "messages" in item:
            return item["messages"]
        turns, image_at = self.conversation(item, seed, index)
        messages = []
        for k, (question, answer) in enumerate(turns):
            content = [{"type": "image", "image": item["image"]}, {"type": "text", "text": question}] \
                if k == image_at else question
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        return messages

    def collate(self, items, indices, seed, device):
        conversations = [self.messages(item, seed, i) for item, i in zip(items, indices, strict=True)]
        if self.options.max_length:
            kept = [self.fit_length(c) for c in conversations]
            items = [item for item, c in zip(items, kept, strict=True) if c is not None]
            conversations = [c for c in kept if c is not None]
        if not conversations:
            return {"labels": None, "inputs": None}
        try:
            inputs, labels = self.model.backbone.training_inputs(conversations)
        except ValueError as e:
            wheres = ", ".join(item.get("where", "a Shapes item") for item in items)
            raise ValueError(f"a conversation of the batch ({wheres}) cannot be trained on: {e}") from None
        batch = {"labels": labels.to(device),  # (B, L)
                 "inputs": dict(inputs.to(device))}  # the backbone's inputs: input_ids, pixel_values, ...
        return self.aux_collate(items, batch, device)

    def fit_length(self, conversation: list[dict]) -> list[dict] | None:
        """The conversation, cut after its last assistant turn within `max_length` tokens where it is longer
        (counted "truncated"); None (counted "too_long") where its first assistant turn is already beyond."""
        ends = [k + 1 for k, m in enumerate(conversation) if m["role"] == "assistant"]
        cuts = [conversation] + [conversation[:end] for end in reversed(ends) if end < len(conversation)]
        for cut in cuts:
            inputs, _ = self.model.backbone.training_inputs([cut])
            if inputs["input_ids"].shape[1] <= self.options.max_length:
                self.counts["truncated"] += cut is not conversation
                return cut
        self.counts["too_long"] += 1
        return None

    def loss(self, batch):
        vlm, labels = self.model.backbone.model, batch["labels"]
        if labels is None:  # every conversation skipped: a zero that still gives each trained weight a gradient
            return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        seen = []  # the vision tower's merged tokens (every image's cells, raster order), when an auxiliary reads them
        wanted = any(a.wants_features for a in self.auxiliaries)
        hook = vlm.model.visual.register_forward_hook(lambda _m, _i, out: seen.append(out.pooler_output)) \
            if wanted else None
        try:
            hidden = vlm.model(**batch["inputs"]).last_hidden_state  # (B, L, H)
        finally:
            if hook is not None:
                hook.remove()
        # the vocabulary projection only where a label follows (answers are ~1/4 of the tokens): the same loss as
        # over every position's logits, without their time and memory
        targets = labels[:, 1:]  # (B, L-1): token t + 1 is predicted at position t
        mask = targets != -100
        rows = mask.nonzero()[:, 0]  # the conversation of each answer token
        per_token = F.cross_entropy(vlm.lm_head(hidden[:, :-1][mask]).float(), targets[mask], reduction="none")
        # the mean per conversation, then over conversations: splitting the batch over processes changes nothing
        sums = per_token.new_zeros(len(labels)).index_add(0, rows, per_token)
        loss = (sums / torch.bincount(rows, minlength=len(labels)).clamp_min(1)).mean()
        loss = loss + self.aux_loss(batch, seen[0].float() if wanted else None)
        if "pixel_values" not in batch["inputs"]:  # text only: the vision tower's weights get their zero gradient
            loss = loss + sum(p.sum() for p in vlm.model.visual.parameters() if p.requires_grad) * 0.0
        return loss


def add_lora(language_model: nn.Module, options: UnderstandingOptions):
    """peft's LoRA adapters on the language model's `lora_targets`, in place (the language model stays where it
    is in the Blip3o, its target layers wrapped), initialised from LORA_SEED; only the adapters train. Returns
    the LoraModel that merges them. A target name that no linear layer of the language model has is refused."""
    from peft import LoraConfig, LoraModel

    linear = {name.rsplit(".", 1)[-1] for name, m in language_model.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(options.lora_targets) - linear)
    if missing:
        raise ValueError(f"stage option lora_targets names {', '.join(missing)}, which no linear layer of the "
                         f"language model is; its linear layers: {', '.join(sorted(linear))}")
    config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=rf".*\.({'|'.join(map(re.escape, options.lora_targets))})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(LORA_SEED)
        return LoraModel(language_model, config, "default")
