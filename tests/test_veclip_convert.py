"""convert_veclip: a tiny CLIPModel saved in the released VeCLIP layout (config.json + model.safetensors, zipped or
not) with a T5-style SentencePiece tokenizer trained here, converted and reloaded every way it is meant to load."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HIDE_PACKAGE, TINY_TOWER, write_parquet
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    T5Tokenizer,
)

from modeling_alip import ALIPModel, ALIPProcessor, VeCLIPImageProcessor
from alip_hf.convert import cli
from alip_hf.convert.from_veclip import convert_veclip
from modeling_alip.processing_veclip import check_text_token_ids

CONTEXT = 16
TEXTS = ["a photo of a cat", "two dogs on the grass", "a red car parked in the street", "a bird in the blue sky"]


@pytest.fixture(scope="module")
def t5_tokenizer_dir(tmp_path_factory) -> Path:
    """A T5-layout SentencePiece unigram model (<pad> 0, </s> 1, <unk> 2, no <s>) wrapped in T5Tokenizer."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("t5")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS * 25), model_prefix=str(root / "spiece"), vocab_size=48, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    tokenizer = T5Tokenizer.from_pretrained(root, extra_ids=4)
    tokenizer.save_pretrained(root / "tokenizer")
    return root / "tokenizer"


def tiny_clip_config(**text_overrides) -> CLIPConfig:
    text = dict(TINY_TOWER, vocab_size=64, max_position_embeddings=CONTEXT, eos_token_id=1, pad_token_id=0)
    text.update(text_overrides)
    return CLIPConfig(
        text_config=text, vision_config=dict(TINY_TOWER, image_size=30, patch_size=2), projection_dim=16
    )


def save_release(folder: Path, config: CLIPConfig | None = None) -> CLIPModel:
    """The released layout: `folder/config.json` + `folder/model.safetensors` of a `CLIPModel`."""
    torch.manual_seed(0)
    model = CLIPModel(config or tiny_clip_config()).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, CLIPModel]:
    folder = tmp_path_factory.mktemp("release") / "veclip_tiny"
    return folder, save_release(folder)


@pytest.fixture(scope="module")
def converted(release, t5_tokenizer_dir, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("converted") / "veclip-tiny"
    cli.main(["from_veclip", "--checkpoint_path", str(release[0]), "--output_dir", str(output),
              "--tokenizer_name_or_path", str(t5_tokenizer_dir)])
    return output


def _inputs(processor):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(40, 52, 3), (61, 30, 3), (30, 30, 3), (9, 12, 3)]]
    return processor(images=images, text=TEXTS)


def _features(model, batch):
    with torch.no_grad():
        text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        image = model.get_image_features(pixel_values=batch["pixel_values"])
    return text.pooler_output, image.pooler_output


def test_converted_folder_loads_as_clip_auto_and_alip_with_the_original_features(release, converted):
    original = release[1]
    processor = AutoProcessor.from_pretrained(converted)
    batch = _inputs(processor)
    expected_text, expected_image = _features(original, batch)
    assert json.loads((converted / "config.json").read_text())["model_type"] == "clip"
    for model in (CLIPModel.from_pretrained(converted), AutoModel.from_pretrained(converted),
                  ALIPModel.from_pretrained(converted)):
        text, image = _features(model.eval(), batch)
        assert torch.allclose(text, expected_text, atol=1e-6, rtol=0), type(model).__name__
        assert torch.allclose(image, expected_image, atol=1e-6, rtol=0), type(model).__name__


def test_alip_model_from_converted_folder_starts_gates_at_their_initial_mean(converted):
    model = ALIPModel.from_pretrained(converted)
    means = {name: buffer.item() for name, buffer in model.named_buffers() if name.startswith("gates.")}
    assert len(means) == 3
    assert all(mean == model.config.gate_initial_mean for mean in means.values()), means


