"""Evaluation split over two processes (`accelerate launch`, CPU, gloo) gives the one-process numbers: every
sample encoded once, the padding Accelerate adds to the last round dropped by `gather_for_metrics`.

As in test_train_distributed.py, torchrun's launcher (`--multi_gpu`) with `ACCELERATE_USE_CPU=true` starts the
two CPU processes without MPI.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from conftest import tiny_alip_config

from conftest import REPO_ROOT
from alip_hf import evaluation as ev
from modeling_alip import ALIPModel, ALIPProcessor

ROOT = REPO_ROOT
# 45 rows in batches of 8: six batches, the last one short, so the two processes get uneven shares.
MAX_SAMPLES, BATCH_SIZE = 45, 8

WORKER = textwrap.dedent("""
    import json, sys
    from dataclasses import replace
    from accelerate import Accelerator
    from alip_hf import eval as eval_cli
    from alip_hf import evaluation as ev

    accelerator = Accelerator()
    model, processor = eval_cli.load_model_and_processor(sys.argv[1], accelerator.device)
    encoded = []  # rows this process pushes through the image tower
    get_image_features = model.get_image_features
    model.get_image_features = lambda pixel_values: encoded.append(len(pixel_values)) or get_image_features(
        pixel_values=pixel_values)
    zeroshot, retrieval = ev.PRESETS["demo"]
    tasks = [zeroshot, retrieval, replace(zeroshot, task="linear_probe")]
    settings = ev.EvalSettings(batch_size=int(sys.argv[3]), text_batch_size=int(sys.argv[3]),
                               max_samples=int(sys.argv[4]))
    records = ev.run_evaluation(model, processor, tasks, accelerator=accelerator, settings=settings)
    with open(f"{sys.argv[2]}.rank{accelerator.process_index}", "w") as f:
        json.dump({"num_processes": accelerator.num_processes, "records": records, "encoded": sum(encoded)}, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # about 40 s: two interpreter starts on shared CPUs
def test_two_process_evaluation_equals_one_process(tmp_path):
    config = tiny_alip_config()
    torch.manual_seed(0)
    model, processor = ALIPModel(config).eval(), ALIPProcessor.from_config(config)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "worker.py").write_text(WORKER)

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="true")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(tmp_path / "worker.py"),
           str(tmp_path / "model"), str(tmp_path / "out"), str(BATCH_SIZE), str(MAX_SAMPLES)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]

    zeroshot, retrieval = ev.PRESETS["demo"]
    settings = ev.EvalSettings(batch_size=BATCH_SIZE, text_batch_size=BATCH_SIZE, max_samples=MAX_SAMPLES)
    expected = ev.run_evaluation(model, processor, [zeroshot, retrieval, replace(zeroshot, task="linear_probe")],
                                 settings=settings, model_name=str(tmp_path / "model"))
    shares = []
    for rank in (0, 1):
        got = json.loads((tmp_path / f"out.rank{rank}").read_text())
        shares.append(got["encoded"])
        assert got["num_processes"] == 2
        assert [r["metrics"] for r in got["records"]] == [r["metrics"] for r in expected]
        assert [r["num_images"] for r in got["records"]] == [MAX_SAMPLES] * 3
    # Test and train split images (45 + 45), each process about half: 3 of the 6 batches of each split, the
    # short last batch padded to a full one on the second process.
    assert shares == [48, 48]
