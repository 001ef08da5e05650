"""The understanding stage: next-token loss on the answers of a conversation about one image.

    turns (questions and the caption request, shuffled; the auxiliaries' turns before and after)
      -> chat template, the image in the first turn about it -> backbone -> logits at the answer tokens
      -> cross-entropy per answer token, averaged per conversation, then over conversations
    (+ the auxiliaries' loss terms on the merged vision tokens: the Shapes object labels)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from blip3o.train.options import StageOptions, count, flag
from blip3o.train.stages.base import Stage
from blip3o.train.stages.hooks import Turn
from blip3o.train.stages.texts import CAPTION_REQUEST, captions_of
from blip3o.train.streams import item_random


@dataclass(frozen=True)
class UnderstandingOptions(StageOptions):
    # a conversation asks up to this many of the image's questions and its caption request, in random order:
    # several answers per image forward (LLaVA-style multi-turn data); nano: 8
    max_turns: int = count(1, minimum=1)
    # only the vision tower and its merger train. The generation condition reads text alone through the
    # language model, so it stays bit-identical and a trained DiT keeps working: understanding can be
    # improved after the generation stage without training the DiT again
    freeze_language: bool = flag(False)


class UnderstandingStage(Stage):
    """The backbone (vision tower and language model) trains on every assistant turn of a conversation."""

    name, trains, Options = "understanding", ("backbone",), UnderstandingOptions
    options: UnderstandingOptions

    def trainable(self, model):
        named = super().trainable(model)
        if not self.options.freeze_language:
            return named
        vision = {id(p) for p in model.backbone.model.model.visual.parameters()}
        for p in model.backbone.parameters():
            p.requires_grad_(id(p) in vision)
        return [(n, p) for n, p in named if p.requires_grad]

    def conversation(self, item: dict, seed: int, index: int) -> tuple[list[Turn], int]:
        """The (question, answer) turns of global item `index`'s conversation, and the turn the image comes with
        (the first about the image: after the auxiliaries' opening turns)."""
        meta = item.get("json") or {}
        turns = [(q["question"], q["answer"]) for q in meta.get("questions", [])]
        turns += [(CAPTION_REQUEST, captions_of(item)[0])]
        item_random(seed, index, "turns").shuffle(turns)
        before, after = [], []
        for auxiliary in self.auxiliaries:
            opening, closing = auxiliary.turns(item, seed, index)
            before, after = before + opening, after + closing
        return before + turns[: self.options.max_turns] + after, len(before)

    def collate(self, items, indices, seed, device):
        backbone = self.model.backbone
        texts, answers = [], []
        for item, i in zip(items, indices, strict=True):
            turns, image_at = self.conversation(item, seed, i)
            messages = []
            for k, (question, answer) in enumerate(turns):
                content = [{"type": "image"}, {"type": "text", "text": question}] if k == image_at else question
                messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
            texts.append(backbone.tokenizer.apply_chat_template(messages, tokenize=False))
            answers.append([answer for _, answer in turns])
        inputs = backbone.processor(text=texts, images=[it["image"] for it in items], padding=True,
                                    padding_side="left", return_tensors="pt")
        batch = {"labels": self.answer_labels(inputs["input_ids"], answers).to(device),  # (B, L)
                 "inputs": dict(inputs.to(device))}  # the backbone's inputs: input_ids, pixel_values, ...
        return self.aux_collate(items, batch, device)

    def answer_labels(self, input_ids: torch.Tensor, conversations: list[list[str]]) -> torch.Tensor:
        """input_ids (B, L) -> labels (B, L): each assistant turn's answer tokens and its <|im_end|>, -100
        elsewhere. Assistant turns start after `<|im_start|>assistant\\n`; each must hold exactly its
        tokenized answer, checked, never assumed."""
        tok = self.model.backbone.tokenizer
        header = tok("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        labels = torch.full_like(input_ids, -100)
        for row, answers in enumerate(conversations):
            ids = input_ids[row].tolist()
            starts = [p + len(header) for p in range(len(ids) - len(header) + 1) if ids[p:p + len(header)] == header]
            if len(starts) != len(answers):
                raise RuntimeError(f"found {len(starts)} assistant turns in a conversation of {len(answers)} answers")
            for start, answer in zip(starts, answers, strict=True):
                target = tok(answer + "<|im_end|>", add_special_tokens=False).input_ids
                if ids[start:start + len(target)] != target:
                    raise RuntimeError(f"cannot locate the answer {answer!r} in its tokenized conversation")
                labels[row, start:start + len(target)] = input_ids[row, start:start + len(target)]
        return labels

    def loss(self, batch):
        vlm, labels = self.model.backbone.model, batch["labels"]
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
        return loss + self.aux_loss(batch, seen[0].float() if wanted else None)
