"""alip_hf/models.py: the named model sizes against the sources they cite, `--config_overrides`, and `--seed`
controlling the initialisation of a model built from a config."""

import inspect
import json
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from alip_hf import train
from alip_hf.model_sizes import MODEL_CONFIGS, MODEL_SOURCES, apply_config_overrides, parse_config_overrides
from alip_hf.models import build_model, model_config
from alip_hf.training.arguments import ModelArguments, parse_args
from modeling_alip import ALIPConfig

# The open_clip model config each size cites (MODEL_SOURCES names the file).
OPEN_CLIP_CONFIGS = {"vit-b-32": "ViT-B-32", "vit-b-16": "ViT-B-16", "vit-b-32-quickgelu": "ViT-B-32-quickgelu"}


def _open_clip_architecture(name: str) -> dict:
    """The architecture of open_clip's `model_configs/<name>.json` in transformers' CLIP terms, with open_clip's
    own defaults for what the file leaves out (head width 64, MLP ratio 4, activation from `quick_gelu`)."""
    path = Path(open_clip.__file__).parent / "model_configs" / f"{name}.json"
    spec = json.loads(path.read_text())
    vision, text = spec["vision_cfg"], spec["text_cfg"]
    vision_defaults, text_defaults = open_clip.model.CLIPVisionCfg(), open_clip.model.CLIPTextCfg()
    # A file without `quick_gelu` gets CLIP's default, GELU (nn.GELU); `quick_gelu: true` selects QuickGELU.
    quick_gelu = spec.get("quick_gelu", inspect.signature(open_clip.model.CLIP).parameters["quick_gelu"].default)
    act = "quick_gelu" if quick_gelu else "gelu"
    return {
        "projection_dim": spec["embed_dim"],
        "text": dict(hidden_size=text["width"], num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
                     intermediate_size=int(text["width"] * text.get("mlp_ratio", text_defaults.mlp_ratio)),
                     max_position_embeddings=text["context_length"], vocab_size=text["vocab_size"], hidden_act=act),
        "vision": dict(hidden_size=vision["width"], num_hidden_layers=vision["layers"],
                       num_attention_heads=vision["width"] // vision.get("head_width", vision_defaults.head_width),
                       intermediate_size=int(vision["width"] * vision.get("mlp_ratio", vision_defaults.mlp_ratio)),
                       image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_act=act),
    }


def _architecture(config: ALIPConfig) -> dict:
    text, vision = config.text_config, config.vision_config
    return {
        "projection_dim": config.projection_dim,
        "text": dict(hidden_size=text.hidden_size, num_hidden_layers=text.num_hidden_layers,
                     num_attention_heads=text.num_attention_heads, intermediate_size=text.intermediate_size,
                     max_position_embeddings=text.max_position_embeddings, vocab_size=text.vocab_size,
                     hidden_act=text.hidden_act),
        "vision": dict(hidden_size=vision.hidden_size, num_hidden_layers=vision.num_hidden_layers,
                       num_attention_heads=vision.num_attention_heads, intermediate_size=vision.intermediate_size,
                       image_size=vision.image_size, patch_size=vision.patch_size, hidden_act=vision.hidden_act),
    }


def test_every_named_size_states_its_source_and_activation():
    assert MODEL_SOURCES.keys() == MODEL_CONFIGS.keys()
    for name, config in MODEL_CONFIGS.items():
        assert {config["text_config"]["hidden_act"], config["vision_config"]["hidden_act"]} <= {"gelu", "quick_gelu"}
        cited = OPEN_CLIP_CONFIGS.get(name)
        assert (f"{cited}.json" in MODEL_SOURCES[name]) if cited else MODEL_SOURCES[name].startswith("this project")


@pytest.mark.parametrize("name", sorted(OPEN_CLIP_CONFIGS))
def test_named_size_has_the_architecture_of_the_open_clip_config_it_cites(name):
    assert _architecture(ALIPConfig(**MODEL_CONFIGS[name])) == _open_clip_architecture(OPEN_CLIP_CONFIGS[name])


def test_alip_presets_use_gelu_as_the_official_code_and_the_quickgelu_variant_is_openai_clips():
    for name in ("vit-b-32", "vit-b-16"):
        assert _architecture(ALIPConfig(**MODEL_CONFIGS[name]))["vision"]["hidden_act"] == "gelu"
    assert "OpenAI CLIP" in MODEL_SOURCES["vit-b-32-quickgelu"]
    for config in sorted((Path(train.__file__).parent / "configs").glob("alip-*.yaml")):
        model_args, *_ = parse_args([str(config)])
        assert MODEL_CONFIGS[model_args.model_config]["text_config"]["hidden_act"] == "gelu", config.name


# ---- --config_overrides ------------------------------------------------------------------------------------------


