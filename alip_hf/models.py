"""Named model sizes, `--config_overrides`, and the builders of the model and processor that training starts from.

Only the standard library is imported at module level (the argument parser reads `MODEL_CONFIGS`); torch,
transformers and `modeling_alip` are imported by the builders.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import Accelerator

    from alip_hf.training.arguments import ModelArguments
    from modeling_alip import ALIPConfig, ALIPModel, ALIPProcessor

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Named model sizes
# ----------------------------------------------------------------------------------------------------------------

# transformers' CLIP default activation, and OpenAI CLIP's (x * sigmoid(1.702 x)).
QUICK_GELU = "quick_gelu"
# torch.nn.GELU: open_clip's default (`quick_gelu: false`), so the official ALIP code's towers.
GELU = "gelu"

# Tower sizes only (no activation): recaption/tiny.py reuses TINY_TOWER for BLIP and Llama test models.
TINY_TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
SMALL_TOWER = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)


def _vit_b(patch_size: int, hidden_act: str) -> dict:
    """CLIP ViT-B/`patch_size` (Radford et al. 2021, Table 19; open_clip `ViT-B-<patch>.json`): text 512 wide,
    12 layers, 8 heads, context 77, vocabulary 49408; image 768 wide, 12 layers, 12 heads (head width 64),
    224 px; MLP ratio 4; joint embedding 512."""
    return dict(
        text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                         vocab_size=49408, max_position_embeddings=77, hidden_act=hidden_act),
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           image_size=224, patch_size=patch_size, hidden_act=hidden_act),
        projection_dim=512,
    )


# `ALIPConfig` keyword arguments of each `--model_config` (each tower states its activation).
MODEL_CONFIGS = {
    "tiny": dict(text_config=dict(TINY_TOWER, vocab_size=49408, max_position_embeddings=77, hidden_act=QUICK_GELU),
                 vision_config=dict(TINY_TOWER, image_size=30, patch_size=2, hidden_act=QUICK_GELU),
                 projection_dim=16),
    "small": dict(text_config=dict(SMALL_TOWER, vocab_size=49408, max_position_embeddings=77, hidden_act=QUICK_GELU),
                  vision_config=dict(SMALL_TOWER, image_size=32, patch_size=4, hidden_act=QUICK_GELU),
                  projection_dim=128),
    "vit-b-32": _vit_b(32, GELU),
    "vit-b-16": _vit_b(16, GELU),
    "vit-b-32-quickgelu": _vit_b(32, QUICK_GELU),
}

# Where each size comes from (tests/test_model_sizes.py pins the architectures to the open_clip files cited).
MODEL_SOURCES = {
    "tiny": "this project: a smoke-test size that trains on CPU in seconds (odd intermediate size on purpose)",
    "small": "this project: the demo size, learns the bundled 64 px clip art in a few CPU minutes "
             "(image 32, patch 4: 64 patches)",
    "vit-b-32": "open_clip model_configs/ViT-B-32.json (no quick_gelu: GELU), the official ALIP code's "
                "ViT-B/32 (its create_model keeps open_clip's GELU default)",
    "vit-b-16": "open_clip model_configs/ViT-B-16.json (no quick_gelu: GELU), the ALIP/VeCLIP ViT-B/16 "
                "trained from scratch",
    "vit-b-32-quickgelu": "open_clip model_configs/ViT-B-32-quickgelu.json: OpenAI CLIP ViT-B/32 (QuickGELU), "
                          "the architecture of OpenAI's released weights",
}


# ----------------------------------------------------------------------------------------------------------------
# --config_overrides
# ----------------------------------------------------------------------------------------------------------------


def _value(text: str) -> int | float | bool | str:
    """`"128"` -> 128, `"0.5"` -> 0.5, `"true"`/`"false"` -> bool, anything else stays text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_config_overrides(text: str | dict) -> dict[str, int | float | bool | str]:
    """`"text_config.hidden_size=128,lcg_gamma=1.5"` -> `{"text_config.hidden_size": 128, "lcg_gamma": 1.5}`.

    A mapping (as read back from `train_args.yaml`) is returned with its values unchanged.
    """
    if isinstance(text, dict):
        return dict(text)
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--config_overrides: {item!r} is not key=value (e.g. text_config.hidden_size=128)")
        overrides[key.strip()] = _value(value.strip())
    return overrides


