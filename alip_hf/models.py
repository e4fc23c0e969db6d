"""The builders of the model and processor that training starts from, and the one model unwrapper.

The named sizes and `--config_overrides` they build are `alip_hf.model_sizes`. Only the standard library is
imported at module level; torch, transformers and `modeling_alip` are imported by the builders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from alip_hf.model_sizes import MODEL_CONFIGS, apply_config_overrides, parse_config_overrides

if TYPE_CHECKING:
    from accelerate import Accelerator

    from alip_hf.training.arguments import ModelArguments
    from modeling_alip import ALIPConfig, ALIPModel, ALIPProcessor


# ----------------------------------------------------------------------------------------------------------------
# Model and processor
# ----------------------------------------------------------------------------------------------------------------


def model_config(args: ModelArguments, loss_config: dict | None = None) -> ALIPConfig:
    """The configuration a run builds: the loaded model's or the named size's, with `--config_overrides`, then
    the recipe's loss fields (`Recipe.model_config`), which record the loss the model is trained with."""
    from modeling_alip import ALIPConfig

    overrides = parse_config_overrides(args.config_overrides) if args.config_overrides else {}
    overrides = {**overrides, **(loss_config or {})}
    if args.model_name_or_path:
        config = ALIPConfig.from_pretrained(args.model_name_or_path, **hub_kwargs(args, remote_code=False))
        return ALIPConfig.from_dict(apply_config_overrides(config.to_dict(), overrides)) if overrides else config
    return ALIPConfig(**apply_config_overrides(MODEL_CONFIGS[args.model_config], overrides))


def build_model(args: ModelArguments, seed: int, loss_config: dict | None = None,
                max_text_length: int | None = None) -> ALIPModel:
    """A pretrained ALIP/CLIP model, or a freshly initialised one of a named size; `--config_overrides` and the
    recipe's loss fields (`loss_config`, see `model_config`) apply to both. `seed` seeds the initialisation (of a
    new model, and of the LoRA adapters).

    `max_text_length` (`--max_text_length`) beyond the text tower's positions: a new model is built with that many
    positions; a pretrained one is stretched to it by Long-CLIP's rule (`ALIPModel.stretch_text_positions`,
    recorded in its config)."""
    import torch

    from modeling_alip import ALIPModel

    torch.manual_seed(seed)
    if args.model_name_or_path:
        from alip_hf.pretrained import load_model

        config = {"config": model_config(args, loss_config)} if args.config_overrides or loss_config else {}
        model = load_model(args.model_name_or_path, ALIPModel, allow_new_weights=args.allow_new_weights,
                           **hub_kwargs(args, remote_code=False), **config)
        if max_text_length and max_text_length > model.config.text_config.max_position_embeddings:
            model.stretch_text_positions(max_text_length)
    else:
        config = model_config(args, loss_config)
        if max_text_length and max_text_length > config.text_config.max_position_embeddings:
            config.text_config.max_position_embeddings = max_text_length
        model = ALIPModel(config)
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
        if not isinstance(processor, ALIPProcessor):
            processor = ALIPProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer)
    else:
        size = model.config.vision_config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        if args.tokenizer_name_or_path is not None:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name_or_path, **hub_kwargs(args))
        else:
            tokenizer = clip_tokenizer(model_max_length=model.config.text_config.max_position_embeddings)
        processor = ALIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    # A model with more positions than its tokenizer knows (built or stretched for --max_text_length): the
    # tokenizer follows, and is saved so.
    context = model.config.text_config.max_position_embeddings
    if processor.tokenizer.model_max_length < context:
        processor.tokenizer.model_max_length = context
    return processor


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


