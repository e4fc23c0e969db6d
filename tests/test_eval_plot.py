"""eval.py's recall@k curves: the curve stored with retrieval results, its PNG, the missing-matplotlib error, and
the CLI's `--plot` with the model card's link to it."""

import builtins
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from alip_hf import eval as eval_cli
from alip_hf import evaluation as ev
from alip_hf.io import write_json_atomic

CURVES = ("image_retrieval_recall", "text_retrieval_recall")


def random_retrieval(num_images=12, num_texts=30, seed=0, noise=0.0):
    """Normalised features `(I, D)`, `(T, D)` and each text's image `(T,)`; every image has a caption, some
    several."""
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(num_images, 8, generator=generator), dim=-1)
    index = np.concatenate([np.arange(num_images), np.random.default_rng(seed).integers(0, num_images,
                                                                                        num_texts - num_images)])
    texts = F.normalize(images[index] * noise + torch.randn(num_texts, 8, generator=generator), dim=-1)
    return images, texts, index


def retrieval_record(dataset="demo", model="model", seed=0, noise=0.0):
    images, texts, index = random_retrieval(seed=seed, noise=noise)
    return {"dataset": dataset, "model": model, "task": ev.RETRIEVAL, "split": "test",
            "metrics": ev.retrieval_metrics(images, texts, index),
            "recall_curve": ev.recall_curve(images, texts, index)}


def assert_png(path, size=(1000, 400)):
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", size)
        image.verify()
    assert not list(path.parent.glob("*.tmp"))


def test_recall_curve_passes_through_r_at_1_5_10_is_non_decreasing_and_ends_at_one():
    images, texts, index = random_retrieval()
    curve = ev.recall_curve(images, texts, index)
    metrics = ev.retrieval_metrics(images, texts, index)
    assert curve["k"] == list(range(1, 31))  # up to the larger candidate count (30 texts), below 50
    every_k = ev.retrieval_metrics(images, texts, index, ks=curve["k"])  # one ranking per k
    for name in CURVES:
        assert [curve[name][k - 1] for k in ev.RECALL_KS] == [metrics[f"{name}@{k}"] for k in ev.RECALL_KS]
        assert curve[name] == [every_k[f"{name}@{k}"] for k in curve["k"]]
        assert np.all(np.diff(curve[name]) >= 0)
        assert curve[name][-1] == 1.0
    assert curve["image_retrieval_recall"][len(images) - 1] == 1.0  # k = number of images: every text hits
    assert curve["image_retrieval_recall"][0] < 1.0 and curve["text_retrieval_recall"][0] < 1.0  # not trivial


def test_recall_curve_stops_at_max_k():
    images, texts, index = random_retrieval()
    assert ev.recall_curve(images, texts, index, max_k=7)["k"] == list(range(1, 8))


def test_plot_writes_a_png_of_the_figure_size_from_records_or_a_results_file(tmp_path):
    records = [retrieval_record(model="runs/a"), retrieval_record(model="runs/b", seed=1, noise=2.0),
               {"dataset": "demo", "task": ev.ZEROSHOT, "metrics": {"acc1": 0.5}}]  # not a curve: left out
    path = ev.plot_recall_at_k(records, tmp_path / "plots" / "recall.png")
    assert path == tmp_path / "plots" / "recall.png"
    assert_png(path)

    results = tmp_path / "results.json"
    write_json_atomic(results, {"model": "m", "results": records})
    assert_png(ev.plot_recall_at_k(str(results), tmp_path / "again.png", figsize=(6, 3), dpi=50), size=(300, 150))


def test_plot_without_recall_curves_is_an_error(tmp_path):
    flat = {"eval/demo/image_retrieval_recall@1": 0.5}  # train.py's logged keys hold no curve
    with pytest.raises(ValueError, match="no retrieval results with a recall_curve"):
        ev.plot_recall_at_k(flat, tmp_path / "recall.png")


