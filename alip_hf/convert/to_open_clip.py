"""Export an ALIP (or transformers CLIP) model to open_clip's format, beside its transformers files.

open_clip's own Hub repositories hold, next to anything else, `open_clip_config.json` (`{"model_cfg": ...,
"preprocess_cfg": ...}`) and `open_clip_model.safetensors`; open_clip 3.x reads such a folder with
`create_model_and_transforms("local-dir:<folder>")` and such a Hub repository with `"hf-hub:<repo>"`. This
module writes those two files into the model directory, so the one directory (or Hub repository) loads with
`from_pretrained`, with open_clip, and with tools that load open_clip models only (CLIP_benchmark, DataComp's
evaluation):

    python -m alip_hf.convert to_open_clip --model_name_or_path runs/alip-b32
    clip_benchmark eval --model local-dir:runs/alip-b32 --pretrained none --dataset cifar10 --output r.json

The weights are the inverse of [`from_open_clip.convert_state_dict`] (its key table, read backwards: q, k, v
fused into `in_proj_*`, projections transposed), and the export checks that the importer maps them back to
exactly the model's weights. The architecture maps as follows; what open_clip's `CLIP` cannot express is an error:

    projection_dim                          -> embed_dim
    hidden_act "quick_gelu" / "gelu"        -> quick_gelu true / false (one flag for both towers)
    layer_norm_eps (1e-5 is open_clip's)    -> {vision,text}_cfg.norm_kwargs.eps when it differs
    vision hidden_size / num_hidden_layers  -> vision_cfg.width / layers; head_width = width / heads
    intermediate_size                       -> mlp_ratio = intermediate_size / width (exact)
    image_size / patch_size                 -> vision_cfg.image_size / patch_size (learned positions)
    text max_position_embeddings            -> text_cfg.context_length (also the tokenizer's)
    text vocab_size / heads / layers        -> text_cfg.vocab_size / heads / layers
    pooling at the end token                -> open_clip's "argmax" pooling, the same token when the end
                                               token is the highest id (CLIP's BPE: 49407 of 49408)

open_clip tokenizes with its `SimpleTokenizer` (CLIP's BPE, padded with 0 to the context length), which gives
the ids of [`ALIPProcessor`] for a CLIP-vocabulary model; other tokenizers (VeCLIP's T5) are refused.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from alip_hf.io import write_json_atomic, write_with_atomically

from .from_open_clip import _BLOCK, _TEXT, _TRANSPOSED, _VISION, convert_state_dict
from .to_clip import DROPPED_STATE, dropped_state

logger = logging.getLogger(__name__)

OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_NAME = "open_clip_model.safetensors"
# torch.nn.LayerNorm's default, which open_clip's towers use unless `norm_kwargs` says otherwise.
OPEN_CLIP_LAYER_NORM_EPS = 1e-5
# The CLIP BPE vocabulary of open_clip's SimpleTokenizer; its end token is the last id, so argmax pooling finds it.
CLIP_VOCAB_SIZE = 49408
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # transformers' name -> open_clip's `quick_gelu`
_RESAMPLING = {2: "bilinear", 3: "bicubic"}  # PIL resampling filters -> open_clip's interpolation names

_FROM_HF = {hf: oc for oc, hf in {**_VISION, **_TEXT}.items()}
_FROM_HF_TRANSPOSED = {hf: oc for oc, hf in _TRANSPOSED.items()}
_FROM_HF_BLOCK = {hf: oc for oc, hf in _BLOCK.items()}
# transformers' separate attention projections, fused by open_clip into `attn.in_proj_{weight,bias}`.
_QKV = {f"self_attn.{p}_proj.{suffix}": (p, suffix) for p in "qkv" for suffix in ("weight", "bias")}
_TOWERS = {"vision_model": "visual.transformer.resblocks.", "text_model": "transformer.resblocks."}


# ----------------------------------------------------------------------------------------------- config
def _mlp_ratio(tower) -> float:
    """open_clip builds `int(width * mlp_ratio)` MLP units: the ratio must give `intermediate_size` back."""
    ratio = tower.intermediate_size / tower.hidden_size
    if int(tower.hidden_size * ratio) != tower.intermediate_size:
        raise ValueError(
            f"intermediate_size {tower.intermediate_size} is not int(width * mlp_ratio) for any float ratio at width "
            f"{tower.hidden_size}: open_clip cannot build this MLP"
        )
    return ratio


def _shared_setting(config: CLIPConfig, name: str):
    values = {getattr(config.vision_config, name), getattr(config.text_config, name)}
    if len(values) > 1:
        raise ValueError(
            f"vision_config.{name} and text_config.{name} differ ({sorted(map(str, values))}): open_clip sets it for "
            "both towers at once"
        )
    return values.pop()


def open_clip_model_cfg(config: CLIPConfig) -> dict:
    """open_clip's `model_cfg` (the `CLIP` constructor's arguments) for the towers of `config`.

    Raises:
        ValueError: naming the setting open_clip's ViT `CLIP` cannot express.
    """
    vision, text = config.vision_config, config.text_config
    activation = _shared_setting(config, "hidden_act")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"hidden_act {activation!r}: open_clip's CLIP has GELU or QuickGELU only "
                         f"({list(_ACTIVATIONS)})")
    if vision.num_channels != 3:
        raise ValueError(f"vision_config.num_channels is {vision.num_channels}: open_clip's ViT reads RGB images")
    if vision.hidden_size % vision.num_attention_heads:
        raise ValueError(f"vision hidden_size {vision.hidden_size} is not a multiple of its "
                         f"{vision.num_attention_heads} heads")
    # transformers pools the text at the first end token (legacy configs with eos id 2: at the highest id);
    # open_clip at the highest id. The same token when the end token is the last id of the vocabulary.
    if text.eos_token_id not in (text.vocab_size - 1, 2):
        raise ValueError(
            f"text_config.eos_token_id is {text.eos_token_id} of a {text.vocab_size}-token vocabulary: open_clip's "
            "text tower pools at the highest token id, which is the end token only in CLIP-style vocabularies"
        )
    vision_cfg = dict(
        image_size=vision.image_size,
        layers=vision.num_hidden_layers,
        width=vision.hidden_size,
        head_width=vision.hidden_size // vision.num_attention_heads,
        mlp_ratio=_mlp_ratio(vision),
        patch_size=vision.patch_size,
    )
    text_cfg = dict(
        context_length=text.max_position_embeddings,
        vocab_size=text.vocab_size,
        width=text.hidden_size,
        heads=text.num_attention_heads,
        layers=text.num_hidden_layers,
        mlp_ratio=_mlp_ratio(text),
    )
    eps = _shared_setting(config, "layer_norm_eps")
    if eps != OPEN_CLIP_LAYER_NORM_EPS:
        vision_cfg["norm_kwargs"] = {"eps": eps}
        text_cfg["norm_kwargs"] = {"eps": eps}
    return {"embed_dim": config.projection_dim, "quick_gelu": _ACTIVATIONS[activation],
            "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def _check_tokenizer(tokenizer, config: CLIPConfig):
    """open_clip's SimpleTokenizer stands in for the model's tokenizer: it must be CLIP's BPE."""
    from transformers import CLIPTokenizer

    if config.text_config.vocab_size != CLIP_VOCAB_SIZE:
        raise ValueError(
            f"text_config.vocab_size is {config.text_config.vocab_size}, not CLIP's {CLIP_VOCAB_SIZE}: open_clip would "
            "tokenize with CLIP's BPE, which this model was not trained with"
        )
    if tokenizer is not None and not (isinstance(tokenizer, CLIPTokenizer) and len(tokenizer) == CLIP_VOCAB_SIZE):
        raise ValueError(
            f"the processor's tokenizer is a {type(tokenizer).__name__} of {len(tokenizer)} tokens: open_clip "
            "tokenizes with CLIP's BPE, so only CLIP-tokenizer models export"
        )


