"""Converters: open_clip / official ALIP checkpoints -> ALIPModel, and ALIPModel -> plain CLIPModel.

Parity tolerances (fp32): converted features equal open_clip's `encode_image`/`encode_text` within 1e-4
absolute; the exported CLIPModel's features equal the ALIP model's within 1e-5 (same kernels, same weights).
"""

import json
import os
import subprocess
import sys
import textwrap
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from conftest import HIDE_PACKAGE, tiny_alip_config
from safetensors.torch import load_file, save_file

from modeling_alip import ALIPModel
from alip_hf.convert import cli
from alip_hf.convert.from_open_clip import (
    alip_config_from_state_dict,
    convert_open_clip,
    convert_state_dict,
    load_checkpoint,
    resolve_quick_gelu,
)
from alip_hf.convert.to_clip import (
    GATE_CONFIG_FIELDS,
    export_to_clip,
    save_directory_atomically,
)


def convert_open_clip_main(flags):
    return cli.main(["from_open_clip", *flags])


def convert_to_clip_main(flags):
    return cli.main(["to_clip", *flags])

open_clip = pytest.importorskip("open_clip")

FEATURE_ATOL = 1e-4
EXPORT_ATOL = 1e-5
VOCAB, CONTEXT = 100, 20  # a small vocabulary: start/end of text are its last two ids, as in open_clip


def tiny_open_clip_config(quick_gelu: bool) -> dict:
    """open_clip config of the tiny test towers: hidden 32, 2 layers, 4 heads, MLP 37, image 30, patch 2."""
    tower = dict(width=32, layers=2, mlp_ratio=37 / 32)
    return dict(
        embed_dim=16,
        quick_gelu=quick_gelu,
        vision_cfg=dict(tower, image_size=30, patch_size=2, head_width=8),
        text_cfg=dict(tower, context_length=CONTEXT, vocab_size=VOCAB, heads=4),
    )


def tiny_open_clip(quick_gelu: bool):
    torch.manual_seed(0)
    model = open_clip.CLIP(**tiny_open_clip_config(quick_gelu)).eval()
    with torch.no_grad():  # open_clip initialises logit_scale to ln(1/0.07); a trained value tests the copy
        model.logit_scale.fill_(4.2)
    return model