def test_processor_pairs_veclip_images_with_the_t5_tokenizer(converted):
    processor = AutoProcessor.from_pretrained(converted)
    assert type(processor) is ALIPProcessor and processor.text_cleaning == "none"
    assert type(processor.image_processor) is VeCLIPImageProcessor
    assert processor.image_processor.crop_size == {"height": 30, "width": 30}
    assert type(AutoImageProcessor.from_pretrained(converted)) is VeCLIPImageProcessor
    tokenizer = processor.tokenizer
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.model_max_length) == (1, 0, CONTEXT)
    config = CLIPConfig.from_pretrained(converted)
    assert config.text_config.eos_token_id == tokenizer.eos_token_id
    # An over-long text is cut to the context with `</s>` kept last, where the text tower pools.
    batch = processor(text=["a photo of a cat " * 20, "a bird"], captions=["two dogs", "a red car"])
    assert batch["input_ids"].shape[1] == CONTEXT and batch["input_ids"][0, -1].item() == 1
    assert batch["caption_input_ids"].shape[0] == 2
    assert (converted / "README.md").read_text().count("sha256") == 1


def test_zip_converts_like_the_folder(release, converted, t5_tokenizer_dir, tmp_path):
    archive = tmp_path / "veclip_tiny.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for file in release[0].iterdir():
            zf.write(file, f"veclip_tiny/{file.name}")
        zf.writestr("__MACOSX/veclip_tiny/._config.json", "resource fork")
    output = convert_veclip(archive, tmp_path / "from-zip", tokenizer=str(t5_tokenizer_dir))
    batch = _inputs(AutoProcessor.from_pretrained(output))
    from_zip, from_folder = CLIPModel.from_pretrained(output), CLIPModel.from_pretrained(converted)
    for a, b in zip(_features(from_zip, batch), _features(from_folder, batch)):
        assert torch.equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from-zip", "veclip_tiny.zip"]  # no temp dir left behind


