"""Export to open_clip's format (`open_clip_config.json` + `open_clip_model.safetensors` beside the transformers
files): open_clip 3.x loads the directory with `local-dir:` and gives our features, and CLIP_benchmark's own
command line gives eval.py's numbers on the same shards."""

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import torch
from conftest import tiny_alip_config
from PIL import Image

from modeling_alip import ALIPModel, ALIPProcessor
from alip_hf.convert import cli
from alip_hf.convert.from_open_clip import convert_state_dict
from alip_hf.convert.to_clip import clip_state_dict
from alip_hf.convert.to_open_clip import (
    OPEN_CLIP_CONFIG_NAME,
    OPEN_CLIP_WEIGHTS_NAME,
    export_to_open_clip,
    open_clip_model_cfg,
    open_clip_state_dict,
)


def main(flags):
    return cli.main(["to_open_clip", *flags])

open_clip = pytest.importorskip("open_clip")

# fp32 features of the two implementations of the same network (the bound).
FEATURE_ATOL = 1e-4
# Texts whose tokens depend on CLIP's cleaning (HTML entities, whitespace, case) and one longer than the context.
TEXTS = ["a photo of a cat", "Two   DOGS &amp; a ball", "“quoted” text!", " ".join(["word"] * 100)]


def images(n: int, seed: int = 0, size: int = 30) -> list[Image.Image]:
    """Random images at the model's size: resizing is then the identity in both preprocessing pipelines."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def saved_model(directory, **tower_overrides) -> tuple[ALIPModel, ALIPProcessor]:
    config = tiny_alip_config()
    for tower in (config.text_config, config.vision_config):
        for key, value in tower_overrides.items():
            setattr(tower, key, value)
    torch.manual_seed(0)
    model = ALIPModel(config).eval()
    processor = ALIPProcessor.from_config(config)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return model, processor


def open_clip_features(directory, pixel_values: torch.Tensor, texts: list[str]):
    """open_clip's image and text features of the exported directory, with open_clip's own tokenizer."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    model.eval()
    with torch.no_grad():
        return model.encode_image(pixel_values), model.encode_text(tokenizer(texts)), model, preprocess


def our_features(model, processor, pixel_values, texts):
    batch = processor(text=texts)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixel_values).pooler_output
        text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return image, text.pooler_output


@pytest.mark.parametrize("towers", [{}, {"hidden_act": "gelu"}, {"layer_norm_eps": 1e-2}],
                         ids=["quick_gelu", "gelu", "layer_norm_eps"])
def test_open_clip_loads_the_export_with_the_same_features(tmp_path, towers):
    model, processor = saved_model(tmp_path, **towers)
    export_to_open_clip(model, tmp_path, processor=processor)
    pixels = processor(images=images(4))["pixel_values"]
    their_image, their_text, loaded, preprocess = open_clip_features(tmp_path, pixels, TEXTS)
    our_image, our_text = our_features(model, processor, pixels, TEXTS)
    assert (their_image - our_image).abs().max() < FEATURE_ATOL
    assert (their_text - our_text).abs().max() < FEATURE_ATOL
    assert torch.equal(loaded.logit_scale.detach(), model.logit_scale.detach())
    # open_clip's own preprocessing from preprocess_cfg gives our pixels (same size, mean, std).
    theirs = torch.stack([preprocess(image) for image in images(4)])
    assert (theirs - pixels).abs().max() < 1e-6


