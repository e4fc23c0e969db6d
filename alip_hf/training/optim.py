"""AdamW with CLIP's weight-decay groups, and the learning-rate schedule."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import get_scheduler

if TYPE_CHECKING:
    from alip_hf.training.arguments import TrainArguments


# ----------------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------------


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    # CLIP's convention: no weight decay on gains/biases (1-D), embeddings and the temperature.
    return param.ndim < 2 or "embedding" in name or "logit_scale" in name or "norm" in name


def adamw_implementation(params: list[torch.nn.Parameter]) -> dict[str, bool]:
    """`fused=True` where torch has a fused AdamW kernel for the parameters' device (CUDA, XPU, MPS, CPU since
    torch 2.4), else `foreach=True`: one kernel over all tensors instead of a Python loop of small ops per
    parameter, which dominated the step on small models (the 49408-row token embedding update alone took ~10x
    the rest). Both compute the same update as the loop up to float rounding."""
    devices = {p.device.type for p in params}
    fused_devices = {"cuda", "xpu", "mps", "cpu"}
    if params and devices <= fused_devices and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                                    for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model, train: TrainArguments, max_steps: int):
    """AdamW with two parameter groups, and linear warm-up followed by `--lr_scheduler_type` (default cosine
    decay to 0)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon,
        **adamw_implementation(decay + no_decay))
    warmup = warmup_steps_for(train, max_steps)
    # Deviation: the official code uses OneCycleLR(pct_start=0.1), whose cosine warm-up starts at lr/25.
    scheduler = get_scheduler(train.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=max_steps)
    return optimizer, scheduler




def warmup_steps_for(train: TrainArguments, max_steps: int) -> int:
    """`--warmup_steps`, or `--warmup_ratio` of the run's steps."""
    return train.warmup_steps if train.warmup_steps >= 0 else int(train.warmup_ratio * max_steps)
