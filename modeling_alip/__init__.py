"""ALIP as a transformers model: configuration, model, gates, loss, processor and converters.

Importing the package registers ALIP with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel

from .configuration_alip import ALIPConfig
from .gates import ALIPGates, DescriptionConsistencyGate, GateOutput, LanguageConsistencyGate
from .loss import contrastive_loss, gather_features
from .modeling_alip import ALIPModel, ALIPOutput

AutoConfig.register("alip", ALIPConfig, exist_ok=True)
AutoModel.register(ALIPConfig, ALIPModel, exist_ok=True)

__all__ = [
    "ALIPConfig",
    "ALIPGates",
    "ALIPModel",
    "ALIPOutput",
    "DescriptionConsistencyGate",
    "GateOutput",
    "LanguageConsistencyGate",
    "contrastive_loss",
    "gather_features",
]
