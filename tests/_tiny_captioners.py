"""Tiny randomly initialised captioners (BLIP; a chat LLaVA) and chat LM, saved like Hub checkpoints.

For the tests and benchmarks (a test helper: not part of the installed package).

Their text is gibberish (`w17 w3 w88`), but every piece of the plumbing is real: `AutoProcessor` /
`AutoTokenizer` / `AutoModel*` loading from a directory, batched `generate`, chat templates, padding.
Nothing is downloaded: the vocabularies are written here and the weights are drawn from a seed.
"""

from __future__ import annotations

import os

import torch

from alip_hf.model_sizes import TINY_TOWER

# 1.0 instead of transformers' 0.02: with tiny towers at 0.02 the decoder ignores the image and every
# caption is the same string, which would hide a caption joined to the wrong row.
_INIT_RANGE = 1.0
_WORDS = [f"w{i}" for i in range(120)]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# The same, for processors: a message's content is a list of `{"type": "image"}` / `{"type": "text"}` parts.
CHAT_TEMPLATE_WITH_IMAGES = (
    "{% for message in messages %}<|{{ message['role'] }}|> "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    " </s> {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def save_tiny_captioner(path: str, seed: int = 0, image_size: int = 30) -> str:
    """A `BlipForConditionalGeneration` (hidden 32, 2 layers, 4 heads) + `BlipProcessor`, saved to `path`."""
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    os.makedirs(path, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + _WORDS
    vocab_file = os.path.join(path, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab_file, bos_token="[DEC]")
    config = BlipConfig(
        text_config=dict(
            TINY_TOWER,
            vocab_size=len(vocab),
            bos_token_id=vocab.index("[DEC]"),
            eos_token_id=vocab.index("[SEP]"),
            sep_token_id=vocab.index("[SEP]"),
            pad_token_id=vocab.index("[PAD]"),
            max_position_embeddings=512,
            initializer_range=_INIT_RANGE,
        ),
        vision_config=dict(TINY_TOWER, image_size=image_size, patch_size=2, initializer_range=_INIT_RANGE),
        projection_dim=16,
        initializer_range=_INIT_RANGE,
    )
    torch.manual_seed(seed)
    BlipForConditionalGeneration(config).save_pretrained(path)
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor, tokenizer).save_pretrained(path)
    return path


def _word_level_tokenizer(extra_specials: tuple[str, ...] = ()):
    """A WordLevel tokenizer over `w0 .. w119` and a few English words, with the chat template above."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", *extra_specials]
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    corpus = [" ".join(_WORDS), "a photo of the cat dog on in with red blue green man woman caption web text image"]
    backend.train_from_iterator(corpus, trainer=trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _tiny_llama(tokenizer) -> dict:
    return dict(
        TINY_TOWER,
        model_type="llama",
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=_INIT_RANGE,
    )


def save_tiny_chat_lm(path: str, seed: int = 0) -> str:
    """A `LlamaForCausalLM` (hidden 32, 2 layers, 4 heads) with a WordLevel tokenizer and a chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _word_level_tokenizer()
    config = LlamaConfig(**{k: v for k, v in _tiny_llama(tokenizer).items() if k != "model_type"})
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_chat_captioner(path: str, seed: int = 0, image_size: int = 30) -> str:
    """A `LlavaForConditionalGeneration` (tiny CLIP vision tower + tiny Llama) whose processor has a chat
    template with an image slot: the path that LLaVA, Qwen-VL or SmolVLM captioners take."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _word_level_tokenizer(("<image>",))
    vision = dict(TINY_TOWER, model_type="clip_vision_model", image_size=image_size, patch_size=2,
                  initializer_range=_INIT_RANGE)
    config = LlavaConfig(
        vision_config=vision,
        text_config=_tiny_llama(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        initializer_range=_INIT_RANGE,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
        image_token="<image>",
        chat_template=CHAT_TEMPLATE_WITH_IMAGES,
    ).save_pretrained(path)
    return path