def apply_config_overrides(config: dict, overrides: dict) -> dict:
    """A copy of the `ALIPConfig` keyword arguments `config` with the dotted `overrides` set.

    Raises:
        ValueError: naming the key, for a key that `ALIPConfig` (or its `text_config`/`vision_config`) lacks.
    """
    from modeling_alip import ALIPConfig

    known = ALIPConfig().to_dict()
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target, schema = config, known
        for parent in parents:
            if not isinstance(schema.get(parent), dict):
                raise ValueError(f"--config_overrides: unknown key {key!r} ({parent!r} is not a sub-configuration "
                                 "of ALIPConfig: text_config, vision_config)")
            target, schema = target.setdefault(parent, {}), schema[parent]
        if leaf not in schema or isinstance(schema[leaf], dict):
            raise ValueError(f"--config_overrides: unknown key {key!r}; ALIPConfig"
                             f"{''.join('.' + p for p in parents)} has no field {leaf!r}")
        target[leaf] = value
    return config


def model_config(args: ModelArguments) -> ALIPConfig:
    """The configuration a run builds: the loaded model's or the named size's, with `--config_overrides`."""
    from modeling_alip import ALIPConfig

    overrides = parse_config_overrides(args.config_overrides) if args.config_overrides else {}
    if args.model_name_or_path:
        config = ALIPConfig.from_pretrained(args.model_name_or_path, **hub_kwargs(args, remote_code=False))
        return ALIPConfig.from_dict(apply_config_overrides(config.to_dict(), overrides)) if overrides else config
    return ALIPConfig(**apply_config_overrides(MODEL_CONFIGS[args.model_config], overrides))


# ----------------------------------------------------------------------------------------------------------------
# Model and processor
# ----------------------------------------------------------------------------------------------------------------


def build_model(args: ModelArguments, seed: int) -> ALIPModel:
    """A pretrained ALIP/CLIP model, or a freshly initialised one of a named size; `--config_overrides` apply
    to both. `seed` seeds the initialisation (of a new model, and of the LoRA adapters)."""
    import torch

    from modeling_alip import ALIPModel

    torch.manual_seed(seed)
    if args.model_name_or_path:
        from alip_hf.pretrained import load_model

        config = {"config": model_config(args)} if args.config_overrides else {}
        model = load_model(args.model_name_or_path, ALIPModel, allow_new_weights=args.allow_new_weights,
                           **hub_kwargs(args, remote_code=False), **config)
    else:
        model = ALIPModel(model_config(args))
    if args.freeze_vision:
        _freeze(model.vision_model, model.visual_projection)
    if args.freeze_text:
        _freeze(model.text_model, model.text_projection)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_rank:
        from peft import get_peft_model

        lora = lora_config(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                           target_modules=args.lora_target_modules)
        model = get_peft_model(model, lora)
    return model


def lora_config(**kwargs):
    """peft's `LoraConfig(**kwargs)` for an [`ALIPModel`], with the gates in `modules_to_save`.

    The gates' running means are buffers, outside every LoRA-wrapped layer: with a plain `LoraConfig`, a saved
    adapter leaves them out, and reloading and merging it brings back the base model's means. As
    `modules_to_save`, the gates are trained (their means updated) in a copy that the adapter saves and
    `merge_and_unload` puts in place. Other `modules_to_save` given are kept.
    """
    from peft import LoraConfig

    from modeling_alip.modeling_alip import GATE_MODULES

    modules_to_save = list(kwargs.pop("modules_to_save", None) or [])
    modules_to_save += [name for name in GATE_MODULES if name not in modules_to_save]
    return LoraConfig(modules_to_save=modules_to_save, **kwargs)


def _freeze(*modules):
    for module in modules:
        module.requires_grad_(False)


def build_processor(args: ModelArguments, model: ALIPModel) -> ALIPProcessor:
    """The processor saved with `--model_name_or_path` (`alip_hf.pretrained.load_processor`: strict, CLIP's
    preprocessing at the model's sizes only for a model saved without one), with the tokenizer of
    `--tokenizer_name_or_path` when given; a new model gets CLIP's preprocessing and the CLIP BPE tokenizer."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    from modeling_alip import ALIPProcessor, clip_tokenizer

    if args.model_name_or_path is not None:
        from alip_hf.pretrained import load_processor

        processor = load_processor(args.model_name_or_path, model.config,
                                   tokenizer_name_or_path=args.tokenizer_name_or_path, **hub_kwargs(args))
        if isinstance(processor, ALIPProcessor):
            return processor
        return ALIPProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer)
    size = model.config.vision_config.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    if args.tokenizer_name_or_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path, **hub_kwargs(args))
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


def core_model(model, accelerator: Accelerator | None = None) -> ALIPModel:
    """The model under the DDP/compile wrapper (when `accelerator` prepared it) and the LoRA wrapper: the one
    place that unwraps a model."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


