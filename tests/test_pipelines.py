"""ALIP models where a CLIPModel works: the Auto classes, CLIP's N images x M texts call, and transformers' own
`zero-shot-image-classification` pipeline (with the package installed, and as remote code without it)."""

import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import HIDE_PACKAGE, tiny_alip_config
from PIL import Image
from transformers import AutoModel, AutoModelForZeroShotImageClassification, CLIPModel, pipeline

from modeling_alip import ALIPModel, ALIPProcessor
from alip_hf.convert.to_clip import export_to_clip

TASK = "zero-shot-image-classification"
LABELS = ["cat", "dog", "red car", "a tree on a hill"]
# The pipeline's scores (softmax over the labels) of the ALIP model and of its CLIPModel export: the same weights
# and the same computation, so they agree to float rounding.
SCORE_TOLERANCE = 1e-5


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny ALIP model saved with its processor, and its CLIPModel export: `(model, processor, dir, clip_dir)`."""
    torch.manual_seed(0)
    model = ALIPModel(tiny_alip_config()).eval()
    processor = ALIPProcessor.from_config(model.config)
    directory = tmp_path_factory.mktemp("alip")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    clip_dir = export_to_clip(model, tmp_path_factory.mktemp("export") / "clip", processor=processor)
    return model, processor, directory, clip_dir


def scores_by_label(result: list[dict]) -> dict[str, float]:
    return {entry["label"]: entry["score"] for entry in result}


# --------------------------------------------------------------------------------------------- Auto classes
def test_auto_classes_load_the_alip_model_and_auto_map_names_both(saved):
    _, _, directory, _ = saved
    assert type(AutoModel.from_pretrained(directory)) is ALIPModel
    assert type(AutoModelForZeroShotImageClassification.from_pretrained(directory)) is ALIPModel
    auto_map = json.loads((directory / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == auto_map["AutoModelForZeroShotImageClassification"] == "modeling_alip.ALIPModel"


# ------------------------------------------------------------------------------------ N images x M texts
def test_processor_takes_clip_call_n_images_by_m_texts(saved):
    _, processor, _, _ = saved
    batch = processor(text=LABELS, images=images(2))
    assert batch["pixel_values"].shape == (2, 3, 30, 30)
    assert batch["input_ids"].shape[0] == len(LABELS)
    one = processor(text=LABELS, images=images(1)[0])  # one image, not in a list
    assert one["pixel_values"].shape[0] == 1
    with pytest.raises(ValueError, match="same samples"):  # captions make it a training batch: pairs
        processor(text=LABELS, images=images(2), captions=["a", "b"])
    with pytest.raises(ValueError, match="`text` is an empty list"):
        processor(text=[], images=images(1))


def test_model_gives_n_by_m_logits_equal_to_the_exported_clip_model(saved):
    model, processor, _, clip_dir = saved
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    batch = processor(text=LABELS, images=images(3))
    with torch.no_grad():
        ours, theirs = model(**batch), clip(**batch)
    assert ours.logits_per_image.shape == (3, len(LABELS))
    torch.testing.assert_close(ours.logits_per_image, theirs.logits_per_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.logits_per_text, theirs.logits_per_text, rtol=0, atol=1e-5)


def test_training_batches_must_pair_every_row(saved):
    model, processor, _, _ = saved
    batch = processor(text=LABELS, images=images(3))
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(**batch, return_loss=True)
    captions = processor(text=["x", "y", "z"])
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(**batch, caption_input_ids=captions["input_ids"], caption_attention_mask=captions["attention_mask"])
    with torch.no_grad():  # a paired batch computes the loss as before
        paired = processor(text=LABELS[:3], images=images(3))
        assert torch.isfinite(model(**paired, return_loss=True).loss)
    output = model(**batch)  # the N x M output, then a loss asked of it: refused by the loss too
    with pytest.raises(ValueError, match="batch sizes differ"):
        model.compute_loss(output)


def test_forward_takes_clip_arguments_and_rejects_unknown_keywords(saved):
    model, processor, _, _ = saved
    ours = inspect.signature(ALIPModel.forward).parameters
    clip = inspect.signature(CLIPModel.forward).parameters
    assert [name for name in clip if name not in ours] == []
    assert {"caption_input_ids", "caption_attention_mask", "caption_position_ids"} <= set(ours)
    batch = processor(text=LABELS[:2], images=images(2))
    with pytest.raises(TypeError, match="caption_input_id"):
        model(**batch, caption_input_id=batch["input_ids"])  # misspelt: would silently train CLIP
    with torch.no_grad():
        output = model(**batch, output_hidden_states=True)
        as_tuple = model(**batch, return_dict=False)
    assert len(output.vision_model_output.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], output.logits_per_image)
    assert model(**batch).vision_model_output is None  # not kept unless asked for


# ------------------------------------------------------------------------------------------------ pipeline
def test_pipeline_scores_equal_the_exported_clip_model(saved):
    _, _, directory, clip_dir = saved
    ours, theirs = pipeline(TASK, model=str(directory)), pipeline(TASK, model=str(clip_dir))
    assert type(ours.model) is ALIPModel and type(theirs.model) is CLIPModel
    for image in images(3, seed=5):
        got, expected = ours(image, candidate_labels=LABELS), theirs(image, candidate_labels=LABELS)
        assert [entry["label"] for entry in got] == [entry["label"] for entry in expected]
        for label, score in scores_by_label(expected).items():
            assert abs(scores_by_label(got)[label] - score) < SCORE_TOLERANCE
        assert abs(sum(scores_by_label(got).values()) - 1) < 1e-5
    batched = ours(images(2, seed=5), candidate_labels=LABELS)  # a list of images: one result per image
    assert len(batched) == 2 and batched[0] == ours(images(1, seed=5)[0], candidate_labels=LABELS)


REMOTE_PIPELINE = HIDE_PACKAGE + textwrap.dedent(
    """
    import json
    from PIL import Image
    from transformers import pipeline
    directory, image_path, labels, output = sys.argv[1:]
    classifier = pipeline("zero-shot-image-classification", model=directory, trust_remote_code=True)
    assert "transformers_modules" in type(classifier.model).__module__, type(classifier.model).__module__
    result = classifier(Image.open(image_path), candidate_labels=json.loads(labels))
    with open(output, "w") as f:
        json.dump(result, f)
    """
)


def test_pipeline_runs_as_remote_code_where_the_package_is_not_importable(saved, tmp_path):
    _, _, directory, clip_dir = saved
    image_path = tmp_path / "image.png"
    images(1, seed=7)[0].save(image_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    workdir = tmp_path / "cwd"
    workdir.mkdir()  # neither the repository nor the model directory: only installed packages import
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_PIPELINE, str(directory), str(image_path), json.dumps(LABELS),
         str(tmp_path / "out.json")],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = scores_by_label(json.loads((tmp_path / "out.json").read_text()))
    expected = scores_by_label(pipeline(TASK, model=str(clip_dir))(Image.open(image_path), candidate_labels=LABELS))
    assert remote.keys() == expected.keys()
    for label, score in expected.items():
        assert abs(remote[label] - score) < SCORE_TOLERANCE


def test_pipeline_call_without_candidate_labels_is_an_error_naming_them(saved):
    _, _, directory, _ = saved
    classifier = pipeline(TASK, model=str(directory))
    with pytest.raises(TypeError, match="candidate_labels"):
        classifier(images(1)[0])


def test_model_directory_without_processor_names_the_missing_files(saved, tmp_path, caplog):
    _, _, directory, _ = saved
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in os.listdir(directory):
        if name.endswith((".py", ".safetensors")) or name == "config.json":
            shutil.copy(directory / name, bare / name)
    with pytest.raises(FileNotFoundError, match=r"has no processor: missing an image processor \(preprocessor_config"):
        ALIPProcessor.from_pretrained(bare)
    # transformers' pipeline loads the tokenizer itself and fails inside it; the model's loading says why first.
    with caplog.at_level(logging.WARNING), pytest.raises((OSError, ValueError)):
        pipeline(TASK, model=str(bare))
    assert "has no processor (missing an image processor" in caplog.text and "tokenizer.json" in caplog.text
