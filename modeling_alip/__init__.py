"""ALIP as a transformers model: configuration, model, gates, loss and processors (ALIP and VeCLIP).

This folder is what a user of a saved model loads (it ships to the Hub as remote code), so it imports only torch,
transformers (with its own requirements) and the standard library; checkpoint conversion lives in `alip_hf.convert`.

Importing the package registers ALIP with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration_alip import ALIPConfig
from .gates import (
    ALIPGates,
    DescriptionConsistencyGate,
    GateOutput,
    LanguageConsistencyGate,
)
from .image_processing_veclip import VeCLIPImageProcessor
from .loss import contrastive_loss, gather_features
from .modeling_alip import GATE_MODULES, ALIPModel, ALIPOutput
from .processing_alip import ALIPProcessor, clean_clip_text, clip_tokenizer
from .processing_veclip import align_text_config, check_text_token_ids, veclip_processor

AutoConfig.register("alip", ALIPConfig, exist_ok=True)
AutoModel.register(ALIPConfig, ALIPModel, exist_ok=True)
# The zero-shot-image-classification pipeline loads this class (ALIPModel returns CLIP's `logits_per_image`).
AutoModelForZeroShotImageClassification.register(ALIPConfig, ALIPModel, exist_ok=True)
AutoProcessor.register(ALIPConfig, ALIPProcessor, exist_ok=True)
# save_pretrained then copies the flat module files and writes `auto_map`, so a saved directory loads with
# `trust_remote_code=True` where this package is not installed.
ALIPConfig.register_for_auto_class()
ALIPModel.register_for_auto_class("AutoModel")  # ALIPModel.save_pretrained adds the zero-shot class's entry
ALIPProcessor.register_for_auto_class("AutoProcessor")
VeCLIPImageProcessor.register_for_auto_class("AutoImageProcessor")
# AutoImageProcessor resolves a saved `image_processor_type` among registered classes, and registering needs a
# key: the class keys itself, since VeCLIP checkpoints are `clip` configs whose default must stay CLIP's.
AutoImageProcessor.register(
    VeCLIPImageProcessor,
    image_processor_classes={"torchvision": VeCLIPImageProcessor, "pil": VeCLIPImageProcessor},
    exist_ok=True,
)

__all__ = [
    "GATE_MODULES",
    "ALIPConfig",
    "ALIPGates",
    "ALIPModel",
    "ALIPOutput",
    "ALIPProcessor",
    "DescriptionConsistencyGate",
    "GateOutput",
    "LanguageConsistencyGate",
    "VeCLIPImageProcessor",
    "align_text_config",
    "check_text_token_ids",
    "clean_clip_text",
    "clip_tokenizer",
    "contrastive_loss",
    "gather_features",
    "veclip_processor",
]
