"""Export an ALIP checkpoint as a plain transformers `CLIPModel` directory.

`ALIPModel` keeps `CLIPModel`'s weight names, so the export is a copy: drop the three gate buffers
(`gates.*.running_mean`), drop the gate fields of the configuration, and save a `CLIPConfig`, the
weights and (when given) a `CLIPProcessor`. The result loads with `CLIPModel.from_pretrained` or
`AutoModel.from_pretrained` in an environment that has never heard of ALIP.

What the export keeps and drops is stated in one table, `DROPPED_STATE`: every tensor of the model is either a
`CLIPModel` tensor (kept, unchanged) or listed there with the reason; anything else is an error naming it, so a
tensor added to `ALIPModel` is never dropped silently. The export refers to no file it does not contain: `auto_map`
entries (remote-code pointers to `processing_alip.py`, ...) are removed from every JSON file written.

    python -m alip_hf.convert to_clip --model_name_or_path runs/alip-b32 --output_dir exports/alip-b32-clip
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from alip_hf.io import save_directory_atomically, write_json_atomic
from modeling_alip import ALIPConfig, ALIPModel

logger = logging.getLogger(__name__)

# ALIPModel state that CLIPModel has no place for: name prefix -> why dropping it changes no CLIP feature.
# (A tensor added to ALIPModel must be listed here, with its reason, or the export stops naming it.)
DROPPED_STATE = {
    "gates.": "the gates' running means: training state of the adaptive loss, unused by the features",
}

# `ALIPConfig` fields that `CLIPConfig` does not have (the gate hyper-parameters); read from the classes
# so a new gate field is dropped without editing this list.
GATE_CONFIG_FIELDS = tuple(sorted({f.name for f in fields(ALIPConfig)} - {f.name for f in fields(CLIPConfig)}))
# Configuration keys that only make sense for the ALIP class (remote-code pointers, the architecture name).
_ALIP_ONLY_KEYS = ("auto_map", "architectures", "model_type", "transformers_version")


def clip_config_from_alip(config: ALIPConfig) -> CLIPConfig:
    """The `CLIPConfig` of the same towers: `config` without its gate fields."""
    values = config.to_dict()
    for key in (*GATE_CONFIG_FIELDS, *_ALIP_ONLY_KEYS):
        values.pop(key, None)
    clip_config = CLIPConfig(**values)
    clip_config.architectures = ["CLIPModel"]
    return clip_config


def clip_state_dict(model: ALIPModel) -> dict[str, torch.Tensor]:
    """`model.state_dict()` without the state of `DROPPED_STATE`: exactly `CLIPModel`'s keys.

    Raises:
        ValueError: naming tensors that are neither `CLIPModel`'s nor listed in `DROPPED_STATE`.
    """
    clip_keys = _clip_keys(model.config)
    kept, unknown = {}, []
    for name, tensor in model.state_dict().items():
        if name.startswith(tuple(DROPPED_STATE)):
            continue
        if name not in clip_keys:
            unknown.append(name)
        kept[name] = tensor
    if unknown:
        raise ValueError(f"the model holds {unknown} that CLIPModel has no place for; export to CLIP would drop them "
                         "(list them in DROPPED_STATE with the reason, if that is intended)")
    return kept


def _clip_keys(config) -> set[str]:
    """The state-dict keys of a `CLIPModel` of the same towers (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        clip = CLIPModel(clip_config_from_alip(config) if isinstance(config, ALIPConfig) else config)
    return set(clip.state_dict())


def dropped_state(model) -> list[str]:
    """The names of the tensors the export drops (see `DROPPED_STATE`)."""
    return sorted(name for name in model.state_dict() if name.startswith(tuple(DROPPED_STATE)))


def drop_dangling_auto_map(directory: str | os.PathLike) -> list[str]:
    """Removes, from every JSON file in `directory`, `auto_map` entries whose module file is not in `directory`
    (`processing_alip.ALIPProcessor` in an export that ships no `processing_alip.py`); returns the files changed."""
    directory = Path(directory)
    changed = []
    for path in sorted(directory.glob("*.json")):
        content = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(content, dict) or "auto_map" not in content:
            continue
        kept = {auto: reference for auto, reference in content["auto_map"].items()
                if _module_files(reference) and all((directory / f).is_file() for f in _module_files(reference))}
        if kept:
            content["auto_map"] = kept
        else:
            del content["auto_map"]
        write_json_atomic(path, content, indent=2)
        changed.append(path.name)
    return changed


def _module_files(reference) -> list[str]:
    """`"processing_alip.ALIPProcessor"` -> `["processing_alip.py"]` (a `[slow, fast]` pair gives both; a Hub
    reference `repo--module.Class` points outside the directory and gives none)."""
    references = reference if isinstance(reference, (list, tuple)) else [reference]
    files = []
    for item in references:
        if item is None:
            continue
        if "--" in item:
            return []
        files.append(item.rsplit(".", 1)[0] + ".py")
    return files


def clip_processor_from(processor):
    """A `CLIPProcessor` holding `processor`'s image processor and tokenizer.

    An `ALIPProcessor` saved as is would record its own class name, which a plain transformers install
    cannot load; its two parts are ordinary `CLIPImageProcessor` and CLIP tokenizer objects.
    """
    from transformers import CLIPProcessor

    if isinstance(processor, CLIPProcessor) and type(processor) is CLIPProcessor:
        return processor
    missing = [part for part in ("image_processor", "tokenizer") if getattr(processor, part, None) is None]
    if missing:
        raise TypeError(
            f"processor of type {type(processor).__name__} has no {' or '.join(missing)}; pass a processor with "
            "an image processor and a tokenizer (e.g. ALIPProcessor or CLIPProcessor)"
        )
    return CLIPProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer)


