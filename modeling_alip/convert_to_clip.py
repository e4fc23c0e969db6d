"""Export an ALIP checkpoint as a plain transformers `CLIPModel` directory.

`ALIPModel` keeps `CLIPModel`'s weight names, so the export is a copy: drop the three gate buffers
(`gates.*.running_mean`), drop the gate fields of the configuration, and save a `CLIPConfig`, the
weights and (when given) a `CLIPProcessor`. The result loads with `CLIPModel.from_pretrained` or
`AutoModel.from_pretrained` in an environment that has never heard of ALIP.

    python -m alip_hf.convert to_clip --model runs/alip-b32 --output exports/alip-b32-clip
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import fields
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

from alip_hf.io import save_directory_atomically

from .configuration_alip import ALIPConfig
from .modeling_alip import ALIPModel

logger = logging.getLogger(__name__)

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


# The sigmoid loss's bias (`ALIPConfig.loss="siglip"`): a `CLIPModel` has no place for it.
DROPPED_BIAS = "logit_bias"


def clip_state_dict(model: ALIPModel) -> dict[str, torch.Tensor]:
    """`model.state_dict()` without the gate buffers and the sigmoid loss's bias: exactly `CLIPModel`'s keys."""
    return {name: tensor for name, tensor in model.state_dict().items()
            if not name.startswith("gates.") and name != DROPPED_BIAS}


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

    save_directory_atomically(output_dir, write, overwrite=overwrite, overwrite_flag="--overwrite")
    logger.info("wrote CLIPModel to %s (dropped gate buffers and fields: %s)", output_dir, ", ".join(GATE_CONFIG_FIELDS))
    bias = getattr(model, DROPPED_BIAS, None)
    if bias is not None:
        logger.warning("dropped %s = %.4f of the sigmoid loss: a CLIPModel has no bias, so the export's "
                       "logits_per_image are t * cos without it; rankings (retrieval, zero-shot top-k) are unchanged, "
                       "but sigmoid(logits) is not the trained model's match probability", DROPPED_BIAS, bias.item())
    return Path(output_dir)


def _load_processor(model_dir: Path):
    """The processor saved next to an ALIP model, or `None` when the directory holds none."""
    if not any((model_dir / name).exists() for name in ("processor_config.json", "tokenizer_config.json")):
        return None
    try:
        from .processing_alip import ALIPProcessor

        return ALIPProcessor.from_pretrained(model_dir)
    except ImportError:
        from transformers import CLIPProcessor

        return CLIPProcessor.from_pretrained(model_dir)


def build_parser():
    """The command's flags, defined in `alip_hf.convert` (which `--help` answers from without loading torch)."""
    from alip_hf.convert import build_parser as converter_parser

    return converter_parser("to_clip")


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv=None) -> Path:
    from alip_hf.hub import hub_arguments, push_model_directory

    args = parse_args(argv)
    hub = hub_arguments(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"--model {model_dir} has no config.json; expected a save_pretrained directory")
    model = ALIPModel.from_pretrained(model_dir)
    processor = None if args.no_processor else _load_processor(model_dir)
    if processor is None:
        logger.info("no processor in %s: exporting weights and config only", model_dir)
    output = export_to_clip(model, args.output, processor=processor, overwrite=args.overwrite)
    print(f"CLIPModel written to {output}")
    push_model_directory(output, args.hub_model_id if args.push_to_hub else None, hub, what="CLIPModel export")
    return output


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # bad input: the message names it
        raise SystemExit(f"error: {error}") from None