def test_missing_matplotlib_is_an_error_naming_the_install_command(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def without_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_matplotlib)
    with pytest.raises(ImportError, match=r"pip install matplotlib"):
        ev.plot_recall_at_k([retrieval_record()], tmp_path / "recall.png")
    assert not list(tmp_path.iterdir())


def test_cli_plot_writes_the_curves_stored_in_results_json_and_links_them_from_the_model_card(
        model_and_processor, tmp_path):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out, plot, card = tmp_path / "out" / "results.json", tmp_path / "out" / "recall.png", tmp_path / "README.md"
    eval_cli.main(["--model", str(tmp_path / "model"), "--preset", "demo", "--max_samples", "24", "--output", str(out),
             "--plot", str(plot), "--model_card", str(card)])
    assert_png(plot)

    (record,) = [r for r in json.loads(out.read_text())["results"] if r["task"] == ev.RETRIEVAL]
    curve = record["recall_curve"]
    assert curve["k"] == list(range(1, 49))  # 24 images, 48 captions
    for name in CURVES:
        assert [curve[name][k - 1] for k in ev.RECALL_KS] == [record["metrics"][f"{name}@{k}"] for k in ev.RECALL_KS]
        assert curve[name][-1] == 1.0
    assert set(record["metrics"]) == {f"{name}@{k}" for name in CURVES for k in ev.RECALL_KS}  # names unchanged
    assert "![Retrieval recall@k](out/recall.png)" in card.read_text()
    assert_png(ev.plot_recall_at_k(out, tmp_path / "redrawn.png"))  # from results.json alone


def test_cli_plot_without_a_retrieval_task_fails_before_evaluating(tmp_path):
    with pytest.raises(ValueError, match="no retrieval task"):
        eval_cli.main(["--model", str(tmp_path / "no-model"), "--preset", "cifar10", "--plot", str(tmp_path / "r.png")])


def test_model_card_without_a_plot_has_no_image_link():
    card = ev.render_model_card([retrieval_record()])
    assert "{{" not in card and "![" not in card


def test_model_card_links_a_plot_from_inside_the_model_folder(tmp_path):
    model_dir, elsewhere = tmp_path / "model", tmp_path / "plots"
    model_dir.mkdir()
    elsewhere.mkdir()
    plot = ev.plot_recall_at_k([retrieval_record()], elsewhere / "recall.png")
    args = eval_cli.EvalArguments(model=str(model_dir), preset=["demo"], plot=str(plot),
                                  model_card=str(model_dir / "README.md"))
    eval_cli.write_model_card(args, [retrieval_record()], ["--model", str(model_dir), "--plot", str(plot)])
    card = (model_dir / "README.md").read_text()
    assert "![Retrieval recall@k](recall.png)" in card and "../" not in card  # the link survives a push
    assert (model_dir / "recall.png").read_bytes() == plot.read_bytes()


HIDE_MATPLOTLIB = """
import runpy, sys
class HideMatplotlib:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, HideMatplotlib())
sys.argv = ["eval.py", *sys.argv[1:]]
runpy.run_module("alip_hf.eval", run_name="__main__")
"""


@pytest.mark.parametrize("mode", ["evaluate", "compare"])
def test_cli_plot_without_matplotlib_says_in_one_line_the_install_command_that_works(tmp_path, mode):
    import subprocess
    import sys

    flags = (["--model", str(tmp_path / "model"), "--preset", "demo"] if mode == "evaluate"
             else ["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    result = subprocess.run([sys.executable, "-c", HIDE_MATPLOTLIB, *flags, "--plot", str(tmp_path / "r.png")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-2000:]  # no traceback
    # the packages themselves: neither `-e '.[plot]'` (a checkout only) nor `alip-hf[plot]` (no index serves it)
    assert lines[0].startswith("eval.py --plot: ") and lines[0].endswith("pip install matplotlib"), lines[0]
    assert not list(tmp_path.iterdir())  # failed before any work