def test_loads_with_remote_code_where_the_package_is_not_importable(converted, tmp_path):
    local = AutoProcessor.from_pretrained(converted)
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, size=(44, 31, 3), dtype=np.uint8)
    np.save(tmp_path / "image.npy", image)
    expected = local(images=[image], text=["a bird in the blue sky"])
    script = HIDE_PACKAGE + f"""
import json, numpy as np, torch
from transformers import AutoImageProcessor, AutoModel, AutoProcessor
processor = AutoProcessor.from_pretrained({str(converted)!r}, trust_remote_code=True)
image_processor = AutoImageProcessor.from_pretrained({str(converted)!r}, trust_remote_code=True)
assert type(image_processor).__name__ == "VeCLIPImageProcessor"
batch = processor(images=[np.load("image.npy")], text=["a bird in the blue sky"])
model = AutoModel.from_pretrained({str(converted)!r})
with torch.no_grad():
    text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
torch.save({{"pixel_values": batch["pixel_values"], "input_ids": batch["input_ids"], "text": text}}, "out.pt")
print(type(processor).__name__, type(processor.image_processor).__name__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ALIPProcessor", "VeCLIPImageProcessor"]
    remote = torch.load(tmp_path / "out.pt")
    assert torch.equal(remote["pixel_values"], expected["pixel_values"])
    assert torch.equal(remote["input_ids"], expected["input_ids"])
    expected_text = _features(CLIPModel.from_pretrained(converted).eval(), expected)[0]
    assert torch.allclose(remote["text"], expected_text, atol=1e-6, rtol=0)


def test_config_whose_end_id_disagrees_with_the_tokenizer_is_an_error_naming_both(t5_tokenizer_dir, tmp_path):
    # eos_token_id 3 is an ordinary T5 piece: CLIP would pool there instead of at `</s>` = 1.
    folder = tmp_path / "bad_ids"
    save_release(folder, tiny_clip_config(eos_token_id=3))
    with pytest.raises(ValueError, match=r"eos_token_id is 3 .* id 1"):
        convert_veclip(folder, tmp_path / "out", tokenizer=str(t5_tokenizer_dir))
    assert not (tmp_path / "out").exists()
    output = convert_veclip(
        folder, tmp_path / "out", tokenizer=str(t5_tokenizer_dir), set_token_ids_from_tokenizer=True
    )
    assert CLIPConfig.from_pretrained(output).text_config.eos_token_id == 1


def test_tokenizer_without_an_end_token_is_an_error(t5_tokenizer_dir):
    tokenizer = T5Tokenizer.from_pretrained(t5_tokenizer_dir)
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="no end token"):
        check_text_token_ids(tiny_clip_config().text_config, tokenizer)
    small_vocab = tiny_clip_config(vocab_size=1, pad_token_id=0).text_config
    with pytest.raises(ValueError, match="end token id 1 is outside the text tower's vocab_size 1"):
        check_text_token_ids(small_vocab, T5Tokenizer.from_pretrained(t5_tokenizer_dir))


def test_folder_without_weights_is_an_error_naming_the_expected_files(release, t5_tokenizer_dir, tmp_path):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    (folder / "config.json").write_text((release[0] / "config.json").read_text())
    expected = r"no_weights: config.json but no weights; expected one of model.safetensors"
    with pytest.raises(FileNotFoundError, match=expected):
        convert_veclip(folder, tmp_path / "out", tokenizer=str(t5_tokenizer_dir))


def test_zip_with_unexpected_content_is_an_error(release, t5_tokenizer_dir, tmp_path):
    no_model = tmp_path / "notes.zip"
    with zipfile.ZipFile(no_model, "w") as zf:
        zf.writestr("notes/readme.txt", "not a checkpoint")
    with pytest.raises(FileNotFoundError, match=r"no config.json found \(files: \['notes/readme.txt'\]\)"):
        convert_veclip(no_model, tmp_path / "out", tokenizer=str(t5_tokenizer_dir))
    escaping = tmp_path / "escaping.zip"
    with zipfile.ZipFile(escaping, "w") as zf:
        zf.writestr("../evil.txt", "x")
    with pytest.raises(ValueError, match=r"refusing member '\.\./evil\.txt'"):
        convert_veclip(escaping, tmp_path / "out", tokenizer=str(t5_tokenizer_dir))
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as zf:
        for name in ("a", "b"):
            for file in release[0].iterdir():
                zf.write(file, f"{name}/{file.name}")
    with pytest.raises(ValueError, match="several checkpoints"):
        convert_veclip(two, tmp_path / "out", tokenizer=str(t5_tokenizer_dir))
    not_zip = tmp_path / "model.tar"
    not_zip.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="expected a folder or a .zip file"):
        convert_veclip(not_zip, tmp_path / "out", tokenizer=str(t5_tokenizer_dir))
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_match_the_config_are_an_error_listing_the_keys(t5_tokenizer_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "extra_key"
    save_release(folder)
    weights = load_file(folder / "model.safetensors")
    weights["text_model.extra.weight"] = torch.zeros(2)
    del weights["visual_projection.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    expected = r"(?s)missing_keys.*visual_projection\.weight.*unexpected_keys.*text_model\.extra\.weight"
    with pytest.raises(ValueError, match=expected):
        convert_veclip(folder, tmp_path / "out", tokenizer=str(t5_tokenizer_dir))


def test_existing_output_needs_overwrite_and_is_then_replaced(release, t5_tokenizer_dir, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_veclip(release[0], output, tokenizer=str(t5_tokenizer_dir))
    convert_veclip(release[0], output, tokenizer=str(t5_tokenizer_dir), overwrite=True)
    assert not (output / "stale.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_missing_tokenizer_is_an_error_naming_the_flag(release, tmp_path):
    with pytest.raises(OSError, match="--tokenizer_name_or_path"):
        convert_veclip(release[0], tmp_path / "out", tokenizer=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("recipe", ["veclip", "alip"])
def test_train_fine_tunes_a_converted_checkpoint_with_its_t5_tokenizer_and_veclip_preprocessing(converted, tmp_path, recipe):
    import train

    rows = write_parquet(tmp_path / "train.parquet", 16)
    output = tmp_path / "out"
    train.main(["--model_name_or_path", str(converted), "--recipe", recipe, "--train_data", str(rows),
                "--output_dir", str(output), "--per_device_train_batch_size", "8", "--max_steps", "2",
                "--max_text_length", str(CONTEXT), "--eval_data", "none", "--report_to", "none",
                "--warmup_steps", "0", "--learning_rate", "1e-3"])
    processor = AutoProcessor.from_pretrained(output)
    assert isinstance(processor.image_processor, VeCLIPImageProcessor)
    assert processor.tokenizer.eos_token_id == 1 and processor.text_cleaning == "none"
    tuned, original = ALIPModel.from_pretrained(output), ALIPModel.from_pretrained(converted)
    assert tuned.config.text_config.eos_token_id == 1
    assert not torch.equal(tuned.text_projection.weight, original.text_projection.weight)
