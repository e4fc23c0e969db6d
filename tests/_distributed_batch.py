"""A fixed tiny model and global batch shared by the single- and multi-process distributed tests."""

import torch
from conftest import tiny_alip_config

from modeling_alip import ALIPModel

GLOBAL_BATCH = 8
EOS = 49407


def tiny_model() -> ALIPModel:
    torch.manual_seed(0)
    return ALIPModel(tiny_alip_config()).train()


def global_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 49000, (GLOBAL_BATCH, 9), generator=generator)
    caption_input_ids = torch.randint(0, 49000, (GLOBAL_BATCH, 6), generator=generator)
    input_ids[:, -1] = caption_input_ids[:, -1] = EOS
    return {
        "input_ids": input_ids,
        "caption_input_ids": caption_input_ids,
        "pixel_values": torch.randn(GLOBAL_BATCH, 3, 30, 30, generator=generator),
    }
