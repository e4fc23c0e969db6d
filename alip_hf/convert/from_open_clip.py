"""Convert an open_clip CLIP checkpoint, or an official ALIP `.pt`, into an `ALIPModel`.

The official ALIP code (github.com/deepglint/ALIP, `src/open_alip/model.py`) is a fork of open_clip's
ViT CLIP with the same parameter names; its training script saves `DistributedDataParallel.state_dict()`,
so every key starts with `module.`. Both formats map onto transformers' CLIP names:

    visual.conv1                              -> vision_model.embeddings.patch_embedding
    visual.class_embedding                    -> vision_model.embeddings.class_embedding
    visual.positional_embedding               -> vision_model.embeddings.position_embedding.weight
    visual.ln_pre / visual.ln_post            -> vision_model.pre_layrnorm / vision_model.post_layernorm
    visual.transformer.resblocks.N.*          -> vision_model.encoder.layers.N.*  (block table below)
    visual.proj (width, D)                    -> visual_projection.weight (D, width), transposed
    token_embedding / positional_embedding    -> text_model.embeddings.{token,position}_embedding
    transformer.resblocks.N.*                 -> text_model.encoder.layers.N.*
    ln_final                                  -> text_model.final_layer_norm
    text_projection (width, D)                -> text_projection.weight (D, width), transposed
    logit_scale                               -> logit_scale

    block: attn.in_proj_{weight,bias} (3W, W) -> self_attn.{q,k,v}_proj, split in this order
           attn.out_proj / ln_1 / ln_2 / mlp.c_fc / mlp.c_proj
                                              -> self_attn.out_proj / layer_norm1 / layer_norm2 / mlp.fc1 / mlp.fc2

The architecture is read from tensor shapes (widths, layers, MLP size, patch and image size, context
length, vocabulary size, projection size). Two things are not in the weights:

* attention heads: taken from the open_clip model config when one is given (`--open_clip_model_name` or
  `--open_clip_config`, which may be the `open_clip_config.json` that `to_open_clip` writes), else `width // 64`,
  open_clip's default head width;
* the MLP activation (GELU or QuickGELU, see [`resolve_quick_gelu`]).

The gate running means are not in either format (the official code keeps them as Python locals of its
training loop), so the converted model starts them at `gate_initial_mean`, as the official code does.

A layer-norm epsilon other than open_clip's 1e-5 is read from the config's `norm_kwargs` (as `to_open_clip` writes
it), so an exported model comes back as it was.

    python -m alip_hf.convert from_open_clip --checkpoint_path epoch_32.pt --open_clip_model_name ViT-B-32 \
        --output_dir alip-b32
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import torch

from alip_hf.io import save_directory_atomically
from modeling_alip import ALIPConfig, ALIPModel, ALIPProcessor

logger = logging.getLogger(__name__)

DEFAULT_HEAD_WIDTH = 64  # open_clip's `head_width` default (OpenAI's ViTs use 64-wide heads)
# OpenAI's released state dicts carry these scalars next to the weights; they are not parameters.
METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
# Wrappers whose state dicts prefix every key: DistributedDataParallel (`module.`, the official ALIP
# `.pt` files) and `torch.compile` (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys of a training checkpoint that hold the model weights (open_clip saves `state_dict`).
NESTED_STATE_DICT_KEYS = ("state_dict", "model", "module")

_BLOCK = {
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_VISION = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TEXT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}

# open_clip config options that change the computation without changing parameter names; values other
# than these defaults have no counterpart in transformers' CLIP.
_SUPPORTED_VISION_OPTIONS = {
    "pool_type": "tok", "final_ln_after_pool": False, "no_ln_pre": False, "attentional_pool": False,
    "global_average_pool": False, "output_tokens": False, "ls_init_value": None, "timm_model_name": None,
}
_SUPPORTED_TEXT_OPTIONS = {
    "pool_type": "argmax", "no_causal_mask": False, "embed_cls": False, "proj_bias": False,
    "hf_model_name": None, "ls_init_value": None, "final_ln_after_pool": False,
}


# --------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Reads a checkpoint without executing pickled code and returns its bare open_clip state dict.

    `.safetensors` files are read with safetensors; anything else with `torch.load(weights_only=True)`,
    which refuses arbitrary pickled objects. A training checkpoint's nested `state_dict` is unwrapped
    and wrapper prefixes (`module.` from DDP, `_orig_mod.` from `torch.compile`) are stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint_path {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            checkpoint = load_file(str(path), device="cpu")
        except SafetensorError as error:
            raise ValueError(f"--checkpoint_path {path}: damaged safetensors file ({error})") from error
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # the unpickler raises several types; the message says which object
            raise ValueError(
                f"--checkpoint_path {path} could not be read with torch.load(weights_only=True): {error}. "
                "Only plain tensor checkpoints are accepted (no pickled code); TorchScript archives "
                "(OpenAI's JIT files) must be re-saved as a state dict first."
            ) from error
    return unwrap_state_dict(checkpoint, source=str(path))


def unwrap_state_dict(checkpoint, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The weights of `checkpoint`: its nested state dict if it has one, without wrapper prefixes."""
    for key in NESTED_STATE_DICT_KEYS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"{source} holds no state dict (got {type(checkpoint).__name__})")
    state_dict = dict(checkpoint)
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    non_tensors = [key for key, value in state_dict.items() if not torch.is_tensor(value) and key not in METADATA_KEYS]
    if non_tensors:
        raise ValueError(f"{source}: entries that are not tensors: {non_tensors[:10]}")
    return state_dict


