"""The texts of a dataset item that the stages train on.

An item is {"image": PIL.Image, "json": dict}: the Shapes shards' metadata (`caption`, `prompt` the scene
was drawn for, `prompts` it satisfies, `questions`) or, for plain image-text shards, `text`. A sample of the
streamed data (`blip3o.data`: shards, JSONL, folders) carries its caption as `text` beside the record's own
`json`; unless that json is Shapes metadata, `text` is what the stages train on.
"""

from __future__ import annotations

from blip3o.train.streams import item_random

CAPTION_REQUEST = "describe the image."  # the user turn whose answer is the caption


def is_shapes(meta: dict) -> bool:
    """Whether an item's json is Shapes metadata: the prompts a scene satisfies, or the one it was drawn for."""
    return "prompts" in meta or isinstance(meta.get("prompt"), dict)


def captions_of(item: dict) -> list[str]:
    """Every text that describes the image: its caption, the prompts it satisfies, its plain text."""
    meta = item.get("json") or {}
    if item.get("text") and not is_shapes(meta):  # a streamed image-text sample
        return [item["text"]]
    texts = [meta["caption"]] if meta.get("caption") else []
    texts += [p["prompt"] for p in meta.get("prompts", [])]
    if meta.get("text"):  # plain image-text shards (txt member)
        texts.append(meta["text"])
    if not texts:
        raise ValueError(f"a training item has no caption, prompt or text to train on (its json keys: {sorted(meta)})")
    return texts


def complete_texts(item: dict) -> list[str]:
    """Texts that name every object of the image: the prompt a scene was drawn for and its caption (plain
    image-text shards: their text). Generation trains on these: with a prompt that a random scene merely
    satisfies, most of the target is not explained by the text, and the DiT learns to ignore its condition."""
    meta = item.get("json") or {}
    if not is_shapes(meta):
        return captions_of(item)
    texts = [meta["prompt"]["prompt"]] if meta.get("prompt") else []
    texts += [meta["caption"]] if meta.get("caption") else []
    return texts or captions_of(item)


def generation_text(item: dict, seed: int, index: int, prompt_share: float | None = None) -> str:
    """The text generation conditions global item `index` on (stream "text"; the decoder's DiT redraw of the
    same item reads the same one).

    prompt_share = p: an item drawn for a prompt is conditioned on that prompt with probability p, on its
    caption otherwise; None: each complete text equally likely."""
    rng, texts = item_random(seed, index, "text"), complete_texts(item)
    if prompt_share is None or len(texts) < 2 or not is_shapes(item.get("json") or {}):
        return rng.choice(texts)
    return texts[0] if rng.random() < prompt_share else rng.choice(texts[1:])
