"""Sharing a trained model: safetensors round-trip with the gate running means, Auto classes, remote code."""

import ast
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import HIDE_PACKAGE, tiny_alip_config
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoProcessor

from modeling_alip import ALIPConfig, ALIPModel, ALIPProcessor

SHIPPED_MODULES = ["configuration_alip.py", "gates.py", "loss.py", "modeling_alip.py", "processing_alip.py"]
TEXTS = ["a photo of a cat", "“Two” dogs &amp; a ball, 3 of them!"]
CAPTIONS = ["a cat on a sofa", "two dogs playing with a ball"]


def sample_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny ALIP model with non-default gate running means, saved with its processor: `(model, processor, dir)`."""
    torch.manual_seed(0)
    model = ALIPModel(tiny_alip_config()).eval()
    with torch.no_grad():
        for i, buffer in enumerate(model.gates.buffers()):
            buffer.fill_(0.25 + 0.1 * i)  # the default is gate_initial_mean = 1
    processor = ALIPProcessor.default(image_size=model.config.vision_config.image_size)
    directory = tmp_path_factory.mktemp("alip")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor, directory


def features(model, processor) -> dict[str, torch.Tensor]:
    """Text, caption and image features (`(B, projection_dim)`) of a fixed batch."""
    batch = processor(images=[sample_image(), sample_image()], text=TEXTS, captions=CAPTIONS)
    with torch.no_grad():
        return {
            "text": model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output,
            "caption": model.get_text_features(
                input_ids=batch["caption_input_ids"], attention_mask=batch["caption_attention_mask"]
            ).pooler_output,
            "image": model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output,
        }


def test_save_pretrained_writes_safetensors_module_files_and_auto_map(saved):
    _, _, directory = saved
    files = set(os.listdir(directory))
    assert "model.safetensors" in files and "pytorch_model.bin" not in files
    assert set(SHIPPED_MODULES) <= files
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_alip.ALIPConfig", "AutoModel": "modeling_alip.ALIPModel",
                                  "AutoModelForZeroShotImageClassification": "modeling_alip.ALIPModel"}
    processor_config = json.loads((directory / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_alip.ALIPProcessor"}
    assert processor_config["text_cleaning"] == "clip"


def test_from_pretrained_restores_weights_and_gate_running_means(saved):
    model, _, directory = saved
    loaded = ALIPModel.from_pretrained(directory)
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    running_means = [b.item() for b in loaded.gates.buffers()]
    assert running_means == pytest.approx([0.25, 0.35, 0.45])


def test_auto_classes_resolve_alip_after_import(saved):
    _, _, directory = saved
    assert isinstance(AutoConfig.for_model("alip"), ALIPConfig)
    assert type(AutoConfig.from_pretrained(directory)) is ALIPConfig
    assert type(AutoModel.from_pretrained(directory)) is ALIPModel
    assert type(AutoProcessor.from_pretrained(directory)) is ALIPProcessor


def test_shipped_modules_import_only_siblings_torch_transformers_and_the_standard_library(saved):
    # Remote code runs where only torch and transformers (with its huggingface_hub) can be assumed;
    # imports inside `try:` are optional and skipped by transformers' import check too.
    allowed = {"torch", "transformers", "huggingface_hub"} | set(sys.stdlib_module_names)
    _, _, directory = saved
    for name in SHIPPED_MODULES:
        tree = ast.parse((directory / name).read_text())
        optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for n in ast.walk(t)}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{name} imports {roots}"


REMOTE_SCRIPT = HIDE_PACKAGE + textwrap.dedent(
    """
    import json
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor
    directory, image_path, texts, output = sys.argv[1:]
    model = AutoModel.from_pretrained(directory, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(directory, trust_remote_code=True)
    assert "transformers_modules" in type(model).__module__, type(model).__module__
    assert "transformers_modules" in type(processor).__module__, type(processor).__module__
    image = Image.open(image_path)
    text, captions = json.loads(texts)
    batch = processor(images=[image, image], text=text, captions=captions)
    with torch.no_grad():
        out = {
            "text": model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
            "caption": model.get_text_features(
                input_ids=batch["caption_input_ids"], attention_mask=batch["caption_attention_mask"]),
            "image": model.get_image_features(pixel_values=batch["pixel_values"]),
        }
    out = {key: value.pooler_output for key, value in out.items()}
    out.update(batch=dict(batch), running_means=torch.stack(list(model.gates.buffers())))
    torch.save(out, output)
    """
)


def test_saved_directory_loads_as_remote_code_where_the_package_is_not_importable(saved, tmp_path):
    model, processor, directory = saved
    image_path = tmp_path / "image.png"
    sample_image().save(image_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    output, workdir = tmp_path / "features.pt", tmp_path / "cwd"
    workdir.mkdir()  # neither the repository nor the saved directory: only the installed packages import
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(directory), str(image_path), json.dumps([TEXTS, CAPTIONS]), str(output)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(output)

    local_batch = processor(images=[Image.open(image_path)] * 2, text=TEXTS, captions=CAPTIONS)
    assert remote["batch"].keys() == local_batch.keys()
    for key in local_batch:
        assert torch.equal(remote["batch"][key], local_batch[key]), key
    local = features(model, processor)
    for key in local:
        torch.testing.assert_close(remote[key], local[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(remote["running_means"], torch.stack(list(model.gates.buffers())))