def open_clip_preprocess_cfg(image_processor, image_size: int) -> dict:
    """open_clip's `preprocess_cfg` for a transformers CLIP image processor (`None`: CLIP's defaults).

    open_clip's evaluation transform resizes the short side to `size` and centre-crops `size` ("shortest");
    `CLIPImageProcessor` resizes to `size["shortest_edge"]` and crops `crop_size`. A processor whose two sizes
    differ is exported with the crop size and a warning, since open_clip's transform cannot resize and crop to
    different sizes.
    """
    from modeling_alip.processing_alip import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD

    if image_processor is None:
        return {"size": image_size, "mean": list(CLIP_IMAGE_MEAN), "std": list(CLIP_IMAGE_STD),
                "interpolation": "bicubic", "resize_mode": "shortest"}
    crop = getattr(image_processor, "crop_size", None) or {}
    size = getattr(image_processor, "size", None) or {}
    crop_size = crop.get("height", image_size)
    if crop.get("height") != crop.get("width") or size.get("shortest_edge", crop_size) != crop_size:
        logger.warning(
            "image processor resizes to %s and crops %s; open_clip's transform resizes the short side to %s and crops "
            "the same size, so its pixels will differ slightly", size, crop, crop_size,
        )
    resample = getattr(image_processor, "resample", 3)
    interpolation = _RESAMPLING.get(int(resample) if resample is not None else 3)
    if interpolation is None:
        raise ValueError(f"image processor resample {resample!r}: open_clip offers bicubic or bilinear only")
    return {"size": crop_size, "mean": [float(v) for v in image_processor.image_mean],
            "std": [float(v) for v in image_processor.image_std],
            "interpolation": interpolation, "resize_mode": "shortest"}