def export_to_clip(model: ALIPModel, output_dir: str | os.PathLike, processor=None, overwrite: bool = False) -> Path:
    """Writes `model` as a plain `CLIPModel` directory (config, safetensors weights, optional processor).

    Args:
        model: an [`ALIPModel`] (any dtype; the export keeps it).
        output_dir: the directory to create; written atomically (temporary sibling + rename).
        processor: an `ALIPProcessor` or `CLIPProcessor`, saved as a `CLIPProcessor`; `None` writes weights only.
        overwrite: replace an existing non-empty `output_dir`.

    Returns:
        `output_dir` as a `Path`.
    """
    if not isinstance(model, CLIPModel):
        raise TypeError(f"model must be an ALIPModel or CLIPModel, got {type(model).__name__}")
    clip_config = clip_config_from_alip(model.config) if isinstance(model.config, ALIPConfig) else model.config
    weights = clip_state_dict(model)
    clip_processor = clip_processor_from(processor) if processor is not None else None

    def write(tmp_dir: Path):
        clip = CLIPModel(clip_config).to(model.dtype)
        # strict: every CLIP weight must come from the ALIP model, none may be left at its random init.
        clip.load_state_dict(weights, strict=True)
        clip.save_pretrained(tmp_dir)
        if clip_processor is not None:
            clip_processor.save_pretrained(tmp_dir)
        drop_dangling_auto_map(tmp_dir)

    save_directory_atomically(output_dir, write, overwrite=overwrite, overwrite_flag="--overwrite_output_dir")
    logger.info("wrote CLIPModel to %s: kept every CLIP tensor; dropped %s and the config fields %s", output_dir,
                dropped_state(model) or "nothing", ", ".join(GATE_CONFIG_FIELDS))
    return Path(output_dir)


def run(load, args, output, hub) -> Path:
    """`python -m alip_hf.convert to_clip` (`LoadArguments`, `ToClipArguments`, `OutputArguments`, `HubArguments`):
    load (strictly, with `alip_hf.pretrained`), export, push when asked."""
    from alip_hf.hub import push_model_directory
    from alip_hf.pretrained import load_processor, model_source, saved_processor_files

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = _load_model(load)
    processor = None
    name, is_local = model_source(load.model_name_or_path)
    if args.save_processor and saved_processor_files(name, is_local, load.model_revision, load.cache_dir):
        processor = load_processor(name, model.config, revision=load.model_revision, cache_dir=load.cache_dir)
    elif args.save_processor:
        logger.info("no processor saved with %s: exporting weights and config only", name)
    written = export_to_clip(model, output.output_dir, processor=processor, overwrite=output.overwrite_output_dir)
    print(f"CLIPModel written to {written}")
    push_model_directory(written, output.hub_model_id if output.push_to_hub else None, hub, what="CLIPModel export")
    return written


def _load_model(load) -> ALIPModel:
    from alip_hf.pretrained import load_model

    return load_model(load.model_name_or_path, ALIPModel, allow_new_weights=load.allow_new_weights,
                      revision=load.model_revision, cache_dir=load.cache_dir)
