"""ALIP configuration: a CLIP configuration plus the hyper-parameters of the two consistency gates.

The gate symbols follow the ALIP paper (Yang et al., ICCV 2023, arXiv 2308.08428, Section 3, "Method"), whose equations are quoted
beside each field:
``S`` a batch of cosine similarities, ``H`` its running mean, ``gamma`` the sharpness of the
exponential weight ``exp(gamma * (S - H))``.
"""

import math

# The image-text losses a model can train with (`modeling_alip.loss.PAIR_LOSSES` implements them).
LOSSES = ("clip", "siglip")
# SigLIP's initial temperature and bias (Zhai et al. 2023, Section 3.2: t' = log 10, b = -10).
SIGLIP_LOGIT_SCALE_INIT = math.log(10)
SIGLIP_LOGIT_BIAS_INIT = -10.0

from huggingface_hub.dataclasses import strict
from transformers import CLIPConfig


@strict
class ALIPConfig(CLIPConfig):
    r"""
    Configuration of [`ALIPModel`]: CLIP's `text_config`, `vision_config`, `projection_dim` and
    `logit_scale_init_value`, plus the ALIP gate hyper-parameters.

    Args:
        text_config (`dict` or `CLIPTextConfig`, *optional*):
            The text tower, shared by the raw web text and the synthetic caption.
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The image tower.
        projection_dim (`int`, defaults to 512):
            Size of the joint embedding space.
        logit_scale_init_value (`float`, defaults to ln(1/0.07)):
            Initial value of the learnable log temperature (CLIP; ALIP keeps it).
        gate_momentum (`float`, defaults to 0.99):
            EMA momentum of every running mean: `H <- m * H + (1 - m) * mean(S)`, the momentum
            update of the LCG's `H_tc` and the DCG's `H_xt`, `H_xc` (the official code hard-codes 0.99).
        lcg_gamma (`float`, defaults to 2.0):
            Sharpness of the Language Consistency Gate sample weight
            `W^s = min(exp(S_tc - H_tc) ** gamma, 1)` (the LCG's sample weight).
        dcg_gamma (`float`, defaults to 2.0):
            Sharpness of the Description Consistency Gate pair weights
            `W^t = exp(S_xt - H_xt) ** gamma`, `W^c = exp(S_xc - H_xc) ** gamma` (the DCG's pair weights).
        gate_initial_mean (`float`, defaults to 1.0):
            Initial value of the three running means `H_tc`, `H_xt`, `H_xc` (the official code starts them at 1).
        clip_pair_weights (`bool`, defaults to `False`):
            Clamp the DCG pair weights at 1 like the LCG weight. The official code leaves them unclipped, so
            the default is `False`; `True` is a deliberate deviation, not the official recipe.
        text_position_stretch (`dict`, *optional*):
            How the text tower's position embeddings were stretched from a shorter checkpoint, e.g.
            `{"rule": "long-clip", "original_length": 77, "kept_positions": 20}` (see
            [`ALIPModel.stretch_text_positions`]); `None` when every position was trained as it is.
            `text_config.max_position_embeddings` is the stretched length.
        loss (`str`, defaults to `"clip"`):
            The image-text loss of each text path (`modeling_alip.loss.PAIR_LOSSES`): `"clip"`, the symmetric
            softmax cross-entropy (InfoNCE) over the batch, or `"siglip"`, the pairwise sigmoid loss of SigLIP
            (Zhai et al. 2023), which adds the learnable `logit_bias` and makes `logits_per_image` `t * cos + b`
            (score them with a sigmoid, as SigLIP).
        adaptive_loss (`bool`, defaults to `True`):
            `forward(return_loss=True)` computes ALIP's bi-path adaptive loss: the (image, raw text) and
            (image, caption) losses weighted by the gates, so `caption_input_ids` are required. `False`: one
            unweighted (image, text) loss, as CLIP, VeCLIP and SigLIP train. Training sets both fields from
            `--recipe` and `--loss`, so a saved model records the loss it was trained with.
        logit_bias_init_value (`float`, defaults to -10):
            Initial value of the learnable `logit_bias` of the sigmoid loss (SigLIP's `b = -10`); unused with
            `loss="clip"`, where the model has no bias.
    """

    model_type = "alip"

    projection_dim: int | None = 512
    logit_scale_init_value: float | int | None = math.log(1 / 0.07)
    gate_momentum: float = 0.99
    lcg_gamma: float = 2.0
    dcg_gamma: float = 2.0
    gate_initial_mean: float = 1.0
    clip_pair_weights: bool = False
    text_position_stretch: dict | None = None
    loss: str = "clip"
    adaptive_loss: bool = True
    logit_bias_init_value: float | int = -10.0

    def validate_architecture(self):
        """Rejects gate hyper-parameters and losses outside their meaningful range, naming the field."""
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if not 0.0 <= self.gate_momentum < 1.0:
            raise ValueError(f"gate_momentum must be in [0, 1), got {self.gate_momentum}")
        for name in ("lcg_gamma", "dcg_gamma"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


__all__ = ["LOSSES", "SIGLIP_LOGIT_BIAS_INIT", "SIGLIP_LOGIT_SCALE_INIT", "ALIPConfig"]