# ----------------------------------------------------------------------------------------- architecture
# Keys of open_clip's model config (the `CLIP` constructor's arguments), and the wrapper open_clip's Hub
# repositories and `to_open_clip` write around it (`open_clip_config.json`: {"model_cfg": ..., "preprocess_cfg": ...}).
MODEL_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
WRAPPER_KEY = "model_cfg"


def read_model_config(config: dict, source: str = "--open_clip_config") -> dict:
    """open_clip's model config from either of its two layouts: the bare config (`model_configs/*.json`) or the
    `open_clip_config.json` wrapper that holds it under `model_cfg`.

    Raises:
        ValueError: neither layout (a config of another kind would otherwise silently build a default model).
    """
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    if WRAPPER_KEY in config:
        config = config[WRAPPER_KEY]
        source = f"{source} ({WRAPPER_KEY})"
    if not isinstance(config, dict) or not set(MODEL_CONFIG_KEYS) & set(config):
        keys = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{source}: not an open_clip model config (expected {', '.join(MODEL_CONFIG_KEYS)} or a "
                         f"{WRAPPER_KEY!r} holding them; found {keys})")
    return config


def load_model_config(path: str | os.PathLike) -> dict:
    """open_clip's model config read from a JSON file (either layout, see [`read_model_config`])."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--open_clip_config {path} does not exist")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--open_clip_config {path}: not valid JSON ({error})") from error
    return read_model_config(config, source=f"--open_clip_config {path}")


def _layer_norm_eps(model_config: dict) -> float | None:
    """The layer-norm epsilon of open_clip's `norm_kwargs` (both towers must agree; `None`: open_clip's 1e-5)."""
    values = {json.dumps(model_config.get(tower, {}).get("norm_kwargs", {}).get("eps"))
              for tower in ("vision_cfg", "text_cfg")}
    if len(values) > 1:
        raise ValueError(f"vision_cfg and text_cfg norm_kwargs.eps differ ({sorted(values)}): transformers' CLIP "
                         "has one layer_norm_eps per tower, set from one value here")
    return json.loads(values.pop())


def open_clip_model_config(model_name: str) -> dict:
    """open_clip's architecture config for `model_name` (`ViT-B/32` is read as `ViT-B-32`)."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            f"--open_clip_model_name {model_name} needs open_clip (pip install open_clip_torch); or pass "
            "--open_clip_config with the model's JSON config"
        ) from error
    name = model_name.replace("/", "-")
    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(
            f"--open_clip_model_name {model_name}: open_clip has no config of that name "
            f"(known ViTs include {[n for n in open_clip.list_models() if n.startswith('ViT-B')][:6]}); "
            "pass --open_clip_config with the model's JSON config instead"
        )
    return config


