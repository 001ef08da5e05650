"""BLIP3-o as an lmms-eval model, which lmms-eval finds through this package's `lmms_eval.models` entry point:

    lmms-eval --model blip3o --model_args pretrained=BLIP3o-Model-8B --tasks mme,mmmu_val --device cuda
    accelerate launch --num_processes 8 -m lmms_eval --model blip3o --model_args pretrained=DIR --tasks mme

`pretrained` is a checkpoint folder or a preset; `protocol` the understanding inputs (`blip3o`, the default, is
the original's evaluation: docs/evaluation.md; `stock` the model's processor); `dtype` overrides the protocol's.
Each request is one user turn, its images first and then its text (lmms-eval's `<image>` placeholders dropped),
as the original's lmms-eval model sends it. Decoding follows the task's generation settings: greedy at
temperature 0, at most `max_new_tokens` (128 unless the task says), the reply cut at each of the task's `until`
strings except a blank line. `loglikelihood` scores a continuation as the assistant's reply to the context.
"""

from __future__ import annotations

import os

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from blip3o.protocols import PROTOCOLS

DEFAULT_MAX_NEW_TOKENS = 128  # the original's lmms-eval model's, for tasks that name none


def manifest():
    """The `lmms_eval.models` entry point: `--model blip3o` is this module's Blip3oLmms. (lmms-eval's model
    registry loads this while it initialises, so its manifest class is imported here, when called.)"""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="blip3o", simple_class_path="blip3o.evals.lmms.Blip3oLmms")


class Blip3oLmms(lmms):
    """lmms-eval's model interface over `Blip3o` (a simple model: lmms-eval gives it text contexts and images)."""

    is_simple = True

    def __init__(self, pretrained: str = "nano", device: str | None = None, dtype: str | None = None,
                 protocol: str = "blip3o", batch_size: int | str = 1, max_batch_size: int | None = None,
                 **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"blip3o takes pretrained, device, dtype, protocol and batch_size; not "
                             f"{', '.join(sorted(unknown))}")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        from blip3o.cli.models import load_model

        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.protocol = PROTOCOLS[protocol]
        self._device = torch.device(self.pick_device(device))
        if dtype is None and self._device.type == "cuda":
            dtype = self.protocol.gpu_dtype
        self.model = load_model(pretrained, str(self._device), dtype)
        self.batch_size_per_call = int(batch_size)

    @staticmethod
    def pick_device(device: str | None) -> str:
        """The device asked for, else a GPU where there is one; each process of a multi-process run takes the GPU
        of its local rank."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return device

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_call

    # ------------------------------------------------------------------ what the model reads

    def doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def turn(self, context: str, visuals) -> list[dict]:
        """One user turn: the request's images (prepared as the protocol does), then its text."""
        images = []
        for visual in visuals or []:
            if not isinstance(visual, Image.Image):
                raise ValueError(f"blip3o reads images; this task gives a {type(visual).__name__} ({visual!r:.80})")
            images.append({"type": "image", "image": self.protocol.prepare(visual)})
        return [{"role": "user", "content": [*images, {"type": "text", "text": context.replace("<image>", "")}]}]

    def reply(self, conversations: list[list[dict]], gen_kwargs: dict) -> list[str]:
        """Replies under the task's generation settings, cut at its `until` strings."""
        settings = dict(gen_kwargs)
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if settings.get("num_beams", 1) not in (1, None):
            raise ValueError(f"blip3o decodes without beam search; the task asks for num_beams={settings['num_beams']}")
        temperature = settings.get("temperature") or 0
        sampling = {"do_sample": True, "temperature": temperature, "top_p": settings.get("top_p")} \
            if temperature > 0 else {"do_sample": False}
        replies = self.model.chat(conversations, max_new_tokens=settings.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                                  **sampling, **self.protocol.options())
        for stop in until:
            if stop and stop != "\n\n":  # a blank line does not end an answer (the original drops it too)
                replies = [reply.split(stop)[0] for reply in replies]
        return replies

    # ------------------------------------------------------------------ lmms-eval's requests

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """One reply per request (context, generation settings, doc_to_visual, doc_id, task, split), in order;
        consecutive requests with the same settings share a model call (up to the batch size)."""
        size = self.protocol.batch_size or self.batch_size
        replies: list[str] = []
        start = 0
        while start < len(requests):
            gen_kwargs = requests[start].args[1]
            end = start + 1
            while end < len(requests) and end - start < size and requests[end].args[1] == gen_kwargs:
                end += 1
            turns = [self.turn(context, to_visual(self.doc(task, split, doc_id)))
                     for context, _, to_visual, doc_id, task, split in (r.args for r in requests[start:end])]
            replies += self.reply(turns, gen_kwargs)
            start = end
        return replies

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Each request's replies, round by round: after the first (the request's context and images), the task's
        doc_to_text gives each round's images and text from the replies so far, until it signals the end."""
        results = []
        for request in requests:
            context, gen_kwargs, to_visual, to_text, doc_id, task, split = request.args
            settings = {k: v for k, v in gen_kwargs.items() if k != "until"}
            doc = self.doc(task, split, doc_id)
            replies: list[str] = []
            visuals, info, round_idx = to_visual(doc), None, 0
            while True:
                if round_idx > 0:
                    visuals, context, done, replies, info = to_text(doc, previous_output=replies, round_idx=round_idx,
                                                                    previous_round_info=info)
                    if done:
                        break
                (reply,) = self.reply([self.turn(context, visuals)], settings)
                replies = [*replies, reply]
                round_idx += 1
            results.append(list(replies))
        return results

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation as the assistant's reply to the context, whether greedy decoding
        reads exactly it) per request (context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)."""
        results = []
        for request in requests:
            context, target, to_visual, doc_id, task, split = request.args
            doc = self.doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            results.append(self.score(self.turn(context, to_visual(doc)), str(continuation)))
        return results

    def score(self, conversation: list[dict], continuation: str) -> tuple[float, bool]:
        backbone = self.model.backbone
        bounds = {k: v for k, v in self.protocol.options().items() if k != "stop_tokens"}
        inputs = backbone.inputs([conversation], **bounds)  # ends with the assistant's turn opened
        tokens = backbone.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        tokens = tokens.to(inputs["input_ids"].device)  # (1, T)
        context_length = inputs["input_ids"].shape[1]
        # the continuation is text: attended to, and of token type 0 where the processor marks image tokens
        extra = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens)}
        for key, value in inputs.items():
            if value.shape == (1, context_length):  # a value per token: (1, L) -> (1, L + T)
                inputs[key] = torch.cat([value, extra.get(key, torch.zeros_like(tokens))], dim=1)
        logits = backbone.model(**inputs).logits[:, context_length - 1:-1].float()  # (1, T, V): each predicts the next
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]  # (1, T)
        return float(logprobs.sum()), bool((logits.argmax(-1) == tokens).all())