# ---------------------------------------------------------------------------------------------- weights
def open_clip_state_dict(model: CLIPModel) -> dict[str, torch.Tensor]:
    """`CLIPModel`/`ALIPModel` weights under open_clip's names (the inverse of `convert_state_dict`).

    The gate running means and transformers' `position_ids` buffers have no open_clip counterpart and are dropped.

    Raises:
        ValueError: listing weights with no open_clip name (another architecture, an unmerged adapter, ...).
    """
    exported, unknown = {}, []
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in _clip_weights(model).items():
        if key in _FROM_HF:
            exported[_FROM_HF[key]] = value
        elif key in _FROM_HF_TRANSPOSED:
            exported[_FROM_HF_TRANSPOSED[key]] = value.T
        elif key == "logit_scale":
            exported[key] = value.reshape(())
        elif (block := _block_key(key)) is not None:
            prefix, name = block
            if name in _QKV:
                projection, suffix = _QKV[name]
                fused.setdefault(f"{prefix}attn.in_proj_{suffix}", {})[projection] = value
            elif name in _FROM_HF_BLOCK:
                exported[prefix + _FROM_HF_BLOCK[name]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"model has {len(unknown)} weights with no open_clip counterpart: {unknown[:20]}")
    for key, parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"{key}: attention has projections {sorted(parts)}, expected q, k and v")
        # nn.MultiheadAttention's fused projection stacks q, k, v in this order.
        exported[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return {key: value.detach().contiguous() for key, value in exported.items()}


def _clip_weights(model: CLIPModel) -> dict[str, torch.Tensor]:
    """The CLIP weights of `model`: without the state the CLIP export drops (`to_clip.DROPPED_STATE`, the one table
    of what leaves ALIP's state behind) and transformers' `position_ids` buffers. Any other tensor reaches
    `open_clip_state_dict`, which refuses what open_clip has no name for. (open_clip's `CLIP` has a `logit_bias`
    for a SigLIP loss: a bias parameter of ALIPModel would map there, with `init_logit_bias` in `model_cfg`.)"""
    return {key: value for key, value in model.state_dict().items()
            if not key.startswith(tuple(DROPPED_STATE)) and not key.endswith("position_ids")}


def _block_key(key: str) -> tuple[str, str] | None:
    """`vision_model.encoder.layers.3.mlp.fc1.weight` -> (`visual.transformer.resblocks.3.`, `mlp.fc1.weight`)."""
    for tower, open_clip_prefix in _TOWERS.items():
        head = f"{tower}.encoder.layers."
        if key.startswith(head):
            index, name = key[len(head):].split(".", 1)
            return f"{open_clip_prefix}{index}.", name
    return None


def _check_round_trip(model: CLIPModel, exported: dict[str, torch.Tensor]):
    """The importer must map the export back to exactly the model's CLIP weights (a bijective key table)."""
    expected = _clip_weights(model)
    back = convert_state_dict(exported)
    if back.keys() != expected.keys():
        raise RuntimeError(f"open_clip export does not map back: {sorted(back.keys() ^ expected.keys())[:10]}")
    for key, value in expected.items():
        if not torch.equal(back[key].reshape(value.shape), value):
            raise RuntimeError(f"open_clip export does not map back: {key} differs")


# ------------------------------------------------------------------------------------------------ write
def export_to_open_clip(model: CLIPModel, output_dir: str | os.PathLike, processor=None) -> Path:
    """Writes `open_clip_config.json` and `open_clip_model.safetensors` for `model` into `output_dir`.

    Args:
        model: an [`ALIPModel`] or `CLIPModel` (weights kept in their dtype).
        output_dir: usually the model's own directory; created if missing. Other files are left alone.
        processor: the model's processor (`ALIPProcessor`/`CLIPProcessor`): image size, mean, std and
            interpolation for `preprocess_cfg`, and a check that its tokenizer is CLIP's; `None`: CLIP's defaults.

    Returns:
        `output_dir` as a `Path`.
    """
    from safetensors.torch import save_file

    if not isinstance(model, CLIPModel):
        raise TypeError(f"model must be an ALIPModel or CLIPModel, got {type(model).__name__}")
    _check_tokenizer(getattr(processor, "tokenizer", None), model.config)
    open_clip_config = {
        "model_cfg": open_clip_model_cfg(model.config),
        "preprocess_cfg": open_clip_preprocess_cfg(getattr(processor, "image_processor", None),
                                                   model.config.vision_config.image_size),
    }
    weights = open_clip_state_dict(model)
    _check_round_trip(model, weights)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Weights first: open_clip finds a model by its config, so a crash between the two leaves no config
    # pointing at missing or stale weights.
    write_with_atomically(output_dir / OPEN_CLIP_WEIGHTS_NAME,
                          lambda path: save_file(weights, path, metadata={"format": "pt"}))
    write_json_atomic(output_dir / OPEN_CLIP_CONFIG_NAME, open_clip_config, indent=2)
    logger.info("wrote %s and %s to %s: every CLIP tensor kept; dropped %s", OPEN_CLIP_CONFIG_NAME,
                OPEN_CLIP_WEIGHTS_NAME, output_dir, dropped_state(model) or "nothing")
    return output_dir


# ------------------------------------------------------------------------------------------------- CLI
def run(load, args, output, hub) -> Path:
    """`python -m alip_hf.convert to_open_clip` (`LoadArguments`, `ToOpenClipArguments`, `OutputArguments`,
    `HubArguments`): load the model (ALIP or CLIP, strictly, with `alip_hf.pretrained`) and its processor, write
    the two open_clip files (into the model directory itself by default), push when asked."""
    from alip_hf.hub import push_model_directory
    from alip_hf.pretrained import load_model, load_processor, model_source, saved_processor_files

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    name, is_local = model_source(load.model_name_or_path)
    if output.output_dir is None and not is_local:
        raise ValueError(f"--model_name_or_path {name} is a Hub id: pass --output_dir (the default is the local "
                         "model directory itself)")
    model = load_model(name, allow_new_weights=load.allow_new_weights, revision=load.model_revision,
                       cache_dir=load.cache_dir)
    processor = None
    if saved_processor_files(name, is_local, load.model_revision, load.cache_dir):
        processor = load_processor(name, model.config, revision=load.model_revision, cache_dir=load.cache_dir)
    else:
        logger.warning("no processor saved with %s: preprocess_cfg uses CLIP's defaults", name)
    written = export_to_open_clip(model, output.output_dir or name, processor=processor)
    print(f"open_clip files written to {written}; load with "
          f"open_clip.create_model_and_transforms('local-dir:{written}')")
    # The directory with both formats side by side, as open_clip's own Hub repositories are laid out.
    push_model_directory(written, output.hub_model_id if output.push_to_hub else None, hub, what="open_clip export")
    return written
