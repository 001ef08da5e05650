"""The backbone: a Qwen2.5-VL model that understands images and conditions image generation.

Two arrows of the BLIP3-o diagram start here:
- image + question -> backbone -> answer            (`answer`, `chat`)
- prompt -> backbone (+ learnable queries) -> condition for the DiT   (`condition`)

For `condition`, BLIP3-o tokenizes a fixed generation prompt, appends `[IMG]`, appends Q learnable
query embeddings and reads the final (post-norm) hidden states at the Q query positions. The
backbone is frozen, but gradients flow through it into the queries, which stage 2 trains.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from PIL import Image
from torch import nn
from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, TextStreamer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from blip3o.checkpoints import CheckpointError, read_json, regular_file
from blip3o.checkpoints.limits import MAX_POSITIONS, MAX_VOCAB, MODEL_BOUNDS, Bound, check_value
from blip3o.images import check_images
from blip3o.tokenizer import BLIP3O_SPECIAL_TOKENS, CHAT_TEMPLATE, SPECIAL_IDS, load_builtin_tokenizer

GENERATION_REQUEST = "Please generate image based on the following caption: "
NEGATIVE_PROMPT = " "  # the original pipeline's negative prompt for the decoder's CFG
GENERATION_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    f"<|im_start|>user\n{GENERATION_REQUEST}{{prompt}}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# An edit's request: the source image(s) enter the user turn as understanding input, then this and the instruction
EDIT_REQUEST = "Please edit the image according to the following instruction: "
IMG_TOKEN = "[IMG]"
# The original trains generation on the conversation with its assistant message emptied, which the chat template
# closes, and its collator appends [IMG] and one `<image>` slot per query (`Backbone.training_sequence`).
CLOSED_TURN = "<|im_end|>\n"
QUERY_SLOT = "<image>"
DEFAULT_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # where a reply ends when no generation config says
GENERATION_CONFIG = "generation_config.json"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
ROLES = ("system", "user", "assistant")
# The size fields of a folder's preprocessor_config.json (pixel budgets, patch sizes), checked before transformers
# reads it: name there -> (type, bound)
PREPROCESSOR_BOUNDS = {
    "min_pixels": (int, MODEL_BOUNDS["min_pixels"]), "max_pixels": (int, MODEL_BOUNDS["max_pixels"]),
    "size.shortest_edge": (int, MODEL_BOUNDS["min_pixels"]), "size.longest_edge": (int, MODEL_BOUNDS["max_pixels"]),
    "patch_size": (int, MODEL_BOUNDS["patch_size"]), "temporal_patch_size": (int, MODEL_BOUNDS["temporal_patch_size"]),
    "merge_size": (int, MODEL_BOUNDS["spatial_merge_size"]),
}
# The fields of a folder's generation_config.json that size what generation allocates or that must be numbers
GENERATION_BOUNDS = {
    "max_new_tokens": (int, Bound(1, MAX_POSITIONS)), "max_length": (int, Bound(1, MAX_POSITIONS)),
    "num_beams": (int, Bound(1, 1024)), "num_return_sequences": (int, Bound(1, 1024)),
    "top_k": (int, Bound(0, MAX_VOCAB)), "top_p": (float, Bound(0, 1)), "temperature": (float, Bound(0, 1e6)),
    "repetition_penalty": (float, Bound(1e-6, 1e6)),
}
# Ids of the control tokens the model config names, in Qwen2.5's own tokenizer ("checkpoint").
QWEN_SPECIAL_IDS = {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                    "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}


@dataclass
class BackboneConfig:
    # --- language model (Qwen2.5 text decoder) ---
    hidden_size: int = 3584  # width of the residual stream = width of the condition tokens
    num_layers: int = 28  # decoder layers
    num_heads: int = 28  # query heads
    num_kv_heads: int = 4  # key/value heads (grouped-query attention)
    intermediate_size: int = 18944  # SwiGLU hidden width
    vocab_size: int = 151668  # rows of embed_tokens / lm_head; >= len(tokenizer)
    rope_theta: float = 1e6  # RoPE base
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # lm_head shares embed_tokens' weight (3B yes, 7B no)
    max_position_embeddings: int = 128000  # longest sequence the RoPE is meant for
    # Split of the head_dim/2 rotary frequencies over (time, height, width); sums to head_dim / 2.
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    # --- vision tower (Qwen2.5-VL ViT) ---
    vision_depth: int = 32  # ViT blocks
    vision_hidden_size: int = 1280  # ViT width
    vision_num_heads: int = 16  # ViT heads
    vision_intermediate_size: int = 3420  # ViT SwiGLU hidden width
    patch_size: int = 14  # pixels per patch side
    spatial_merge_size: int = 2  # merge k x k patches into one language token
    temporal_patch_size: int = 2  # frames per patch (a still image is repeated to fill it)
    window_size: int = 112  # side, in pixels, of the windows of windowed-attention blocks
    # Blocks that attend over the whole image instead of within windows.
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    # --- processor (a folder's preprocessor_config.json, where it has one, configures it instead) ---
    min_pixels: int = 56 * 56  # smaller images are upscaled to at least this many pixels
    max_pixels: int = 28 * 28 * 1280  # larger images are downscaled to at most this many pixels
    # --- tokenizer ---
    # "builtin": our small offline tokenizer (debug/nano); "checkpoint": load from a folder.
    tokenizer: str = "checkpoint"
    # False: a stock Qwen2.5-VL's backbone, whose tokenizer keeps its own vocabulary (no [IMG]): it answers
    # questions about images and refuses to condition image generation
    generates: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}), "
                f"and num_heads by num_kv_heads ({self.num_kv_heads})"
            )
        head_dim = self.hidden_size // self.num_heads
        if sum(self.mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {head_dim // 2}")
        if self.vision_hidden_size % self.vision_num_heads:
            raise ValueError("vision_hidden_size must divide by vision_num_heads")
        if self.tokenizer not in ("builtin", "checkpoint"):
            raise ValueError(f"tokenizer must be 'builtin' or 'checkpoint', got {self.tokenizer!r}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")

    @property
    def special_ids(self) -> dict[str, int]:
        """Ids of the control tokens (as named in Qwen2.5) in this config's tokenizer."""
        if self.tokenizer == "builtin":
            return {token: SPECIAL_IDS[token] for token in QWEN_SPECIAL_IDS}
        return dict(QWEN_SPECIAL_IDS)

    def to_hf(self) -> transformers.Qwen2_5_VLConfig:
        """The transformers config of the same architecture."""
        ids = self.special_ids
        text = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta,
                             "mrope_section": list(self.mrope_section)},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
        )
        vision = dict(
            depth=self.vision_depth,
            hidden_size=self.vision_hidden_size,
            num_heads=self.vision_num_heads,
            intermediate_size=self.vision_intermediate_size,
            patch_size=self.patch_size,
            spatial_merge_size=self.spatial_merge_size,
            temporal_patch_size=self.temporal_patch_size,
            window_size=self.window_size,
            fullatt_block_indexes=list(self.fullatt_block_indexes),
            out_hidden_size=self.hidden_size,  # the merger projects straight into the LM's width
            tokens_per_second=2,  # as Qwen2.5-VL's release; only used for video
        )
        return transformers.Qwen2_5_VLConfig(
            text_config=text,
            vision_config=vision,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=self.tie_word_embeddings,
        )


BACKBONE_PRESETS: dict[str, BackboneConfig] = {
    "debug": BackboneConfig(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=704,
        tie_word_embeddings=False, max_position_embeddings=2048, mrope_section=[2, 3, 3],
        vision_depth=2, vision_hidden_size=32, vision_num_heads=2, vision_intermediate_size=64,
        patch_size=8, window_size=32, fullatt_block_indexes=[1],
        min_pixels=16 * 16, max_pixels=32 * 32, tokenizer="builtin",
    ),
    # Shapes world: a 64x64 image is 16x16 patches of 4 px -> 8x8 = 64 language tokens, not resized.
    # (8 px patches, 16 tokens, read shapes badly: VQA 0.55 against 0.69 after 500 steps, shape 0.27 vs 0.46.)
    # Untied embeddings: tied ones pulled the relation words (above/below/left/right) together while the
    # understanding stage predicted them at chance, and generation's frozen condition lost the relation
    # (above vs below 2.4% apart); untied they stay apart (docs/experiments.md).
    "nano": BackboneConfig(
        hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768, vocab_size=704,
        tie_word_embeddings=False, max_position_embeddings=4096, mrope_section=[8, 12, 12],
        vision_depth=4, vision_hidden_size=128, vision_num_heads=4, vision_intermediate_size=256,
        patch_size=4, window_size=32, fullatt_block_indexes=[1, 3],
        min_pixels=64 * 64, max_pixels=64 * 64, tokenizer="builtin",
    ),
    # Every other field (vision tower, rope, processor) is the 7B's: the defaults.
    "qwen2.5-vl-3b": BackboneConfig(
        hidden_size=2048, num_layers=36, num_heads=16, num_kv_heads=2, intermediate_size=11008,
        tie_word_embeddings=True,
    ),
    "qwen2.5-vl-7b": BackboneConfig(),  # every default above is Qwen2.5-VL-7B-Instruct's
}


class CannotGenerate(CheckpointError):
    """The model was loaded from a folder without image-generation parts (a stock Qwen2.5-VL); it answers
    questions about images, and this is what asking it to generate one raises."""


class BackboneProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor for images and text only (no video processor: that needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, **kw):
        super().__init__(image_processor, tokenizer, video_processor, chat_template=chat_template, **kw)

    def check_argument_for_proper_class(self, argument_name, argument):
        # Video is the one modality we leave out; its processor class cannot even be resolved here.
        if argument_name == "video_processor" and argument is None:
            return type(None)
        return super().check_argument_for_proper_class(argument_name, argument)


class _CallbackStreamer(TextStreamer):
    """transformers' incremental detokenizer (prompt skipped, text at word boundaries) into a callback."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


class Backbone(nn.Module):
    """Qwen2.5-VL wrapped for BLIP3-o: `condition` for generation, `answer`/`chat` for understanding."""

    def __init__(self, config: BackboneConfig, tokenizer_dir: str | Path | None = None):
        """`tokenizer_dir`: the folder of the tokenizer, and of the `preprocessor_config.json`, chat template and
        `generation_config.json` that configure understanding where the folder has them (as transformers'
        `from_pretrained` reads them)."""
        super().__init__()
        self.config = config
        self.model = Qwen2_5_VLForConditionalGeneration(config.to_hf())
        self.tokenizer = self.processor = self.img_token_id = None
        self.stop_ids: list[int] = []  # generation ends at any of these unless the caller names others
        self.folder_generation_config: GenerationConfig | None = None  # a folder's generation_config.json
        if config.tokenizer == "builtin" or tokenizer_dir is not None:
            folder = None if tokenizer_dir is None else Path(tokenizer_dir)
            self.set_tokenizer(_load_tokenizer(config, folder, add_blip3o_tokens=config.generates),
                               _image_processor(config, folder), _chat_template(folder))
            if folder is not None and os.path.lexists(folder / GENERATION_CONFIG):
                check_folder_config(folder / GENERATION_CONFIG, GENERATION_BOUNDS)
                self.use_generation_config(GenerationConfig.from_pretrained(str(folder), local_files_only=True))

    def set_tokenizer(self, tokenizer, image_processor=None, chat_template: str | None = None) -> None:
        """Attach a tokenizer and the processor built on it (the config's image processor unless one is
        given), after checking both fit the model."""
        _check_tokenizer(tokenizer, self.config)
        image_processor = image_processor or _image_processor(self.config, None)
        _check_image_processor(image_processor, self.config)
        self.tokenizer = tokenizer
        self.processor = BackboneProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                           chat_template=chat_template or tokenizer.chat_template)
        self.img_token_id = tokenizer.convert_tokens_to_ids(IMG_TOKEN) if self.config.generates else None
        self.stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in DEFAULT_STOP_TOKENS]

    def use_generation_config(self, config: GenerationConfig) -> None:
        """Answer with `config`'s settings (a folder's generation_config.json) where a call names none, and
        stop at its eos tokens."""
        self.model.generation_config = self.folder_generation_config = config
        if config.eos_token_id is not None:
            eos = config.eos_token_id
            self.stop_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]

    @property
    def pixel_bounds(self) -> tuple[int, int]:
        """(min_pixels, max_pixels): the processor resizes each image to a pixel count between them."""
        size = self.processor.image_processor.size
        return size.shortest_edge, size.longest_edge

    def _require_generation(self) -> None:
        self._require_tokenizer()
        if not self.config.generates:
            raise CannotGenerate(
                "this backbone is a stock Qwen2.5-VL: it understands images but has none of BLIP3-o's generation "
                "parts (the [IMG] token, trained queries, DiT and decoder), so it cannot generate images; load a "
                "BLIP3-o folder to generate"
            )

    def _require_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise RuntimeError(
                "this backbone has no tokenizer: a preset with the official Qwen2.5-VL vocabulary gets it from "
                "a checkpoint folder (Blip3o.from_pretrained(DIR)) or Backbone.set_tokenizer(...)"
            )

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def freeze(self) -> Backbone:
        """Frozen in both senses: eval mode and no parameter gradients (inputs still get them)."""
        self.eval()
        self.requires_grad_(False)
        return self

    def condition(self, prompts: list[str], queries: torch.Tensor) -> torch.Tensor:
        """Hidden states at the query positions after the generation prompt.

        prompts: B captions. queries: (1, Q, H) learnable embeddings. Returns (B, Q, H), the
        final-norm hidden states. Not wrapped in no_grad: gradients reach `queries`.
        """
        prompts = check_prompts(prompts)
        self._require_generation()
        texts = [GENERATION_PROMPT.format(prompt=p) for p in prompts]
        return self._hidden_at_queries(texts, _check_queries(queries, self.hidden_size))

    def negative_condition(self, queries: torch.Tensor) -> torch.Tensor:
        """The decoder's negative prompt, as BLIP3-o's inference builds it: (1, Q, H).

        The original's pipeline conditions it on `[" "]` *without* the chat template, so the sequence is
        the one space (Qwen's `Ġ`), `[IMG]`, then the queries.
        """
        self._require_generation()
        return self._hidden_at_queries([NEGATIVE_PROMPT], _check_queries(queries, self.hidden_size))

    def training_sequence(self, prompts: list[str], num_queries: int) -> tuple[torch.Tensor, ...]:
        """The original's training sequence for generation, right padded with the pad token:

            GENERATION_PROMPT + CLOSED_TURN + [IMG] + num_queries x QUERY_SLOT + padding

        Returns token ids (B, L), the attention mask (B, L) and the query slots (B, L) bool (positional, so
        a caption's own text never makes a slot).
        """
        prompts = check_prompts(prompts)
        self._require_generation()
        slot = self.tokenizer.convert_tokens_to_ids(QUERY_SLOT)
        rows = [self.tokenizer(GENERATION_PROMPT.format(prompt=p) + CLOSED_TURN, add_special_tokens=False).input_ids
                + [self.img_token_id] for p in prompts]
        ids = torch.full((len(rows), max(map(len, rows)) + num_queries), self.tokenizer.pad_token_id)  # (B, L)
        mask, slots = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
        for b, row in enumerate(rows):
            n = len(row)
            ids[b, :n + num_queries] = torch.tensor(row + [slot] * num_queries)
            mask[b, :n + num_queries] = 1
            slots[b, n:n + num_queries] = True
        return ids, mask, slots

    def training_condition(self, prompts: list[str], queries: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (B, Q, H) at the query slots of `training_sequence`, the queries (1, Q, H)
        placed at the slots; gradients reach `queries`. One pass over the whole sequence, as the original
        trains (the right padding comes after the slots, which the causal attention keeps from reading it)."""
        prompts, queries = check_prompts(prompts), _check_queries(queries, self.hidden_size)
        ids, mask, slots = (x.to(self.device) for x in self.training_sequence(prompts, queries.shape[1]))
        embeds = self.model.get_input_embeddings()(ids)  # (B, L, H)
        embeds = embeds.masked_scatter(slots[..., None], queries.to(embeds.dtype).expand(len(prompts), -1, -1))
        out = self.model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                              position_ids=positions_from_mask(mask), use_cache=False)
        return out.last_hidden_state[slots].view(len(prompts), queries.shape[1], -1)

    def edit_condition(self, sources: list[list[Image.Image]], instructions: list[str], queries: torch.Tensor, *,
                       min_pixels: int | None = None, max_pixels: int | None = None) -> torch.Tensor:
        """Hidden states at the query positions after an edit request: (B, Q, H), gradients reaching `queries`.

        Row b's source images enter as understanding input, where the chat template places images, then the
        request and the instruction; the assistant turn opens with [IMG] and the queries:

            <|im_start|>user\n(<|vision_start|><|image_pad|>...<|vision_end|>)* EDIT_REQUEST instruction<|im_end|>\n
            <|im_start|>assistant\n[IMG] q_1 ... q_Q

        The images' tokens take Qwen2.5-VL's 3D positions (`get_rope_index`), as when the model answers about
        them. `min_pixels`/`max_pixels`: as in `chat`.
        """
        instructions = check_prompts(instructions, name="instructions")
        if not _is_list(sources) or len(sources) != len(instructions):
            raise ValueError(f"sources must hold one list of images per instruction; got "
                             f"{len(sources) if _is_list(sources) else type(sources).__name__} for "
                             f"{len(instructions)} instructions")
        self._require_generation()
        queries = _check_queries(queries, self.hidden_size)
        conversations = []
        for b, (images, text) in enumerate(zip(sources, instructions, strict=True)):
            if not _is_list(images) or len(images) == 0:
                raise ValueError(f"sources[{b}] must be a non-empty list of PIL images")
            parts = [{"type": "image", "image": image} for image in images]
            conversations.append([{"role": "user", "content": [*parts, {"type": "text", "text": EDIT_REQUEST + text}]}])
        texts, images = self._render(conversations)
        texts = [text + IMG_TOKEN for text in texts]
        inputs = self.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt",
                                **self._size(min_pixels, max_pixels)).to(self.device)
        ids, mask = inputs["input_ids"], inputs["attention_mask"].long()
        B, Q = len(texts), queries.shape[1]
        vl = self.model.model
        embeds = self.model.get_input_embeddings()(ids)  # (B, P, H)
        pixels = vl.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        image_slots = (ids == vl.config.image_token_id)[..., None]
        embeds = embeds.masked_scatter(image_slots, torch.cat(pixels).to(embeds.dtype))
        # the queries continue the text: their slots are text positions after [IMG]
        slot = self.tokenizer.convert_tokens_to_ids(QUERY_SLOT)
        whole_ids = torch.cat([ids, torch.full((B, Q), slot, dtype=ids.dtype, device=ids.device)], dim=1)
        whole_mask = torch.cat([mask, torch.ones(B, Q, dtype=mask.dtype, device=mask.device)], dim=1)
        token_types = inputs.get("mm_token_type_ids")
        if token_types is not None:
            token_types = torch.cat([token_types, torch.zeros(B, Q, dtype=token_types.dtype,
                                                              device=token_types.device)], dim=1)
        positions, _ = vl.get_rope_index(whole_ids, mm_token_type_ids=token_types,
                                         image_grid_thw=inputs["image_grid_thw"], attention_mask=whole_mask)
        return self._queries_read(embeds, queries.to(embeds.dtype).expand(B, -1, -1), whole_mask, positions)

    def _hidden_at_queries(self, texts: list[str], queries: torch.Tensor) -> torch.Tensor:
        """texts (B) + [IMG] + queries (1, Q, H) -> final-norm hidden states at the queries (B, Q, H)."""
        return self._queries_read(*self.query_sequence(texts, queries))

    def _queries_read(self, embeds: torch.Tensor, queries: torch.Tensor, mask: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        """A sequence's prefix embeddings (B, P, H), then queries (B, Q, H) -> hidden states at the queries: the
        prefix differentiated only when the backbone trains (`queries_after_prompt`)."""
        frozen = not any(p.requires_grad for p in self.model.model.language_model.parameters())
        if torch.is_grad_enabled() and queries.requires_grad and frozen:
            return self.queries_after_prompt(embeds, queries, mask, positions)
        return self.whole_sequence(embeds, queries, mask, positions)

    def query_sequence(self, texts: list[str], queries: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The generation sequence's parts: prompt + [IMG] embeddings (B, P, H), queries (B, Q, H), the
        attention mask (B, P + Q) and the M-RoPE positions (3, B, P + Q)."""
        batch = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt",
                               add_special_tokens=False)
        B, Q = len(texts), queries.shape[1]
        img = torch.full((B, 1), self.img_token_id, dtype=torch.long)
        input_ids = torch.cat([batch.input_ids.long(), img], dim=1).to(self.device)  # (B, L + 1)
        mask = torch.cat([batch.attention_mask.long(), torch.ones(B, 1 + Q, dtype=torch.long)], dim=1)
        mask = mask.to(self.device)  # (B, L + 1 + Q)
        embeds = self.model.get_input_embeddings()(input_ids)  # (B, L + 1, H)
        queries = queries.to(embeds.dtype).expand(B, -1, -1)  # (B, Q, H)
        # Explicit positions from the mask: padding must not shift a prompt's positions, and the
        # model's own fallback would reuse `rope_deltas` left over from the last image chat.
        return embeds, queries, mask, positions_from_mask(mask)  # positions (3, B, L + 1 + Q)

    def whole_sequence(self, embeds: torch.Tensor, queries: torch.Tensor, mask: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
        """The whole sequence in one pass (inference; the original code trains this way too) -> (B, Q, H)."""
        out = self.model.model.language_model(inputs_embeds=torch.cat([embeds, queries], dim=1), attention_mask=mask,
                                              position_ids=positions, use_cache=False)
        return out.last_hidden_state[:, -queries.shape[1]:]

    def queries_after_prompt(self, embeds: torch.Tensor, queries: torch.Tensor, mask: torch.Tensor,
                             positions: torch.Tensor) -> torch.Tensor:
        """Training the queries of a frozen backbone -> (B, Q, H). The attention is causal, so the prompt's keys
        and values do not depend on the queries: the prompt runs once without a graph and only the Q query
        positions are differentiated (attending to its cached K/V), which leaves the gradient unchanged and
        skips the backward through the prompt."""
        lm, P = self.model.model.language_model, embeds.shape[1]
        with torch.no_grad():
            prefix = lm(inputs_embeds=embeds, attention_mask=mask[:, :P], position_ids=positions[..., :P],
                        use_cache=True)
        past = prefix["cache"] if "cache" in prefix else prefix["past_key_values"]
        out = lm(inputs_embeds=queries, attention_mask=mask, position_ids=positions[..., P:], use_cache=True,
                 **{_cache_argument(type(lm)): past})
        return out.last_hidden_state[:, -queries.shape[1]:]  # (B, Q, H)

    def answer(self, images: list[Image.Image | None], questions: list[str], **options) -> list[str]:
        """One question per image (None: text only); returns B answers. `options`: those of `chat`."""
        questions = check_prompts(questions, name="questions")
        if not _is_list(images) or len(images) != len(questions):
            raise ValueError(
                f"images must be a list with one entry (PIL image or None) per question; got "
                f"{len(images) if _is_list(images) else type(images).__name__} for "
                f"{len(questions)} questions"
            )
        conversations = [
            [{"role": "user", "content": q if im is None else [{"type": "image", "image": im},
                                                                 {"type": "text", "text": q}]}]
            for im, q in zip(images, questions, strict=True)
        ]
        return self.chat(conversations, **options)

    @torch.no_grad()
    def chat(
        self,
        conversations: list[list[dict]],
        *,
        max_new_tokens: int = 64,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        stop_tokens: Sequence[str] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> list[str]:
        """The next assistant reply of each conversation (batched, left padded), as decoded (not stripped).

        Sampling options left None come from the model's generation config (a folder's generation_config.json;
        greedy without one); sampling without a top_k from either draws from the whole distribution (top_k 0).
        `min_pixels`/`max_pixels` bound each image's pixel count for this call (default: `pixel_bounds`).
        `stop_tokens` end a reply (default: the generation config's eos tokens, else <|im_end|> and
        <|endoftext|>). `on_text` (one conversation only) receives the reply as it is generated, in pieces of
        whole words where possible, which concatenate to the returned reply.
        """
        self._require_tokenizer()
        if on_text is not None and len(conversations) != 1:
            raise ValueError(f"on_text streams one conversation; got {len(conversations)}")
        inputs = self.inputs(conversations, min_pixels=min_pixels, max_pixels=max_pixels)
        options = self.generate_options(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                                        stop_tokens=stop_tokens)
        # A private RNG stream: seeded sampling is reproducible and the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, **options,
                streamer=None if on_text is None else _CallbackStreamer(self.tokenizer, on_text),
            )  # (B, L + new)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def inputs(self, conversations: list[list[dict]], *, min_pixels: int | None = None,
               max_pixels: int | None = None) -> transformers.BatchFeature:
        """What the model reads for these conversations: input_ids and attention_mask (B, L), left padded, and
        for their images pixel_values (patches, C * T * P * P) and image_grid_thw (images, 3), on the device."""
        texts, images = self._render(conversations)
        size = self._size(min_pixels, max_pixels)
        return self.processor(text=texts, images=images or None, padding=True, padding_side="left",
                              return_tensors="pt", **size).to(self.device)

    def _size(self, min_pixels: int | None, max_pixels: int | None) -> dict:
        """The processor's `size` for pixel bounds other than its own; {} for its own."""
        if min_pixels is None and max_pixels is None:
            return {}
        low, high = self.pixel_bounds
        low, high = low if min_pixels is None else min_pixels, high if max_pixels is None else max_pixels
        for name, value in (("min_pixels", low), ("max_pixels", high)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if low > high:
            raise ValueError(f"min_pixels {low} is above max_pixels {high}")
        return {"size": {"shortest_edge": low, "longest_edge": high}}

    def generate_options(self, *, stop_tokens: Sequence[str] | None = None, **sampling) -> dict:
        """generate()'s options: the sampling settings given (not None) over the generation config's, the
        stop ids, and the pad id."""
        options = {k: v for k, v in sampling.items() if v is not None}
        config = self.model.generation_config
        if options.get("do_sample", config.do_sample) and config.top_k is None:
            options.setdefault("top_k", 0)  # no top-k cut unless a generation config asks for one
        if stop_tokens is None:
            options["eos_token_id"] = self.stop_ids
        else:
            options["eos_token_id"] = [self.token_id(t) for t in stop_tokens]
        if config.pad_token_id is None:
            options["pad_token_id"] = self.tokenizer.pad_token_id
        return options

    def token_id(self, token: str) -> int:
        """The id of one token of the tokenizer; a ValueError for a string that is not one."""
        ids = self.tokenizer.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"stop token {token!r} is not a token of this tokenizer")
        return ids[0]

    def training_inputs(self, conversations: list[list[dict]]) -> tuple[transformers.BatchFeature, torch.Tensor]:
        """Whole conversations (the format of `chat`, assistant turns included) as the model reads them to learn
        from: the inputs of `inputs` without a generation prompt, and labels (B, L) holding the ids of every
        assistant turn's content and of the <|im_end|> that closes it, -100 elsewhere (the system and user turns,
        their images, each turn's `<|im_start|>assistant\n` header, the newline after <|im_end|>, the padding).
        """
        texts, images = self._render(conversations, add_generation_prompt=False)
        inputs = self.processor(text=texts, images=images or None, padding=True, padding_side="left",
                                return_tensors="pt")
        turns = [sum(m["role"] == "assistant" for m in c) for c in conversations]
        return inputs, self.assistant_labels(inputs["input_ids"], turns)

    def assistant_labels(self, input_ids: torch.Tensor, turns: list[int]) -> torch.Tensor:
        """input_ids (B, L) of rendered conversations -> labels (B, L): from each `<|im_start|>assistant\n`
        header's end through the <|im_end|> that follows it, the ids; -100 elsewhere. Row b must hold exactly
        turns[b] assistant turns, each closed (a ValueError otherwise: a text that spells out the template's
        control tokens)."""
        header = self.tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        end = self.token_id("<|im_end|>")
        labels = torch.full_like(input_ids, -100)
        for row, expected in enumerate(turns):
            ids = input_ids[row].tolist()
            starts = [p + len(header) for p in range(len(ids) - len(header) + 1) if ids[p:p + len(header)] == header]
            ends = [next((q for q in range(s, len(ids)) if ids[q] == end), None) for s in starts]
            if len(starts) != expected or None in ends:
                raise ValueError(f"conversation {row} renders {len(starts)} assistant turns ({ends.count(None)} "
                                 f"unclosed) for its {expected} assistant messages: does a text spell out "
                                 "<|im_start|> or <|im_end|>?")
            for start, stop in zip(starts, ends, strict=True):
                labels[row, start:stop + 1] = input_ids[row, start:stop + 1]
        return labels

    def _render(self, conversations: list[list[dict]], *,
                add_generation_prompt: bool = True) -> tuple[list[str], list[Image.Image]]:
        """Chat-template texts (one per conversation) and all their images, in order."""
        if not isinstance(conversations, Sequence) or len(conversations) == 0:
            raise ValueError("conversations must be a non-empty list of conversations (lists of messages)")
        texts, images = [], []
        for i, conversation in enumerate(conversations):
            messages, conv_images = _check_conversation(conversation, where=f"conversations[{i}]")
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.processor.chat_template,
                                                      tokenize=False, add_generation_prompt=add_generation_prompt)
            texts.append(text)
            images.extend(conv_images)
        return texts, images

    def save_tokenizer(self, directory: str | Path) -> None:
        """Write the tokenizer (with chat template and BLIP3-o's added tokens) to `directory`; for a checkpoint
        tokenizer also what `tokenizer_dir` is read for: preprocessor_config.json, chat_template.jinja and the
        folder's generation config, if the model was loaded with one."""
        self._require_tokenizer()
        self.tokenizer.save_pretrained(str(directory))
        if self.config.tokenizer == "checkpoint":
            self.processor.image_processor.save_pretrained(str(directory))
            (Path(directory) / "chat_template.jinja").write_text(self.processor.chat_template)
            if self.folder_generation_config is not None:
                self.folder_generation_config.save_pretrained(str(directory))

    def init_buffers(self) -> None:
        """Recompute the non-persistent RoPE buffers on the parameters' device.

        A meta-device build leaves them on meta and load_state_dict never fills them (they are
        not in the state dict), so call this after `load_state_dict(..., assign=True)`.
        """
        text_rope = self.model.model.language_model.rotary_emb
        vision_rope = self.model.model.visual.rotary_pos_emb
        with torch.device("cpu"):
            text_inv, _ = text_rope.compute_default_rope_parameters(text_rope.config)
            vision_inv, _ = vision_rope.compute_axial_rope_parameters(vision_rope.config)
        for rope, inv_freq in ((text_rope, text_inv), (vision_rope, vision_inv)):
            rope.inv_freq = inv_freq.to(self.device)
            rope.original_inv_freq = inv_freq.clone().to(self.device)