def token_batch(vocab: int = VOCAB, context: int = CONTEXT) -> torch.Tensor:
    """`(3, context)` ids: start token, random words, end token (the largest id) at varied positions, zero padding."""
    torch.manual_seed(1)
    ids = torch.randint(1, vocab - 2, (3, context))
    ids[:, 0] = vocab - 2
    for row, end in enumerate((context // 4, context - 1, context // 2)):
        ids[row, end] = vocab - 1
        ids[row, end + 1:] = 0
    return ids


def pixel_batch(size: int = 30) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(3, 3, size, size)


def features(model: ALIPModel, pixels, ids) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(input_ids=ids).pooler_output
    return image, text


def open_clip_features(model, pixels, ids) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(ids)


def assert_same_features(model: ALIPModel, reference, pixels, ids, atol=FEATURE_ATOL):
    image, text = features(model, pixels, ids)
    ref_image, ref_text = open_clip_features(reference, pixels, ids)
    torch.testing.assert_close(image, ref_image, atol=atol, rtol=0)
    torch.testing.assert_close(text, ref_text, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------ open_clip
@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
def test_converted_open_clip_features_equal_open_clip(quick_gelu):
    reference = tiny_open_clip(quick_gelu)
    model = convert_open_clip(reference.state_dict(), model_config=tiny_open_clip_config(quick_gelu))

    assert model.config.text_config.hidden_act == model.config.vision_config.hidden_act == (
        "quick_gelu" if quick_gelu else "gelu"
    )
    assert model.logit_scale.item() == pytest.approx(4.2)
    assert model.config.text_config.eos_token_id == VOCAB - 1
    assert_same_features(model, reference, pixel_batch(), token_batch())


def test_wrong_activation_changes_features():
    """The activation is not in the weights: converting with the other one must give different features."""
    reference = tiny_open_clip(quick_gelu=True)
    model = convert_open_clip(reference.state_dict(), model_config=tiny_open_clip_config(True), quick_gelu=False)
    image, _ = features(model, pixel_batch(), token_batch())
    ref_image, _ = open_clip_features(reference, pixel_batch(), token_batch())
    assert (image - ref_image).abs().max() > 10 * FEATURE_ATOL


def test_architecture_is_inferred_from_shapes():
    config = alip_config_from_state_dict(tiny_open_clip(False).state_dict(), tiny_open_clip_config(False))
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (32, 2, 4)
    assert (vision.intermediate_size, vision.image_size, vision.patch_size) == (37, 30, 2)
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == (32, 2, 4, 37)
    assert (text.vocab_size, text.max_position_embeddings, config.projection_dim) == (VOCAB, CONTEXT, 16)


def test_heads_default_to_width_over_64_without_a_model_config():
    torch.manual_seed(0)
    tower = dict(width=128, layers=1)
    reference = open_clip.CLIP(
        embed_dim=8,
        vision_cfg=dict(tower, image_size=8, patch_size=4),  # open_clip default head_width 64 -> 2 heads
        text_cfg=dict(tower, context_length=8, vocab_size=VOCAB, heads=2),
    ).eval()
    model = convert_open_clip(reference.state_dict(), quick_gelu=False)
    assert model.config.vision_config.num_attention_heads == model.config.text_config.num_attention_heads == 2
    assert_same_features(model, reference, pixel_batch(8), token_batch(context=8))


def test_narrow_tower_without_a_model_config_is_rejected_naming_the_flags():
    with pytest.raises(ValueError, match="--open_clip_model_name or --open_clip_config"):
        convert_open_clip(tiny_open_clip(False).state_dict(), quick_gelu=False)


@pytest.mark.parametrize("layout", ["ddp_module_prefix_pt", "nested_state_dict_pt", "safetensors"])
def test_checkpoint_files_convert_through_the_cli(tmp_path, layout):
    reference = tiny_open_clip(quick_gelu=True)
    state_dict = reference.state_dict()
    if layout == "ddp_module_prefix_pt":  # what the official ALIP train.py saves
        path = tmp_path / "model_31.pt"
        torch.save({f"module.{k}": v for k, v in state_dict.items()}, path)
    elif layout == "nested_state_dict_pt":  # open_clip's training checkpoints
        path = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    else:
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    config_path = tmp_path / "tiny.json"
    config_path.write_text(json.dumps(tiny_open_clip_config(True)))

    output = tmp_path / "alip"
    argv = ["--checkpoint_path", str(path), "--open_clip_config", str(config_path), "--output_dir", str(output),
            "--save_processor", "false"]
    convert_open_clip_main(argv)

    model = ALIPModel.from_pretrained(output).eval()
    assert model.config.text_config.hidden_act == "quick_gelu"
    assert torch.all(model.gates.lcg.text_caption.running_mean == model.config.gate_initial_mean)
    assert_same_features(model, reference, pixel_batch(), token_batch())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".alip")], "temporary directory left behind"


def test_cli_writes_a_processor_sized_for_the_model(tmp_path):
    from modeling_alip import ALIPProcessor

    torch.manual_seed(0)
    config = tiny_open_clip_config(False)
    config["text_cfg"].update(vocab_size=49408, context_length=77)  # CLIP's BPE vocabulary
    path = tmp_path / "clip.pt"
    torch.save(open_clip.CLIP(**config).state_dict(), path)
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    convert_open_clip_main(["--checkpoint_path", str(path), "--open_clip_config", str(tmp_path / "tiny.json"),
                            "--output_dir", str(tmp_path / "alip")])

    processor = ALIPProcessor.from_pretrained(tmp_path / "alip")
    assert processor.image_processor.crop_size == {"height": 30, "width": 30}
    assert processor.tokenizer.model_max_length == 77
    ids = processor(text=["a dog"])["input_ids"]
    assert ids[0, 0].item() == 49406 and ids[0, -1].item() == 49407


def test_unknown_key_is_rejected_naming_it():
    state_dict = dict(tiny_open_clip(False).state_dict(), logit_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="logit_bias"):
        convert_state_dict(state_dict)


def test_missing_key_is_rejected_naming_it():
    state_dict = tiny_open_clip(False).state_dict()
    del state_dict["transformer.resblocks.1.ln_2.bias"]
    with pytest.raises(ValueError, match=r"text_model\.encoder\.layers\.1\.layer_norm2\.bias"):
        convert_open_clip(state_dict, model_config=tiny_open_clip_config(False))


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    """`weights_only=True`: a checkpoint that needs arbitrary unpickling is refused, not executed."""
    path = tmp_path / "with_args.pt"
    torch.save({"state_dict": tiny_open_clip(False).state_dict(), "args": Namespace(lr=1.0)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(path)


def test_missing_checkpoint_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--checkpoint_path .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_unsupported_open_clip_option_is_rejected_naming_it():
    config = tiny_open_clip_config(False)
    config["text_cfg"]["pool_type"] = "last"
    with pytest.raises(ValueError, match="pool_type"):
        alip_config_from_state_dict(tiny_open_clip(False).state_dict(), config)


@pytest.mark.parametrize(
    "flag, name, config, expected",
    [
        (None, "ViT-B-32-quickgelu", None, True),
        (None, "ViT-B-32", None, False),
        (None, None, {"quick_gelu": True}, True),
        (None, "ViT-B-32", {"embed_dim": 512}, False),
        (False, "ViT-B-32-quickgelu", {"quick_gelu": True}, False),  # the flag wins
        (True, None, None, True),
        (None, None, None, False),  # open_clip's default
    ],
)
def test_activation_detection_order(flag, name, config, expected):
    assert resolve_quick_gelu(flag, name, config) is expected


def test_open_clip_model_names_give_heads_and_activation():
    from alip_hf.convert.from_open_clip import open_clip_model_config

    assert open_clip_model_config("ViT-B/32")["text_cfg"]["heads"] == 8  # the official ALIP script's spelling
    assert resolve_quick_gelu(None, "ViT-B-32-quickgelu", open_clip_model_config("ViT-B-32-quickgelu"))
    with pytest.raises(ValueError, match="--open_clip_model_name ViT-Q-99"):
        open_clip_model_config("ViT-Q-99")


@pytest.mark.slow
def test_converted_vit_b_32_features_equal_open_clip():
    torch.manual_seed(0)
    reference = open_clip.create_model("ViT-B-32").eval()  # random init, GELU
    model = convert_open_clip(reference.state_dict(), model_name="ViT-B-32")
    assert model.config.vision_config.num_attention_heads == 12 and model.config.text_config.num_attention_heads == 8
    assert_same_features(model, reference, pixel_batch(224), token_batch(49408, 77))


# ------------------------------------------------------------------------------------------ export
def _trained_gates(model: ALIPModel) -> ALIPModel:
    for value, buffer in zip((0.3, 0.4, 0.5), model.gates.buffers()):
        buffer.fill_(value)
    return model.eval()


_CLEAN_LOAD = HIDE_PACKAGE + textwrap.dedent(
    """
    import sys, numpy, torch
    from transformers import AutoModel, AutoProcessor, CLIPModel, CLIPProcessor
    model_dir, inputs_path, out_path = sys.argv[1:]
    inputs = torch.load(inputs_path)
    auto = AutoModel.from_pretrained(model_dir).eval()
    clip = CLIPModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    assert type(auto) is CLIPModel, type(auto)
    assert type(processor) is CLIPProcessor, type(processor)
    processed = processor(images=[inputs["image"].numpy()], text=[inputs["text"]], return_tensors="pt")
    with torch.no_grad():
        out = {
            "image": clip.get_image_features(pixel_values=inputs["pixels"]).pooler_output,
            "text": clip.get_text_features(input_ids=inputs["ids"]).pooler_output,
            "auto_text": auto.get_text_features(input_ids=inputs["ids"]).pooler_output,
            "processed_ids": processed["input_ids"],
            "processed_pixels": processed["pixel_values"],
        }
    out["imported_alip"] = torch.tensor("modeling_alip" in sys.modules)
    torch.save(out, out_path)
    """
)


def test_exported_clip_loads_without_alip_and_gives_the_same_features(tmp_path, tiny_model):
    from modeling_alip import ALIPProcessor

    model = _trained_gates(tiny_model)
    alip_processor = ALIPProcessor.from_config(model.config)
    model.save_pretrained(tmp_path / "alip")
    alip_processor.save_pretrained(tmp_path / "alip")
    convert_to_clip_main(["--model_name_or_path", str(tmp_path / "alip"), "--output_dir", str(tmp_path / "clip")])

    pixels, ids = pixel_batch(), token_batch(vocab=49408)
    image = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    text = "a photo of a cat on a red sofa"
    torch.save({"pixels": pixels, "ids": ids, "image": image, "text": text}, tmp_path / "inputs.pt")
    script = tmp_path / "load_clip.py"
    script.write_text(_CLEAN_LOAD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "clip"), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=run_dir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")

    image_features, text_features = features(model, pixels, ids)
    assert not out["imported_alip"]
    torch.testing.assert_close(out["image"], image_features, atol=EXPORT_ATOL, rtol=0)
    torch.testing.assert_close(out["text"], text_features, atol=EXPORT_ATOL, rtol=0)
    torch.testing.assert_close(out["auto_text"], text_features, atol=EXPORT_ATOL, rtol=0)
    expected = alip_processor(images=[image.numpy()], text=[text])
    assert torch.equal(out["processed_ids"], expected["input_ids"])
    torch.testing.assert_close(out["processed_pixels"], expected["pixel_values"], atol=1e-6, rtol=0)


def test_export_drops_gate_buffers_and_fields(tmp_path, tiny_model):
    export_to_clip(_trained_gates(tiny_model), tmp_path / "clip")
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    weights = load_file(str(tmp_path / "clip" / "model.safetensors"))

    assert config["model_type"] == "clip" and config["architectures"] == ["CLIPModel"]
    assert "auto_map" not in config
    assert not set(GATE_CONFIG_FIELDS) & set(config), "gate fields left in the CLIP config"
    assert not [k for k in weights if k.startswith("gates.")]
    assert set(weights) == {k for k in tiny_model.state_dict() if not k.startswith("gates.")}


def test_export_refuses_to_overwrite_unless_asked(tmp_path, tiny_model):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        export_to_clip(tiny_model, tmp_path / "clip")
    export_to_clip(tiny_model, tmp_path / "clip", overwrite=True)
    assert (tmp_path / "clip" / "config.json").exists() and not (tmp_path / "clip" / "keep.txt").exists()


def test_failed_write_leaves_the_old_directory_and_no_temporary(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")

    def failing_write(tmp_dir: Path):
        (tmp_dir / "half.bin").write_bytes(b"\0")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_directory_atomically(target, failing_write, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]



def test_the_converter_command_line_converts_and_names_an_unknown_converter(tmp_path):
    from alip_hf import convert

    model = ALIPModel(tiny_alip_config())
    model.save_pretrained(tmp_path / "alip")
    output = convert.main(["to_clip", "--model_name_or_path", str(tmp_path / "alip"), "--output_dir",
                           str(tmp_path / "clip")])
    assert (output / "model.safetensors").is_file() and (output / "config.json").is_file()
    with pytest.raises(SystemExit, match="unknown converter 'to-clip'"):
        convert.main(["to-clip", "--model_name_or_path", str(tmp_path / "alip")])


_LOAD_PROCESSOR = HIDE_PACKAGE + textwrap.dedent(
    """
    import sys
    from transformers import AutoProcessor, CLIPModel, CLIPProcessor
    export_dir, resaved_dir = sys.argv[1:]
    for kwargs in ({}, {"trust_remote_code": True}):
        processor = AutoProcessor.from_pretrained(export_dir, **kwargs)
        assert type(processor) is CLIPProcessor, (kwargs, type(processor))
    # What run_clip.py does after fine-tuning: save model and processor, then the next user loads them.
    CLIPModel.from_pretrained(export_dir).save_pretrained(resaved_dir)
    processor.save_pretrained(resaved_dir)
    for kwargs in ({}, {"trust_remote_code": True}):
        assert type(AutoProcessor.from_pretrained(resaved_dir, **kwargs)) is CLIPProcessor, kwargs
    print("LOADED")
    """
)


def dangling_auto_maps(directory: Path) -> list[str]:
    """`file: Auto class -> module` for every `auto_map` entry whose module file the directory lacks."""
    from alip_hf.convert.to_clip import _module_files

    dangling = []
    for path in sorted(directory.glob("*.json")):
        content = json.loads(path.read_text())
        for auto, reference in (content.get("auto_map", {}) if isinstance(content, dict) else {}).items():
            if not all((directory / f).is_file() for f in _module_files(reference)):
                dangling.append(f"{path.name}: {auto} -> {reference}")
    return dangling


def test_clip_export_refers_to_no_file_it_lacks_and_its_processor_loads_without_the_package(tmp_path, tiny_model):
    from modeling_alip import ALIPProcessor

    tiny_model.save_pretrained(tmp_path / "alip")
    ALIPProcessor.from_config(tiny_model.config).save_pretrained(tmp_path / "alip")
    assert dangling_auto_maps(tmp_path / "alip") == []  # the ALIP directory ships its module files
    convert_to_clip_main(["--model_name_or_path", str(tmp_path / "alip"), "--output_dir", str(tmp_path / "clip")])

    assert dangling_auto_maps(tmp_path / "clip") == []
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    (tmp_path / "elsewhere").mkdir()
    result = subprocess.run([sys.executable, "-c", _LOAD_PROCESSOR, str(tmp_path / "clip"), str(tmp_path / "resaved")],
                            cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "LOADED" in result.stdout, result.stderr[-3000:]


def test_export_states_what_it_drops_and_refuses_a_tensor_clip_has_no_place_for(tiny_model, caplog):
    from alip_hf.convert.to_clip import clip_state_dict, dropped_state

    assert dropped_state(tiny_model) == sorted(k for k in tiny_model.state_dict() if k.startswith("gates."))
    tiny_model.register_buffer("extra_bias", torch.zeros(1))
    with pytest.raises(ValueError, match=r"\['extra_bias'\].*DROPPED_STATE"):
        clip_state_dict(tiny_model)
