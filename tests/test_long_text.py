"""Long text: `--max_text_length` beyond 77, Long-CLIP's stretching of the text positions, and every place that
must follow the new length (config, tokenizer, processor, save/reload, Hub remote code, open_clip export)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_alip_config
from PIL import Image
from test_sharing import REMOTE_SCRIPT

from alip_hf.models import build_model, build_processor
from alip_hf.training.arguments import ModelArguments
from modeling_alip import ALIPConfig, ALIPModel, ALIPProcessor
from modeling_alip.long_text import stretch_position_embeddings

LONG = 248
# A long caption (about 200 tokens) and texts within the first 20 positions (start and end token included).
LONG_TEXT = " ".join(f"a red car number {i} parked beside a small tree," for i in range(25))
SHORT_TEXTS = ["a cat", "a dog sitting on a red mat", "three small birds on a wire above a quiet road"]


def long_clip_reference(weight: torch.Tensor) -> torch.Tensor:
    """77 -> 248 as the Long-CLIP paper writes it (Section 3.2): rows 0..19 kept; row 20 + 4i + r (r = 0..3)
    = (1 - r/4) PE(20 + i) + (r/4) PE(21 + i); the last four continue the line through PE(75), PE(76)."""
    pe = weight.double()
    rows = [pe[i] for i in range(20)]
    for i in range(56):
        rows += [(1 - r / 4) * pe[20 + i] + (r / 4) * pe[21 + i] for r in range(4)]
    rows += [pe[76] + (r / 4) * (pe[76] - pe[75]) for r in range(4)]
    return torch.stack(rows)


def text_features(model, processor, texts):
    batch = processor(text=texts)
    with torch.no_grad():
        return model.get_text_features(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).pooler_output


@pytest.fixture
def model_77():
    torch.manual_seed(0)
    return ALIPModel(tiny_alip_config()).eval()


def test_stretching_keeps_positions_0_to_19_and_interpolates_the_rest_by_long_clips_rule():
    weight = torch.randn(77, 32, generator=torch.Generator().manual_seed(0))
    stretched = stretch_position_embeddings(weight, LONG)
    assert stretched.shape == (LONG, 32) and stretched.dtype == weight.dtype
    assert torch.equal(stretched[:20], weight[:20])
    torch.testing.assert_close(stretched.double(), long_clip_reference(weight), atol=1e-6, rtol=0)
    # Every 4th row from 20 on is a trained row itself.
    assert torch.equal(stretched[20:244:4], weight[20:76])


def test_stretched_model_keeps_the_features_of_texts_of_at_most_20_tokens(model_77):
    processor = ALIPProcessor.from_config(model_77.config)
    assert max(processor(text=SHORT_TEXTS)["attention_mask"].sum(dim=1)) <= 20
    before = text_features(model_77, processor, SHORT_TEXTS + ["a cat " * 30])
    model_77.stretch_text_positions(LONG)
    after = text_features(model_77, processor, SHORT_TEXTS + ["a cat " * 30])
    torch.testing.assert_close(after[:3], before[:3], atol=1e-6, rtol=0)
    assert (after[3] - before[3]).abs().max() > 1e-4  # a 62-token text reads stretched positions
    assert model_77.config.text_config.max_position_embeddings == LONG
    assert model_77.config.text_position_stretch == {"rule": "long-clip", "original_length": 77, "kept_positions": 20}
    with pytest.raises(ValueError, match="already stretched"):
        model_77.stretch_text_positions(300)


def test_248_position_model_saved_and_reloaded_gives_the_same_features(model_77, tmp_path):
    model_77.stretch_text_positions(LONG)
    processor = ALIPProcessor.from_config(model_77.config)
    assert processor.tokenizer.model_max_length == LONG
    batch = processor(text=[LONG_TEXT, "a cat"])
    assert 150 < batch["attention_mask"][0].sum() <= LONG  # not cut at 77
    model_77.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = ALIPModel.from_pretrained(tmp_path).eval(), ALIPProcessor.from_pretrained(tmp_path)
    assert loaded.config.text_position_stretch == model_77.config.text_position_stretch
    assert loaded_processor.tokenizer.model_max_length == LONG
    torch.testing.assert_close(text_features(loaded, loaded_processor, [LONG_TEXT, "a cat"]),
                               text_features(model_77, processor, [LONG_TEXT, "a cat"]), atol=0, rtol=0)


def test_max_text_length_gives_a_new_model_that_many_positions_and_stretches_a_pretrained_one(model_77, tmp_path):
    new = build_model(ModelArguments(model_config="tiny"), seed=0, max_text_length=LONG)
    assert new.config.text_config.max_position_embeddings == LONG and new.config.text_position_stretch is None
    assert new.text_model.embeddings.position_embedding.num_embeddings == LONG
    assert build_processor(ModelArguments(model_config="tiny"), new).tokenizer.model_max_length == LONG

    model_77.save_pretrained(tmp_path)
    ALIPProcessor.from_config(model_77.config).save_pretrained(tmp_path)
    args = ModelArguments(model_name_or_path=str(tmp_path))
    stretched = build_model(args, seed=0, max_text_length=LONG)
    assert stretched.config.text_position_stretch["original_length"] == 77
    torch.testing.assert_close(stretched.text_model.embeddings.position_embedding.weight,
                               stretch_position_embeddings(model_77.text_model.embeddings.position_embedding.weight,
                                                           LONG))
    assert build_processor(args, stretched).tokenizer.model_max_length == LONG
    unchanged = build_model(args, seed=0, max_text_length=77)
    assert unchanged.config.text_position_stretch is None


def test_stretched_model_loads_as_remote_code_with_its_length(model_77, tmp_path):
    model_77.stretch_text_positions(LONG)
    processor = ALIPProcessor.from_config(model_77.config)
    directory = tmp_path / "model"
    model_77.save_pretrained(directory)
    processor.save_pretrained(directory)
    image_path = tmp_path / "image.png"
    Image.fromarray(np.full((30, 30, 3), 120, dtype=np.uint8)).save(image_path)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    output, workdir = tmp_path / "features.pt", tmp_path / "cwd"
    workdir.mkdir()
    texts = [[LONG_TEXT, "a cat"], ["a cat", LONG_TEXT]]
    result = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(directory), str(image_path), json.dumps(texts),
                             str(output)], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(output)
    assert remote["batch"]["input_ids"].shape[1] > 150
    torch.testing.assert_close(remote["text"], text_features(model_77, processor, texts[0]), atol=1e-6, rtol=0)


def test_an_unstretched_config_records_no_stretch():
    assert ALIPConfig().text_position_stretch is None
    assert "text_position_stretch" in ALIPConfig().to_dict()


def test_248_position_model_saved_reloaded_exported_and_loaded_in_open_clip_gives_the_same_features(model_77,
                                                                                                   tmp_path):
    open_clip = pytest.importorskip("open_clip")
    from alip_hf.convert.to_open_clip import export_to_open_clip

    model_77.stretch_text_positions(LONG)
    processor = ALIPProcessor.from_config(model_77.config)
    model_77.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = ALIPModel.from_pretrained(tmp_path).eval(), ALIPProcessor.from_pretrained(tmp_path)
    export_to_open_clip(loaded, tmp_path, processor=loaded_processor)
    theirs = open_clip.create_model(f"local-dir:{tmp_path}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path}")
    assert tokenizer.context_length == LONG and theirs.positional_embedding.shape[0] == LONG
    texts = [LONG_TEXT, "a cat"]
    with torch.no_grad():
        their_text = theirs.encode_text(tokenizer(texts))
    # The feature tolerance of the open_clip export tests (fp32, two implementations of one network).
    torch.testing.assert_close(their_text, text_features(model_77, processor, texts), atol=1e-4, rtol=0)


def test_clip_export_of_a_248_position_model_keeps_its_length(model_77, tmp_path):
    from transformers import CLIPModel, CLIPTokenizerFast

    from alip_hf.convert.to_clip import export_to_clip

    model_77.stretch_text_positions(LONG)
    processor = ALIPProcessor.from_config(model_77.config)
    export_to_clip(model_77, tmp_path / "clip", processor=processor)
    clip = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    assert clip.config.text_config.max_position_embeddings == LONG
    assert CLIPTokenizerFast.from_pretrained(tmp_path / "clip").model_max_length == LONG
    batch = processor(text=[LONG_TEXT])
    with torch.no_grad():
        theirs = clip.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(theirs.pooler_output, text_features(model_77, processor, [LONG_TEXT]), atol=1e-6,
                               rtol=0)


def test_training_with_max_text_length_beyond_77_saves_a_model_and_tokenizer_of_that_length(tiny_data, tmp_path):
    from transformers import AutoTokenizer

    from alip_hf import train

    output = tmp_path / "run"
    train.main(tiny_data.argv(output, "--recipe", "clip", "--max_text_length", "100"))
    saved = ALIPModel.from_pretrained(output)
    assert saved.config.text_config.max_position_embeddings == 100
    assert saved.config.text_position_stretch is None  # built with 100 positions, nothing stretched
    assert AutoTokenizer.from_pretrained(output).model_max_length == 100