def resolve_quick_gelu(quick_gelu: bool | None, model_name: str | None = None, model_config: dict | None = None) -> bool:
    """Decides the MLP activation, which the weights do not record.

    In order: an explicit `quick_gelu` (the `--quick_gelu true/false` flag) wins; then the model
    config's `quick_gelu` key (open_clip's `*-quickgelu` configs set it; a config without it means GELU);
    then a model name ending in `-quickgelu`; otherwise GELU, open_clip's default, with a warning. OpenAI's
    released CLIPs use QuickGELU, so their open_clip names end in `-quickgelu`. The official ALIP code
    takes it from `model_configs/<name>.json` in its repository (its `train.py` never forces it), so
    pass the flag that matches that file when converting an ALIP release.
    """
    if quick_gelu is not None:
        return quick_gelu
    if model_config is not None:  # a config without the key means GELU to open_clip too
        return bool(model_config.get("quick_gelu", False))
    if model_name is not None and model_name.lower().endswith("-quickgelu"):
        return True
    logger.warning(
        "activation not given and not in a model config: using GELU (open_clip's default). Pass --quick_gelu "
        "for OpenAI-initialised or QuickGELU-trained weights; a wrong choice changes the features."
    )
    return False


def _check_supported_options(model_config: dict):
    for tower, defaults in (("vision_cfg", _SUPPORTED_VISION_OPTIONS), ("text_cfg", _SUPPORTED_TEXT_OPTIONS)):
        options = model_config.get(tower, {})
        unsupported = {k: options[k] for k, default in defaults.items() if k in options and options[k] != default}
        if isinstance(options.get("layers"), (list, tuple)):
            unsupported["layers"] = options["layers"]  # a ModifiedResNet image tower
        if unsupported:
            raise ValueError(
                f"model config {tower} has options transformers' CLIPModel cannot express: {unsupported}; only "
                "ViT image towers with class-token pooling and causal text towers with argmax pooling convert"
            )