def test_architecture_mapping_is_what_open_clip_builds(tmp_path):
    model, processor = saved_model(tmp_path, hidden_act="gelu", layer_norm_eps=1e-6)
    export_to_open_clip(model, tmp_path, processor=processor)
    config = json.loads((tmp_path / OPEN_CLIP_CONFIG_NAME).read_text())
    vision, text = model.config.vision_config, model.config.text_config
    assert config["model_cfg"] == {
        "embed_dim": 16, "quick_gelu": False,
        "vision_cfg": {"image_size": 30, "layers": 2, "width": 32, "head_width": 8, "mlp_ratio": 37 / 32,
                       "patch_size": 2, "norm_kwargs": {"eps": 1e-6}},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2,
                     "mlp_ratio": 37 / 32, "norm_kwargs": {"eps": 1e-6}},
    }
    assert config["preprocess_cfg"] == {"size": 30, "mean": list(processor.image_processor.image_mean),
                                        "std": list(processor.image_processor.image_std), "interpolation": "bicubic",
                                        "resize_mode": "shortest"}
    loaded = open_clip.create_model(f"local-dir:{tmp_path}")
    assert isinstance(loaded.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    assert loaded.visual.transformer.resblocks[0].mlp.c_fc.out_features == vision.intermediate_size
    assert loaded.transformer.resblocks[0].ln_1.eps == loaded.visual.ln_pre.eps == 1e-6
    assert loaded.positional_embedding.shape == (text.max_position_embeddings, text.hidden_size)
    assert loaded.visual.positional_embedding.shape == ((30 // 2) ** 2 + 1, vision.hidden_size)
    assert open_clip.get_tokenizer(f"local-dir:{tmp_path}").context_length == 77


def test_the_activation_flag_matters(tmp_path):
    """Control for the feature test: with the other activation open_clip's features miss the bound by far (the
    tiny tower's small initial weights keep GELU and QuickGELU close, so "far" is 10x here)."""
    model, processor = saved_model(tmp_path)
    export_to_open_clip(model, tmp_path, processor=processor)
    config_path = tmp_path / OPEN_CLIP_CONFIG_NAME
    config = json.loads(config_path.read_text())
    config["model_cfg"]["quick_gelu"] = False
    config_path.write_text(json.dumps(config))
    pixels = processor(images=images(2))["pixel_values"]
    their_image, their_text, _, _ = open_clip_features(tmp_path, pixels, TEXTS)
    our_image, our_text = our_features(model, processor, pixels, TEXTS)
    assert (their_image - our_image).abs().max() > 10 * FEATURE_ATOL
    assert (their_text - our_text).abs().max() > 10 * FEATURE_ATOL


def test_weights_map_back_exactly_through_the_importer(tiny_model):
    exported = open_clip_state_dict(tiny_model)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in exported and not any("gates" in k for k in exported)
    back = convert_state_dict(exported)
    expected = clip_state_dict(tiny_model)
    expected = {k: v for k, v in expected.items() if not k.endswith("position_ids")}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], v) for k, v in expected.items())


def test_cli_writes_open_clip_files_beside_the_transformers_files(tmp_path, capsys):
    saved_model(tmp_path)
    before = set(os.listdir(tmp_path))
    main(["--model_name_or_path", str(tmp_path)])
    assert set(os.listdir(tmp_path)) == before | {OPEN_CLIP_CONFIG_NAME, OPEN_CLIP_WEIGHTS_NAME}
    assert "local-dir:" in capsys.readouterr().out
    # open_clip picks its own weights file, not transformers' model.safetensors in the same folder.
    from open_clip.factory import _find_checkpoint_in_dir

    assert os.path.basename(_find_checkpoint_in_dir(tmp_path)) == OPEN_CLIP_WEIGHTS_NAME
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="--model_name_or_path .*empty has no config.json"):
        main(["--model_name_or_path", str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="--model_name_or_path .*missing: no such model directory"):
        main(["--model_name_or_path", str(tmp_path / "missing")])


@pytest.mark.parametrize("change, message", [
    (dict(text_config=dict(vocab_size=1000, eos_token_id=999, bos_token_id=998)), "not CLIP's 49408"),
    (dict(vision_config=dict(hidden_act="gelu_new"), text_config=dict(hidden_act="gelu_new")), "GELU or QuickGELU"),
    (dict(vision_config=dict(hidden_act="gelu")), "hidden_act differ"),
    (dict(text_config=dict(eos_token_id=5)), "pools at the highest token id"),
])
def test_export_refuses_what_open_clip_cannot_express(tmp_path, change, message):
    config = tiny_alip_config()
    for tower, values in change.items():
        for key, value in values.items():
            setattr(getattr(config, tower), key, value)
    model = ALIPModel(config)
    with pytest.raises(ValueError, match=message):
        if config.text_config.vocab_size == 49408:
            open_clip_model_cfg(config)
        else:
            export_to_open_clip(model, tmp_path)
    assert not (tmp_path / OPEN_CLIP_CONFIG_NAME).exists()


# ------------------------------------------------------------------------------------------ CLIP_benchmark
CLASS_NAMES = ["cat", "dog", "ship", "frog", "horse", "red car", "tree"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}.", "{c} in the wild"]
WORDS = ["red", "blue", "green", "small", "large", "cat", "dog", "house", "boat", "tree", "on", "a", "hill"]
# CLIP_benchmark 1.6.2's `accuracy` calls float() on a 1-element array, which NumPy 2.4 rejects; this
# module-level `float` accepts it and leaves its arithmetic unchanged. Then its own command line runs.
CLIP_BENCHMARK = textwrap.dedent(
    """
    import builtins, sys
    import numpy as np
    import clip_benchmark.metrics.zeroshot_classification as zeroshot
    zeroshot.float = lambda x: builtins.float(np.asarray(x).reshape(-1)[0])
    from clip_benchmark.cli import main
    sys.argv = ["clip_benchmark", *sys.argv[1:]]
    sys.exit(main())
    """
)


def write_shards(root, samples: list[dict], dataset_type: str):
    """CLIP_benchmark's WebDataset layout (`test/nshards.txt`, `test/0.tar`, metadata text files)."""
    (root / "test").mkdir(parents=True)
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "dataset_type.txt").write_text(dataset_type + "\n")
    (root / "classnames.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, sample in enumerate(samples):
            for extension, payload in sample.items():
                info = tarfile.TarInfo(f"{i:06d}.{extension}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def run_clip_benchmark(model_dir, root, task, output, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", CLIP_BENCHMARK, "eval", "--model", f"local-dir:{model_dir}", "--pretrained", "none",
         "--dataset", "wds/toy", "--dataset_root", str(root), "--task", task, "--no_amp", "--num_workers", "0",
         "--batch_size", "16", "--recall_k", "1", "5", "10", "--output", str(output), "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(output.read_text())["metrics"]


@pytest.mark.slow
def test_clip_benchmark_cli_on_the_export_gives_eval_py_numbers(tmp_path):
    from alip_hf.eval import main as eval_main

    model_dir = tmp_path / "model"
    saved_model(model_dir)
    main(["--model_name_or_path", str(model_dir)])
    rng = np.random.default_rng(1)
    pictures = images(60, seed=2)

    labels = rng.integers(0, len(CLASS_NAMES), len(pictures))
    write_shards(tmp_path / "classification",
                 [{"png": png(p), "cls": str(c).encode()} for p, c in zip(pictures, labels)], "classification")
    # Two captions per image: CLIP_benchmark reads them from `txt` (one per line), eval.py from two columns.
    captions = [[" ".join(rng.choice(WORDS, 5)) for _ in range(2)] for _ in pictures]
    write_shards(tmp_path / "retrieval", [{"png": png(p), "txt": "\n".join(c).encode(), "cap0.txt": c[0].encode(),
                                           "cap1.txt": c[1].encode()} for p, c in zip(pictures, captions)], "retrieval")

    shards = str(tmp_path / "{}" / "test" / "0.tar")
    (ours_zeroshot,) = eval_main([
        "--model", str(model_dir), "--dataset", shards.format("classification"), "--task", "zeroshot_classification",
        "--image_column", "png", "--label_column", "cls",
        "--class_names", str(tmp_path / "classification/classnames.txt"),
        "--templates", str(tmp_path / "classification/zeroshot_classification_templates.txt"),
        "--output", str(tmp_path / "ours_zeroshot.json")])
    (ours_retrieval,) = eval_main([
        "--model", str(model_dir), "--dataset", shards.format("retrieval"), "--task", "zeroshot_retrieval",
        "--image_column", "png", "--caption_columns", "cap0.txt", "cap1.txt", "--recall_curve_max_k", "0",
        "--output", str(tmp_path / "ours_retrieval.json")])

    theirs = run_clip_benchmark(model_dir, tmp_path / "classification", "zeroshot_classification",
                                tmp_path / "cb_zeroshot.json", tmp_path)
    assert ours_zeroshot["metrics"] == theirs
    assert 0 < theirs["acc1"] < theirs["acc5"] < 1  # a non-degenerate case
    theirs = run_clip_benchmark(model_dir, tmp_path / "retrieval", "zeroshot_retrieval", tmp_path / "cb_retrieval.json",
                                tmp_path)
    assert set(theirs) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
    assert {k: v for k, v in ours_retrieval["metrics"].items() if k in theirs} == theirs
    assert any(0 < v < 1 for v in theirs.values())


def test_a_trained_model_directory_carries_the_open_clip_files(tiny_data, tmp_path):
    from alip_hf import train

    argv = tiny_data.argv(tmp_path / "run", "--max_steps", "1")
    clip_bpe = argv[:argv.index("--tokenizer_name_or_path")] + argv[argv.index("--tokenizer_name_or_path") + 2:]
    train.main(clip_bpe)  # the default tokenizer: CLIP's BPE, which open_clip's tokenizer reproduces
    model = ALIPModel.from_pretrained(tmp_path / "run").eval()
    processor = ALIPProcessor.from_pretrained(tmp_path / "run")
    pixels = processor(images=images(2, size=model.config.vision_config.image_size))["pixel_values"]
    their_image, their_text, _, _ = open_clip_features(tmp_path / "run", pixels, TEXTS)
    our_image, our_text = our_features(model, processor, pixels, TEXTS)
    assert (their_image - our_image).abs().max() < FEATURE_ATOL and (their_text - our_text).abs().max() < FEATURE_ATOL
    # A word-level tokenizer open_clip cannot reproduce: the run still finishes, without open_clip files.
    train.main(tiny_data.argv(tmp_path / "words", "--max_steps", "1"))
    assert (tmp_path / "words" / "model.safetensors").exists()
    assert not (tmp_path / "words" / OPEN_CLIP_CONFIG_NAME).exists()


ROUND_TRIP_ATOL = 1e-6


@pytest.mark.parametrize("towers", [{}, {"hidden_act": "gelu"}, {"layer_norm_eps": 1e-2}],
                         ids=["quick_gelu", "gelu", "layer_norm_eps"])
def test_to_open_clip_then_from_open_clip_with_the_written_config_gives_the_same_model(tmp_path, towers):
    model, processor = saved_model(tmp_path / "model", **towers)
    main(["--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "open_clip")])
    # The two files as written, unedited: the config's `model_cfg` wrapper must be read, not ignored.
    cli.main(["from_open_clip", "--checkpoint_path", str(tmp_path / "open_clip" / OPEN_CLIP_WEIGHTS_NAME),
              "--open_clip_config", str(tmp_path / "open_clip" / OPEN_CLIP_CONFIG_NAME),
              "--output_dir", str(tmp_path / "back")])

    back = ALIPModel.from_pretrained(tmp_path / "back").eval()
    for name in ("num_attention_heads", "hidden_act", "layer_norm_eps", "intermediate_size", "num_hidden_layers"):
        for tower in ("text_config", "vision_config"):
            assert getattr(getattr(back.config, tower), name) == getattr(getattr(model.config, tower), name), name
    pixels = torch.stack([torch.from_numpy(np.asarray(p, dtype=np.float32)).permute(2, 0, 1) / 255 for p in images(3)])
    expected = our_features(model, processor, pixels, TEXTS)
    torch.testing.assert_close(our_features(back, processor, pixels, TEXTS), expected, atol=ROUND_TRIP_ATOL, rtol=0)


def test_a_json_that_is_no_open_clip_config_is_refused_naming_it(tmp_path):
    from alip_hf.convert.from_open_clip import load_model_config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "alip", "projection_dim": 16}))
    with pytest.raises(ValueError, match=r"config\.json: not an open_clip model config"):
        load_model_config(tmp_path / "config.json")
