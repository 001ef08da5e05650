"""The builtin tokenizer: a small, offline, byte-level BPE for the `debug` and `nano` backbones.

Real checkpoints bring Qwen2.5's 151k-token tokenizer from their folder. The small models need
something that (a) encodes any text, so nothing a user types is unrepresentable, (b) keeps the
Shapes-world words as single tokens, so a nano model spends its capacity on the world and not on
spelling, and (c) has the same special tokens and chat format as Qwen2.5-VL, so the processor,
`generate` and BLIP3-o's `[IMG]` trick work unchanged.

The vocabulary is a byte-level BPE trained (deterministically, in milliseconds) on a word list;
it is shipped as `assets/builtin_tokenizer.json` so that a tokenizers upgrade can never silently
renumber the tokens a saved nano model was trained on. After a change to the word list, regenerate it
with `build_builtin_tokenizer().save(str(ASSET))`; a test checks that its vocabulary equals a fresh build's.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

ASSET = Path(__file__).parent / "assets" / "builtin_tokenizer.json"

# Qwen2.5's control tokens that the chat template and the Qwen2.5-VL processor rely on, in
# Qwen's own order (151643..151656 there), then BLIP3-o's three additions in the order its
# training script adds them (151665..151667 in the official checkpoint). Here they take ids
# 0..16, so the ids are fixed no matter how the BPE part is trained.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
BLIP3O_SPECIAL_TOKENS = ["[IMG]", "[/IMG]", "<image>"]
SPECIAL_TOKENS = QWEN_SPECIAL_TOKENS + BLIP3O_SPECIAL_TOKENS
SPECIAL_IDS = {token: i for i, token in enumerate(SPECIAL_TOKENS)}

# Words that must be one token each (with and without a leading space): the Shapes world's shapes,
# colours, numbers and relations (`blip3o.shapes`), its questions and answers, and the fixed prompts the
# model always sees.
_WORDS = """
    circle circles square squares triangle triangles cross crosses
    red yellow green cyan blue purple
    zero one two three four
    left right above below of
    a an and the is are there how many what color colour shape object objects yes no
    describe image photo picture scene
    please generate based on following caption you helpful assistant system user
    this that with in it which where
"""
SHAPES_WORDS = _WORDS.split()
PUNCTUATION = ["?", ".", ",", ":", "\n", "'s"]

# Qwen2.5-VL's chat format: a default system turn when none is given, one
# <|vision_start|><|image_pad|><|vision_end|> per image (the processor expands the pad to the
# image's token count), and `<|im_start|>assistant\n` as the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    """Each word alone and after a space, so both its sentence-initial and inner forms merge."""
    words = SHAPES_WORDS + [w.capitalize() for w in SHAPES_WORDS]
    return [form for w in words for form in (w, " " + w)] + PUNCTUATION


def build_builtin_tokenizer() -> Tokenizer:
    """Train the builtin byte-level BPE from scratch (deterministic; a few milliseconds)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        # Large enough that training only stops when every corpus word is a single token.
        vocab_size=4096,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any text has a byte-level fallback.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def load_builtin_tokenizer() -> PreTrainedTokenizerFast:
    """The builtin tokenizer as a transformers tokenizer with Qwen2.5-VL's conventions."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(ASSET)),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer
