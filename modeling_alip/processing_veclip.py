"""VeCLIP processor: [`ALIPProcessor`] with the TensorFlow-exact image processor and a T5 tokenizer.

Released VeCLIP models are `CLIPModel`s whose text tower reads T5 ("t5-base") SentencePiece ids: `<pad>` = 0,
`</s>` = 1, no start token. transformers' CLIP text tower pools the hidden state at the *first* position whose
id equals `text_config.eos_token_id`; if that id is not the tokenizer's end id, every text feature silently
comes from the wrong position. `check_text_token_ids` turns that into an error naming both ids, and
`align_text_config` writes the tokenizer's ids into a new config.

The processor class itself is `ALIPProcessor` (same call, both text paths), so train.py and eval.py treat a
VeCLIP checkpoint like any other; only its image processor and tokenizer differ.
"""

from __future__ import annotations

from transformers.utils import logging

from .image_processing_veclip import VeCLIPImageProcessor
from .processing_alip import ALIPProcessor

logger = logging.get_logger(__name__)

# transformers' CLIP text tower pools at argmax(input_ids) when eos_token_id == 2 (configs written before
# transformers PR #24773); that is the end token only for tokenizers whose end id is their largest id.
LEGACY_ARGMAX_EOS_ID = 2


def _tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def check_text_token_ids(text_config, tokenizer) -> None:
    """Raises `ValueError` unless `text_config` pools at the tokenizer's end token and covers its special ids.

    Args:
        text_config: a `CLIPTextConfig` (`eos_token_id`, `vocab_size`).
        tokenizer: any transformers tokenizer (T5 for VeCLIP).
    """
    name = _tokenizer_name(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None or tokenizer.eos_token is None:
        raise ValueError(
            f"tokenizer {name} has no end token (eos_token): a CLIP text tower pools at the first end token, "
            "so it cannot be used"
        )
    unk = tokenizer.unk_token_id
    if unk is not None and eos == unk and tokenizer.eos_token != tokenizer.unk_token:
        raise ValueError(f"tokenizer {name}: its end token {tokenizer.eos_token!r} is not in its vocabulary")
    for role, token_id in (("end", eos), ("padding", tokenizer.pad_token_id)):
        if token_id is not None and not 0 <= token_id < text_config.vocab_size:
            raise ValueError(
                f"tokenizer {name}: {role} token id {token_id} is outside the text tower's vocab_size "
                f"{text_config.vocab_size}"
            )
    if text_config.eos_token_id != eos:
        raise ValueError(
            f"text_config.eos_token_id is {text_config.eos_token_id} but tokenizer {name} ends texts with "
            f"{tokenizer.eos_token!r} = id {eos}: the text tower pools at the first end token, so every text "
            "feature would be read at the wrong position. Use the tokenizer the model was trained with, or, if "
            "the config is what is wrong, rewrite its ids with `align_text_config` (alip_hf.convert from_veclip: "
            "--set_token_ids_from_tokenizer)."
        )
    if eos == LEGACY_ARGMAX_EOS_ID and eos != len(tokenizer) - 1:
        raise ValueError(
            f"text_config.eos_token_id is {eos}, which transformers' CLIP treats as a legacy config and pools at "
            f"the largest id instead of the end token; tokenizer {name} has larger ids, so pooling would be wrong"
        )
    if len(tokenizer) > text_config.vocab_size:
        logger.warning(
            f"tokenizer {name} has {len(tokenizer)} tokens but the text tower only {text_config.vocab_size}: ids "
            f">= {text_config.vocab_size} (added or sentinel tokens) would fail in the embedding"
        )


def align_text_config(text_config, tokenizer) -> None:
    """Writes the tokenizer's end and padding ids into `text_config` (for a new model or a mislabelled config)."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {_tokenizer_name(tokenizer)} has no end token (eos_token)")
    text_config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        text_config.pad_token_id = tokenizer.pad_token_id


def veclip_processor(config, tokenizer, resize_only: bool = False):
    """The processor of a VeCLIP checkpoint: [`ALIPProcessor`] with a [`VeCLIPImageProcessor`] at the vision
    tower's size and `tokenizer` (T5), after checking that `config` pools at the tokenizer's end token.

    The tokenizer's `model_max_length` is set to the text tower's context, so that truncation keeps the end
    token within the position embeddings (T5's own default is 512). Texts are not CLIP-cleaned
    (`text_cleaning="none"`): T5 is cased, and the official notebook tokenizes texts as they are.

    Args:
        config: a `CLIPConfig` / `ALIPConfig`.
        tokenizer: the tokenizer the model was trained with.
        resize_only: the official variant that squashes images to a square instead of resize + centre crop.
    """
    check_text_token_ids(config.text_config, tokenizer)
    tokenizer.model_max_length = config.text_config.max_position_embeddings
    image_processor = VeCLIPImageProcessor(crop_size=config.vision_config.image_size, resize_only=resize_only)
    return ALIPProcessor(image_processor=image_processor, tokenizer=tokenizer, text_cleaning="none")


__all__ = ["align_text_config", "check_text_token_ids", "veclip_processor"]