def test_config_override_values_are_typed():
    assert parse_config_overrides("text_config.hidden_size=128, lcg_gamma=1.5,clip_pair_weights=true,"
                                  "vision_config.hidden_act=gelu") == {
        "text_config.hidden_size": 128, "lcg_gamma": 1.5, "clip_pair_weights": True,
        "vision_config.hidden_act": "gelu"}


@pytest.mark.parametrize("text, message", [("text_config.hidden_size", "is not key=value"), ("=3", "is not key=value")])
def test_malformed_config_override_is_rejected(text, message):
    with pytest.raises(ValueError, match=message):
        parse_config_overrides(text)


@pytest.mark.parametrize("key, message", [
    ("text_config.hidden_sise", r"unknown key 'text_config.hidden_sise'; ALIPConfig.text_config has no field"),
    ("lcg_gama", r"unknown key 'lcg_gama'"),
    ("audio_config.hidden_size", r"unknown key 'audio_config.hidden_size'"),
    ("text_config", r"unknown key 'text_config'"),
])
def test_unknown_config_override_key_is_an_error_naming_it(key, message):
    with pytest.raises(ValueError, match=message):
        apply_config_overrides(MODEL_CONFIGS["tiny"], {key: 1})


def test_config_overrides_build_any_size_on_top_of_a_named_one():
    args = ModelArguments(model_config="tiny", config_overrides=(
        "text_config.hidden_size=48,text_config.num_attention_heads=3,vision_config.patch_size=5,"
        "projection_dim=8,vision_config.hidden_act=gelu,lcg_gamma=1.5"))
    config = model_config(args)
    assert (config.text_config.hidden_size, config.text_config.num_attention_heads) == (48, 3)
    assert (config.vision_config.patch_size, config.vision_config.hidden_act, config.projection_dim) == (5, "gelu", 8)
    assert config.lcg_gamma == 1.5 and config.text_config.num_hidden_layers == 2  # the rest is tiny's
    model = build_model(args, seed=0)
    assert model.text_projection.weight.shape == (8, 48)
    assert MODEL_CONFIGS["tiny"]["text_config"]["hidden_size"] == 32  # the named size itself is unchanged


def test_config_overrides_from_a_run_yaml_mapping(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("model_config: tiny\nconfig_overrides:\n  text_config:\n    hidden_size: 64\n"
                   "  vision_config.patch_size: 3\n  clip_pair_weights: true\n")
    model_args, *_ = parse_args([str(run)])
    config = model_config(model_args)
    assert (config.text_config.hidden_size, config.vision_config.patch_size, config.clip_pair_weights) == (64, 3, True)


# ---- --seed ------------------------------------------------------------------------------------------------------


def _initial_weights(seed: int) -> dict[str, torch.Tensor]:
    args = ModelArguments(model_config="tiny", config_overrides="text_config.hidden_size=24")
    return build_model(args, seed=seed).state_dict()


def test_seed_controls_the_initialisation_of_a_model_built_from_a_config():
    torch.manual_seed(123)  # whatever the global generator held before
    first = _initial_weights(seed=7)
    torch.rand(5)
    again, other = _initial_weights(seed=7), _initial_weights(seed=8)
    assert all(torch.equal(first[k], again[k]) for k in first)
    weights = [k for k in first if k.endswith(".weight") and "norm" not in k]
    assert weights and all(not torch.equal(first[k], other[k]) for k in weights)


# ---- train_args.yaml records what was used ---------------------------------------------------------------------------


def test_train_args_record_the_resolved_model_and_rerun_as_a_run_yaml(tiny_data, tmp_path):
    overrides = "text_config.hidden_size=24,vision_config.hidden_act=gelu"
    train.main(tiny_data.argv(tmp_path / "first", "--max_steps", "1", "--config_overrides", overrides,
                              "--learning_rate", "0"))
    recorded = yaml.safe_load((tmp_path / "first" / "train_args.yaml").read_text())
    assert recorded["config_overrides"] == {"text_config.hidden_size": 24, "vision_config.hidden_act": "gelu"}
    resolved = recorded["resolved_model_config"]
    assert resolved["text_config"]["hidden_size"] == 24 and resolved["vision_config"]["hidden_act"] == "gelu"
    assert "vecap_probability" not in recorded and recorded["caption_column"] == "caption"  # alip's own only

    # The file is a run YAML: the same flags, so the same model.
    again = parse_args([str(tmp_path / "first" / "train_args.yaml")])
    assert model_config(again[0]).to_dict() == model_config(parse_args(
        tiny_data.argv(tmp_path, "--config_overrides", overrides))[0]).to_dict()

    # From a saved model the named size is not used, and is not recorded as if it were.
    argv = tiny_data.argv(tmp_path / "second", "--max_steps", "1", "--learning_rate", "0")
    train.main([*argv, "--model_name_or_path", str(tmp_path / "first")])
    second = yaml.safe_load((tmp_path / "second" / "train_args.yaml").read_text())
    assert second["model_config"] is None and second["model_name_or_path"] == str(tmp_path / "first")
    assert second["resolved_model_config"]["text_config"]["hidden_size"] == 24
