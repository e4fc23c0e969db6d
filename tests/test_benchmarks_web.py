"""The GPU benchmark script runs on CPU at tiny sizes, with open_clip built to the same architecture; the data
benchmarks run at tiny sizes."""

import json
import sys

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


@pytest.mark.parametrize("config", ["tiny", "vit-b-32"])
def test_open_clip_gets_the_same_architecture(config, tmp_path):
    import bench_gpu
    import open_clip

    from alip_hf.model_sizes import MODEL_CONFIGS
    from alip_hf.models import build_model
    from alip_hf.training.arguments import ModelArguments

    (tmp_path / f"same-{config}.json").write_text(json.dumps(bench_gpu.open_clip_config(MODEL_CONFIGS[config])))
    open_clip.add_model_config(tmp_path)
    theirs = open_clip.create_model(f"same-{config}")
    ours = build_model(ModelArguments(model_config=config), seed=0)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())


def test_gpu_benchmark_runs_on_cpu_with_tiny_sizes():
    import bench_gpu

    rows = bench_gpu.main(["--device", "cpu", "--precision", "fp32", "--config", "tiny", "--batch", "4",
                           "--steps", "2", "--warmup", "1"])
    assert [r["model"] for r in rows] == ["alip", "clip", "open_clip"]
    assert all(r["samples_per_second"] > 0 for r in rows) and rows[2]["time_ratio"] == 1.0


def test_transform_benchmark_runs():
    import bench_data_transform

    rows = bench_data_transform.main(["--images", "8", "--repeats", "1", "--image_size", "16"])
    assert {r["step"] for r in rows} >= {"eval transform", "train transform", "collate"}