def _count_blocks(state_dict: dict, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    if not indices:
        raise ValueError(f"checkpoint has no `{prefix}N.*` keys: not an open_clip ViT CLIP state dict")
    if indices != set(range(len(indices))):
        raise ValueError(f"checkpoint `{prefix}N` block indices are not contiguous: {sorted(indices)}")
    return len(indices)


def _require(state_dict: dict, key: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"checkpoint has no `{key}`: not an open_clip ViT CLIP state dict")
    return state_dict[key]


def _heads(width: int, configured: int | None, tower: str) -> int:
    heads = configured if configured is not None else width // DEFAULT_HEAD_WIDTH
    if heads < 1 or width % heads:
        raise ValueError(
            f"{tower} width {width} cannot be split into {heads} attention heads; pass --open_clip_model_name or "
            "--open_clip_config so the head count comes from the model's config"
        )
    return heads


def alip_config_from_state_dict(
    state_dict: dict[str, torch.Tensor], model_config: dict | None = None, quick_gelu: bool = False, **gate_kwargs
) -> ALIPConfig:
    """Infers the `ALIPConfig` of an open_clip ViT CLIP state dict.

    Args:
        state_dict: bare open_clip keys (see [`load_checkpoint`]).
        model_config: open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`); used for the head
            counts and to reject options CLIPModel cannot express. Shapes win over its sizes.
        quick_gelu: QuickGELU (`x * sigmoid(1.702 x)`) instead of GELU in both towers.
        gate_kwargs: ALIP gate fields (`gate_momentum`, `lcg_gamma`, ...), else `ALIPConfig`'s defaults.
    """
    model_config = read_model_config(model_config, "model_config") if model_config else {}
    _check_supported_options(model_config)
    vision_cfg, text_cfg = model_config.get("vision_cfg", {}), model_config.get("text_cfg", {})

    patch = _require(state_dict, "visual.conv1.weight")  # (width, 3, p, p)
    vision_width, _, patch_size, patch_w = patch.shape
    positions = _require(state_dict, "visual.positional_embedding").shape[0] - 1  # minus the class token
    grid = math.isqrt(positions)
    if patch_size != patch_w or grid * grid != positions:
        raise ValueError(f"only square patches and square images convert (patch {tuple(patch.shape[2:])}, {positions} positions)")
    vision_head_width = vision_cfg.get("head_width", DEFAULT_HEAD_WIDTH)
    vision_heads = _heads(vision_width, vision_width // vision_head_width if vision_cfg else None, "image tower")

    tokens = _require(state_dict, "token_embedding.weight")  # (vocab, width)
    vocab_size, text_width = tokens.shape
    text_heads = _heads(text_width, text_cfg.get("heads", 8) if text_cfg else None, "text tower")
    projection_dim = _require(state_dict, "text_projection").shape[1]
    if _require(state_dict, "visual.proj").shape[1] != projection_dim:
        raise ValueError(
            f"visual.proj projects to {state_dict['visual.proj'].shape[1]} but text_projection to {projection_dim}"
        )
    act = "quick_gelu" if quick_gelu else "gelu"
    eps = _layer_norm_eps(model_config)
    norm = {} if eps is None else {"layer_norm_eps": eps}
    vision_config = dict(
        hidden_size=vision_width,
        intermediate_size=_require(state_dict, "visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0],
        num_hidden_layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
        num_attention_heads=vision_heads,
        image_size=grid * patch_size,
        patch_size=patch_size,
        projection_dim=projection_dim,
        hidden_act=act,
        **norm,
    )
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=text_width,
        intermediate_size=_require(state_dict, "transformer.resblocks.0.mlp.c_fc.weight").shape[0],
        num_hidden_layers=_count_blocks(state_dict, "transformer.resblocks."),
        num_attention_heads=text_heads,
        max_position_embeddings=_require(state_dict, "positional_embedding").shape[0],
        projection_dim=projection_dim,
        hidden_act=act,
        # open_clip's tokenizer puts start/end of text last in the vocabulary (49406, 49407 for CLIP BPE); the
        # text tower pools at the end token, which transformers finds by id.
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        **norm,
    )
    logit_scale = float(_require(state_dict, "logit_scale"))
    return ALIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=projection_dim,
        logit_scale_init_value=logit_scale,
        **gate_kwargs,
    )


# ------------------------------------------------------------------------------------------ key mapping
def _split_qkv(prefix: str, suffix: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
    """`(3W, ...)` fused `nn.MultiheadAttention` projection -> q, k, v `(W, ...)` in that order."""
    q, k, v = fused.chunk(3, dim=0)
    return {f"{prefix}self_attn.{name}_proj.{suffix}": t.contiguous() for name, t in zip("qkv", (q, k, v))}


def convert_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps open_clip keys to `CLIPModel` keys (table in the module docstring).

    Raises:
        ValueError: listing every key that has no mapping (other architectures, LoRA, SigLIP bias, ...).
    """
    converted, unknown = {}, []
    block = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
    for key, value in state_dict.items():
        if key in METADATA_KEYS:
            continue
        if key in _VISION:
            converted[_VISION[key]] = value
        elif key in _TEXT:
            converted[_TEXT[key]] = value
        elif key in _TRANSPOSED:
            converted[_TRANSPOSED[key]] = value.T.contiguous()
        elif key == "logit_scale":
            converted[key] = value.reshape(())
        elif m := block.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{m.group(2)}."
            name = m.group(3)
            if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
                converted.update(_split_qkv(prefix, name.rsplit("_", 1)[1], value))
            elif name in _BLOCK:
                converted[prefix + _BLOCK[name]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"checkpoint has {len(unknown)} keys with no CLIPModel counterpart: {unknown[:20]}")
    return converted


def load_converted_weights(model: ALIPModel, converted: dict[str, torch.Tensor]):
    """Copies `converted` into `model`; every CLIP weight must be present, nothing else may be."""
    result = model.load_state_dict(converted, strict=False)
    # The gate running means are not in open_clip or official ALIP checkpoints: they keep their initial value.
    missing = [key for key in result.missing_keys if not key.startswith("gates.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint does not fill the model: missing {missing[:20]}, unexpected {result.unexpected_keys[:20]}")


def convert_open_clip(
    checkpoint: str | os.PathLike | dict,
    model_name: str | None = None,
    model_config: dict | None = None,
    quick_gelu: bool | None = None,
    **gate_kwargs,
) -> ALIPModel:
    """An `ALIPModel` (fp32, eval mode) with the weights of an open_clip / official ALIP checkpoint.

    Args:
        checkpoint: a path (`.pt`, `.pth`, `.bin`, `.safetensors`) or an already loaded state dict.
        model_name: open_clip model name (`ViT-B-32`, `ViT-B-32-quickgelu`, ...): heads and activation.
        model_config: open_clip model config dict, instead of `model_name` (e.g. a custom architecture); the
            `open_clip_config.json` layout (`{"model_cfg": ..., "preprocess_cfg": ...}`) is read too.
        quick_gelu: force the activation; `None` detects it (see [`resolve_quick_gelu`]).
        gate_kwargs: ALIP gate fields for the new config.
    """
    if isinstance(checkpoint, dict):
        state_dict = unwrap_state_dict(checkpoint)
    else:
        state_dict = load_checkpoint(checkpoint)
    if model_config is None and model_name is not None:
        model_config = open_clip_model_config(model_name)
    elif model_config is not None:
        model_config = read_model_config(model_config, "model_config")
    use_quick_gelu = resolve_quick_gelu(quick_gelu, model_name, model_config)
    config = alip_config_from_state_dict(state_dict, model_config, use_quick_gelu, **gate_kwargs)
    converted = convert_state_dict(state_dict)
    model = ALIPModel(config)
    load_converted_weights(model, converted)
    return model.float().eval()


# ------------------------------------------------------------------------------------------------- CLI
def _processor_for(config: ALIPConfig):
    """CLIP's preprocessing sized for `config` ([`ALIPProcessor.from_config`]), or `None` when it does not fit."""
    try:
        return ALIPProcessor.from_config(config)
    except (ImportError, ValueError) as error:  # no open_clip (CLIP's BPE file), or not CLIP's vocabulary
        logger.warning("writing the model without a processor: %s", error)
        return None


def run(args, output, hub) -> Path:
    """`python -m alip_hf.convert from_open_clip` (`FromOpenClipArguments`, `OutputArguments`, `HubArguments`):
    convert, save (atomically), push when asked."""
    from alip_hf.hub import push_model_directory

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_config = load_model_config(args.open_clip_config) if args.open_clip_config else None
    print(f"reading {args.checkpoint_path}")
    model = convert_open_clip(args.checkpoint_path, args.open_clip_model_name, model_config, args.quick_gelu)
    text, vision = model.config.text_config, model.config.vision_config
    print(
        f"converted: image tower {vision.num_hidden_layers}x{vision.hidden_size} ({vision.num_attention_heads} heads, "
        f"patch {vision.patch_size}, image {vision.image_size}), "
        f"text tower {text.num_hidden_layers}x{text.hidden_size} "
        f"({text.num_attention_heads} heads, context {text.max_position_embeddings}, vocab {text.vocab_size}), "
        f"projection {model.config.projection_dim}, activation {text.hidden_act}"
    )
    processor = _processor_for(model.config) if args.save_processor else None

    def write(tmp_dir: Path):
        model.save_pretrained(tmp_dir)
        if processor is not None:
            processor.save_pretrained(tmp_dir)

    save_directory_atomically(output.output_dir, write, overwrite=output.overwrite_output_dir,
                              overwrite_flag="--overwrite_output_dir")
    print(f"ALIP model written to {output.output_dir}")
    push_model_directory(output.output_dir, output.hub_model_id if output.push_to_hub else None, hub,
                         what=f"{Path(args.checkpoint_path).name} (open_clip)")
    return Path(output.output_dir)
