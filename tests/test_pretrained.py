"""alip_hf.pretrained: the one loader of a model with its processor (eval.py, train.py --model_name_or_path, the
converters, the audit) is strict: missing or unexpected tensors, a damaged or missing processor file, a damaged
safetensors or JSON file are errors naming what is wrong; only a model saved with no processor gets CLIP's."""

import json
import logging

import pytest
import torch
from conftest import tiny_alip_config, write_tokenizer
from safetensors.torch import load_file, save_file

from alip_hf import pretrained
from alip_hf.pretrained import load_model, load_model_and_processor, load_processor, model_source
from modeling_alip import ALIPModel, ALIPProcessor


@pytest.fixture
def model_dir(tmp_path):
    """A tiny ALIP model saved with its own tokenizer (not CLIP's) and CLIP's image processor."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    torch.manual_seed(0)
    model = ALIPModel(tiny_alip_config())
    directory = tmp_path / "model"
    model.save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(write_tokenizer(tmp_path / "tokenizer"))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    ALIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def edit_weights(directory, edit):
    path = directory / "model.safetensors"
    weights = load_file(str(path))
    edit(weights)
    save_file(weights, str(path), metadata={"format": "pt"})


# ---- weights ------------------------------------------------------------------------------------------------------


def test_a_missing_tensor_is_an_error_naming_it(model_dir):
    edit_weights(model_dir, lambda w: w.pop("visual_projection.weight"))
    with pytest.raises(ValueError, match=r"missing \['visual_projection\.weight'\].*--allow_new_weights"):
        load_model(model_dir)


def test_an_unexpected_tensor_is_an_error_naming_it(model_dir):
    edit_weights(model_dir, lambda w: w.update(stray_head=torch.zeros(3)))
    with pytest.raises(ValueError, match=r"unexpected \['stray_head'\]"):
        load_model(model_dir)


def test_allow_new_weights_loads_and_names_them_in_the_log(model_dir, caplog):
    edit_weights(model_dir, lambda w: w.pop("visual_projection.weight"))
    with caplog.at_level(logging.WARNING, logger="alip_hf.pretrained"):
        model = load_model(model_dir, ALIPModel, allow_new_weights=True)
    assert isinstance(model, ALIPModel) and "visual_projection.weight" in caplog.text


def test_a_clip_checkpoint_starts_alip_gates_fresh_but_a_partial_gate_state_is_an_error(model_dir, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    CLIPModel(CLIPConfig(**tiny_alip_config().to_dict())).save_pretrained(tmp_path / "clip")
    model = load_model(tmp_path / "clip", ALIPModel)
    assert float(model.gates.lcg.text_caption.running_mean) == model.config.gate_initial_mean
    edit_weights(model_dir, lambda w: w.pop("gates.dcg.image_text.running_mean"))
    with pytest.raises(ValueError, match=r"missing \['gates\.dcg\.image_text\.running_mean'\]"):
        load_model(model_dir, ALIPModel)


def test_every_command_loads_strictly(model_dir, tmp_path):
    from alip_hf import models
    from alip_hf.convert import cli
    from alip_hf.eval import load_model_and_processor as eval_load
    from alip_hf.training.arguments import ModelArguments

    edit_weights(model_dir, lambda w: w.pop("visual_projection.weight"))
    with pytest.raises(ValueError, match="--model .*visual_projection.weight"):
        eval_load(str(model_dir))
    with pytest.raises(ValueError, match="--model_name_or_path .*visual_projection.weight"):
        models.build_model(ModelArguments(model_name_or_path=str(model_dir)), seed=0)
    for converter in ("to_clip", "to_open_clip"):
        with pytest.raises(ValueError, match="visual_projection.weight"):
            cli.main([converter, "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / converter)])
    assert isinstance(models.build_model(ModelArguments(model_name_or_path=str(model_dir), allow_new_weights=True),
                                         seed=0), ALIPModel)


# ---- processor ----------------------------------------------------------------------------------------------------


def test_the_saved_processor_is_loaded_with_its_own_tokenizer(model_dir):
    _, processor = load_model_and_processor(model_dir)
    assert processor.tokenizer("red cat")["input_ids"] == [49406, 5, 8, 49407]  # WORDS ids, not CLIP BPE


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_or_missing_tokenizer_file_is_an_error_naming_it_never_clips_tokenizer(model_dir, damage):
    path = model_dir / "tokenizer.json"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        expected = r"tokenizer\.json: damaged file, not valid JSON"
    else:
        path.unlink()
        expected = r"saved with a processor .*tokenizer_config\.json.* lacks a tokenizer \(tokenizer\.json"
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        load_model_and_processor(model_dir)


def test_only_a_model_saved_without_a_processor_gets_clips_and_the_log_says_why(tmp_path, caplog):
    ALIPModel(tiny_alip_config()).save_pretrained(tmp_path / "bare")
    with caplog.at_level(logging.WARNING, logger="alip_hf.pretrained"):
        _, processor = load_model_and_processor(tmp_path / "bare")
    assert "was saved without a processor" in caplog.text
    assert processor.tokenizer("a cat")["input_ids"][0] == 49406 and len(processor.tokenizer) == 49408


def test_a_processor_without_its_image_processor_is_an_error_naming_the_files(model_dir):
    (model_dir / "processor_config.json").unlink()
    (model_dir / "preprocessor_config.json").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=r"lacks an image processor \(preprocessor_config\.json"):
        load_processor(model_dir, tiny_alip_config())


# ---- damaged files ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "zero_bytes", "garbage_header"])
def test_a_damaged_safetensors_file_is_an_error_naming_it(model_dir, damage):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "zero_bytes": b"",
                      "garbage_header": b"\xff" * 8 + b"not a header" * 10}[damage])
    with pytest.raises(ValueError, match=r"model\.safetensors: damaged safetensors file"):
        load_model_and_processor(model_dir)


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "processor_config.json"])
def test_a_truncated_json_file_is_an_error_naming_it(model_dir, name):
    path = model_dir / name
    if not path.exists():
        pytest.skip(f"{name} not written by this transformers version")
    path.write_text(path.read_text()[:20])
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}: damaged file, not valid JSON"):
        load_model_and_processor(model_dir)


# ---- local path or Hub id -----------------------------------------------------------------------------------------


def test_local_path_or_hub_id_is_one_rule(tmp_path, model_dir):
    assert model_source(model_dir) == (str(model_dir), True)
    assert model_source("openai/clip-vit-base-patch32") == ("openai/clip-vit-base-patch32", False)
    for path in (str(tmp_path / "nope"), "./nope", "runs/alip/final", "~/model"):
        with pytest.raises(FileNotFoundError, match="no such model directory"):
            model_source(path)
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is a file"):
        model_source(tmp_path / "weights.bin", flag="--model")
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "alip"
    assert pretrained.PROCESSOR_FILES
