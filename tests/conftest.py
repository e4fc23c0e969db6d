"""Shared fixtures: tiny models built from configs, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from alip_hf.models import MODEL_CONFIGS, TINY_TOWER  # noqa: F401  (TINY_TOWER: used by tests that build towers)
from modeling_alip import ALIPConfig, ALIPModel

REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_alip_config(**overrides) -> ALIPConfig:
    """Hidden 32, 2 layers, 4 heads, odd intermediate size, image 30, patch 2; the CLIP BPE vocabulary size."""
    return ALIPConfig(**MODEL_CONFIGS["tiny"], **overrides)


@pytest.fixture
def tiny_config() -> ALIPConfig:
    return tiny_alip_config()


@pytest.fixture
def tiny_model(tiny_config) -> ALIPModel:
    torch.manual_seed(0)
    return ALIPModel(tiny_config)
