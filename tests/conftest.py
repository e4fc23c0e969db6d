"""Shared fixtures: tiny models built from configs, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from modeling_alip import ALIPConfig, ALIPModel

TINY_TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def tiny_alip_config(**overrides) -> ALIPConfig:
    """Hidden 32, 2 layers, 4 heads, odd intermediate size, image 30, patch 2; the CLIP BPE vocabulary size."""
    return ALIPConfig(
        text_config=dict(TINY_TOWER, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(TINY_TOWER, image_size=30, patch_size=2),
        projection_dim=16,
        **overrides,
    )


@pytest.fixture
def tiny_config() -> ALIPConfig:
    return tiny_alip_config()


@pytest.fixture
def tiny_model(tiny_config) -> ALIPModel:
    torch.manual_seed(0)
    return ALIPModel(tiny_config)
