"""Named model sizes and the builders of the model and processor that training starts from."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
)

from modeling_alip import ALIPConfig, ALIPModel, ALIPProcessor, clip_tokenizer

if TYPE_CHECKING:
    from alip_hf.training.arguments import ModelArguments

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Model and processor
# ----------------------------------------------------------------------------------------------------------------

TINY_TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
SMALL_TOWER = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
MODEL_CONFIGS = {
    # A smoke-test size: trains on CPU in minutes.
    "tiny": dict(text_config=dict(TINY_TOWER, vocab_size=49408, max_position_embeddings=77),
                 vision_config=dict(TINY_TOWER, image_size=30, patch_size=2), projection_dim=16),
    # The demo size: learns the bundled 64 px clip art in a few CPU minutes (image 32, patch 4: 64 patches).
    "small": dict(text_config=dict(SMALL_TOWER, vocab_size=49408, max_position_embeddings=77),
                  vision_config=dict(SMALL_TOWER, image_size=32, patch_size=4), projection_dim=128),
    # OpenAI CLIP ViT-B/32 and ViT-B/16 (Radford et al. 2021, Table 19), the towers ALIP and VeCLIP train.
    **{
        name: dict(
            text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                             vocab_size=49408, max_position_embeddings=77),
            vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                               image_size=224, patch_size=patch),
            projection_dim=512,
        )
        for name, patch in (("vit-b-32", 32), ("vit-b-16", 16))
    },
}


def build_model(args: ModelArguments) -> ALIPModel:
    """A pretrained ALIP/CLIP model, or a freshly initialised one of a named size."""
    if args.model_name_or_path:
        model = ALIPModel.from_pretrained(args.model_name_or_path, **hub_kwargs(args, remote_code=False))
    else:
        model = ALIPModel(ALIPConfig(**MODEL_CONFIGS[args.model_config]))
    if args.freeze_vision:
        _freeze(model.vision_model, model.visual_projection)
    if args.freeze_text:
        _freeze(model.text_model, model.text_projection)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=args.lora_target_modules)
        model = get_peft_model(model, lora)
    return model


def _freeze(*modules):
    for module in modules:
        module.requires_grad_(False)


def build_processor(args: ModelArguments, model: ALIPModel) -> ALIPProcessor:
    """The image processor saved with `--model_name_or_path` (VeCLIP's, CLIP's, ...) or CLIP's preprocessing at
    the model's image size, with `--tokenizer_name_or_path`, the saved tokenizer, or the CLIP BPE tokenizer."""
    source = args.model_name_or_path
    if source is not None and _has_file(source, "preprocessor_config.json", args):
        image_processor = AutoImageProcessor.from_pretrained(source, **hub_kwargs(args))
    else:
        size = model.config.vision_config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    tokenizer_path = args.tokenizer_name_or_path
    if tokenizer_path is None and source is not None and _has_file(source, "tokenizer_config.json", args):
        tokenizer_path = source
    if tokenizer_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, **hub_kwargs(args))
    else:
        tokenizer = clip_tokenizer(model_max_length=model.config.text_config.max_position_embeddings)
    return ALIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def hub_kwargs(args: ModelArguments, remote_code: bool = True) -> dict:
    """`from_pretrained` keywords of `--model_revision`, `--cache_dir` and `--trust_remote_code` (run_clip.py's
    flags). The model class is always ALIPModel, so remote code only concerns tokenizers and image processors."""
    kwargs = {"revision": args.model_revision, "cache_dir": args.cache_dir}
    if remote_code:
        kwargs["trust_remote_code"] = args.trust_remote_code
    return kwargs


def _has_file(source: str, filename: str, args: ModelArguments) -> bool:
    """Whether the local directory or Hub repository `source` holds `filename` (at `--model_revision`)."""
    if Path(source).is_dir():
        return (Path(source) / filename).exists()
    from transformers.utils import cached_file

    try:
        return cached_file(source, filename, revision=args.model_revision, cache_dir=args.cache_dir,
                           _raise_exceptions_for_missing_entries=False) is not None
    except OSError:
        return False


def core_model(model, accelerator: Accelerator | None = None) -> ALIPModel:
    """The model under the DDP/compile wrapper (when `accelerator` prepared it) and the LoRA wrapper: the one
    place that unwraps a model."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