@functools.cache
def _cache_argument(model_class: type) -> str:
    """The KV-cache argument of a transformers model's forward: `cache` in recent 5.x releases (which
    deprecate `past_key_values`), `past_key_values` in earlier ones (the GPU image's 5.17, say)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) attention mask -> (3, B, L) mrope position ids, counting only real tokens.

    Text-only sequences use the same position on all three mrope axes; padding gets position 0.
    """
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
    return positions.unsqueeze(0).expand(3, -1, -1)  # (3, B, L)


def _load_tokenizer(config: BackboneConfig, tokenizer_dir: Path | None, *, add_blip3o_tokens: bool = True):
    if config.tokenizer == "builtin":
        if tokenizer_dir is not None:
            raise ValueError("this config uses the builtin tokenizer; do not pass tokenizer_dir")
        return load_builtin_tokenizer()
    if tokenizer_dir is None:
        raise ValueError("this config needs tokenizer_dir: a folder with the checkpoint's HF tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    # As BLIP3-o's training script: [IMG], [/IMG], <image> appended after Qwen's 151665 tokens.
    missing = [t for t in BLIP3O_SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing and add_blip3o_tokens:
        tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def _image_processor(config: BackboneConfig, folder: Path | None) -> Qwen2VLImageProcessorPil:
    """The folder's image processor as `from_pretrained` configures it (its preprocessor_config.json, the
    class defaults where it says nothing); the config's pixel bounds and patch sizes without one."""
    if folder is not None and os.path.lexists(folder / PREPROCESSOR_CONFIG):
        check_folder_config(folder / PREPROCESSOR_CONFIG, PREPROCESSOR_BOUNDS)
        return Qwen2VLImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
    return Qwen2VLImageProcessorPil(
        min_pixels=config.min_pixels, max_pixels=config.max_pixels, patch_size=config.patch_size,
        temporal_patch_size=config.temporal_patch_size, merge_size=config.spatial_merge_size,
    )


def check_folder_config(path: Path, bounds: dict[str, tuple[type, Bound]]) -> None:
    """Refuse a folder's processor or generation config that transformers must not read: not a regular file,
    not a JSON object, or a field of `bounds` ("size.longest_edge": a field of an object) of the wrong type or
    out of bounds (a CheckpointError naming the file and the field)."""
    raw = read_json(path)
    for name, (kind, bound) in bounds.items():
        holder, _, key = name.rpartition(".")
        fields = raw.get(holder) if holder else raw
        if isinstance(fields, dict) and fields.get(key) is not None:
            check_value(name, fields[key], kind, bound, where=f"{path}: ")


def _chat_template(folder: Path | None) -> str | None:
    """The processor's chat template a folder holds (chat_template.jinja or chat_template.json), if any."""
    if folder is None:
        return None
    if os.path.lexists(folder / "chat_template.jinja"):
        return regular_file(folder / "chat_template.jinja").read_text()
    if os.path.lexists(folder / "chat_template.json"):
        return read_json(folder / "chat_template.json").get("chat_template")
    return None


def _check_image_processor(image_processor, config: BackboneConfig) -> None:
    """The processor's patches must be the vision tower's."""
    pairs = (("patch_size", config.patch_size), ("temporal_patch_size", config.temporal_patch_size),
             ("merge_size", config.spatial_merge_size))
    wrong = [f"{name} {getattr(image_processor, name)} (the model's {expected})" for name, expected in pairs
             if getattr(image_processor, name) != expected]
    if wrong:
        raise CheckpointError(f"the image processor does not fit the vision tower: {', '.join(wrong)}")


def _check_tokenizer(tokenizer, config: BackboneConfig) -> None:
    """The tokenizer must fit the embedding and agree with the model on the vision token ids."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocab_size is {config.vocab_size}")
    for token, expected in config.special_ids.items():
        got = tokenizer.convert_tokens_to_ids(token)
        if got != expected:
            raise ValueError(f"tokenizer maps {token} to {got}, but the model config expects {expected}")


def _is_list(x) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, (str, Image.Image))


def check_prompts(prompts: list[str], *, name: str = "prompts") -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"{name} must be a list of strings, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError(f"{name} must not be empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(p).__name__}")
        if not p.strip():
            raise ValueError(f"{name}[{i}] is empty; give it some text")
    return list(prompts)


def _check_queries(queries: torch.Tensor, hidden_size: int) -> torch.Tensor:
    if not isinstance(queries, torch.Tensor):
        raise TypeError(f"queries must be a torch.Tensor of shape (1, Q, {hidden_size})")
    if queries.ndim != 3 or queries.shape[0] != 1 or queries.shape[2] != hidden_size or queries.shape[1] == 0:
        raise ValueError(f"queries must have shape (1, Q, {hidden_size}), got {tuple(queries.shape)}")
    return queries


def _check_conversation(conversation: list[dict], *, where: str) -> tuple[list[dict], list[Image.Image]]:
    """Validated messages for the chat template (images as bare markers) and the images, in order."""
    if not isinstance(conversation, Sequence) or len(conversation) == 0:
        raise ValueError(f"{where} must be a non-empty list of messages")
    messages, images = [], []
    for j, message in enumerate(conversation):
        at = f"{where}[{j}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"{at} must be a dict with 'role' in {ROLES} and 'content'")
        content = message.get("content")
        if isinstance(content, str):
            messages.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, Sequence) or len(content) == 0:
            raise ValueError(f"{at}['content'] must be a string or a non-empty list of parts")
        parts = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                images.extend(check_images([part.get("image")], name=f"{at}['content'][{k}]['image']"))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"{at}['content'][{k}] must be {{'type': 'text', 'text': str}} or "
                                 f"{{'type': 'image', 'image': PIL.Image}}")
        messages.append({"role": message["role"], "content": parts})
    return messages, images

