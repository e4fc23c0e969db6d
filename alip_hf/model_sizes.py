"""Named model sizes (`--model_config`) and `--config_overrides`: `ALIPConfig` keyword arguments as plain data.

Only the standard library is imported here: the argument parser reads `MODEL_CONFIGS` for its choices, and
`--help` must not wait for torch. The builders that turn these into a model are `alip_hf.models`.
"""

from __future__ import annotations

import copy


# ----------------------------------------------------------------------------------------------------------------
# Named model sizes
# ----------------------------------------------------------------------------------------------------------------

# transformers' CLIP default activation, and OpenAI CLIP's (x * sigmoid(1.702 x)).
QUICK_GELU = "quick_gelu"
# torch.nn.GELU: open_clip's default (`quick_gelu: false`), so the official ALIP code's towers.
GELU = "gelu"

# Tower sizes only (no activation): the tests' tiny BLIP and Llama models reuse TINY_TOWER.
TINY_TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
SMALL_TOWER = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)


def _vit_b(patch_size: int, hidden_act: str) -> dict:
    """CLIP ViT-B/`patch_size` (Radford et al. 2021, Table 19; open_clip `ViT-B-<patch>.json`): text 512 wide,
    12 layers, 8 heads, context 77, vocabulary 49408; image 768 wide, 12 layers, 12 heads (head width 64),
    224 px; MLP ratio 4; joint embedding 512."""
    return dict(
        text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                         vocab_size=49408, max_position_embeddings=77, hidden_act=hidden_act),
        vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           image_size=224, patch_size=patch_size, hidden_act=hidden_act),
        projection_dim=512,
    )


# `ALIPConfig` keyword arguments of each `--model_config` (each tower states its activation).
MODEL_CONFIGS = {
    "tiny": dict(text_config=dict(TINY_TOWER, vocab_size=49408, max_position_embeddings=77, hidden_act=QUICK_GELU),
                 vision_config=dict(TINY_TOWER, image_size=30, patch_size=2, hidden_act=QUICK_GELU),
                 projection_dim=16),
    "small": dict(text_config=dict(SMALL_TOWER, vocab_size=49408, max_position_embeddings=77, hidden_act=QUICK_GELU),
                  vision_config=dict(SMALL_TOWER, image_size=32, patch_size=4, hidden_act=QUICK_GELU),
                  projection_dim=128),
    "vit-b-32": _vit_b(32, GELU),
    "vit-b-16": _vit_b(16, GELU),
    "vit-b-32-quickgelu": _vit_b(32, QUICK_GELU),
}

# Where each size comes from (tests/test_model_sizes.py pins the architectures to the open_clip files cited).
MODEL_SOURCES = {
    "tiny": "this project: a smoke-test size that trains on CPU in seconds (odd intermediate size on purpose)",
    "small": "this project: the demo size, learns the bundled 64 px clip art in a few CPU minutes "
             "(image 32, patch 4: 64 patches)",
    "vit-b-32": "open_clip model_configs/ViT-B-32.json (no quick_gelu: GELU), the official ALIP code's "
                "ViT-B/32 (its create_model keeps open_clip's GELU default)",
    "vit-b-16": "open_clip model_configs/ViT-B-16.json (no quick_gelu: GELU), the ALIP/VeCLIP ViT-B/16 "
                "trained from scratch",
    "vit-b-32-quickgelu": "open_clip model_configs/ViT-B-32-quickgelu.json: OpenAI CLIP ViT-B/32 (QuickGELU), "
                          "the architecture of OpenAI's released weights",
}


# ----------------------------------------------------------------------------------------------------------------
# --config_overrides
# ----------------------------------------------------------------------------------------------------------------


def _value(text: str) -> int | float | bool | str:
    """`"128"` -> 128, `"0.5"` -> 0.5, `"true"`/`"false"` -> bool, anything else stays text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_config_overrides(text: str | dict) -> dict[str, int | float | bool | str]:
    """`"text_config.hidden_size=128,lcg_gamma=1.5"` -> `{"text_config.hidden_size": 128, "lcg_gamma": 1.5}`.

    A mapping (as read back from `train_args.yaml`) is returned with its values unchanged.
    """
    if isinstance(text, dict):
        return dict(text)
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--config_overrides: {item!r} is not key=value (e.g. text_config.hidden_size=128)")
        overrides[key.strip()] = _value(value.strip())
    return overrides


def apply_config_overrides(config: dict, overrides: dict) -> dict:
    """A copy of the `ALIPConfig` keyword arguments `config` with the dotted `overrides` set.

    Raises:
        ValueError: naming the key, for a key that `ALIPConfig` (or its `text_config`/`vision_config`) lacks.
    """
    from modeling_alip import ALIPConfig

    known = ALIPConfig().to_dict()
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        target, schema = config, known
        for parent in parents:
            if not isinstance(schema.get(parent), dict):
                raise ValueError(f"--config_overrides: unknown key {key!r} ({parent!r} is not a sub-configuration "
                                 "of ALIPConfig: text_config, vision_config)")
            target, schema = target.setdefault(parent, {}), schema[parent]
        if leaf not in schema or isinstance(schema[leaf], dict):
            raise ValueError(f"--config_overrides: unknown key {key!r}; ALIPConfig"
                             f"{''.join('.' + p for p in parents)} has no field {leaf!r}")
        target[leaf] = value
    return config
