"""A real two-process `accelerate launch` on CPU (gloo): trains, checkpoints, resumes, accumulates, and follows
the same loss curve as one process fed the same global batches.

Accelerate 1.x starts several CPU processes only through mpirun when given `--cpu`; torchrun's launcher
(`--multi_gpu`) with `ACCELERATE_USE_CPU=true` gives the same gloo process group without MPI.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from alip_hf import train
from alip_hf.training.checkpoints import STATE_FILE
from conftest import REPO_ROOT, read_metrics

ROOT = REPO_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(argv: list[str]):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="true")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(ROOT / "train.py"), *argv]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "MULTI_CPU" in result.stderr, "the run did not start two gloo processes"


@pytest.mark.slow  # 40-120 s: three launches of two processes on shared CPUs
def test_two_processes_checkpoint_resume_accumulate_and_match_one_process_loss_curve(tiny_data, tmp_path):
    flags = ("--max_steps", "4", "--save_steps", "2", "--recipe", "alip")
    train.main(tiny_data.argv(tmp_path / "one", *flags, "--per_device_train_batch_size", "8"))

    two = tmp_path / "two"
    _launch_two_processes(tiny_data.argv(two, *flags, "--per_device_train_batch_size", "4",
                                         "--stop_after_steps", "2"))
    assert (two / "checkpoints" / "step_000002" / STATE_FILE).exists()
    _launch_two_processes(tiny_data.argv(two, *flags, "--per_device_train_batch_size", "4",
                                         "--resume_from_checkpoint", "latest"))

    one_curve = [(r["step"], r["loss/total"], r["gate/lcg/running_mean"]) for r in read_metrics(tmp_path / "one")]
    two_curve = [(r["step"], r["loss/total"], r["gate/lcg/running_mean"]) for r in read_metrics(two)]
    assert [s for s, *_ in two_curve] == [s for s, *_ in one_curve] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(two_curve), torch.tensor(one_curve, dtype=torch.float32),
                               rtol=1e-4, atol=1e-5)
    one, resumed = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for name, weight in one.items():
        torch.testing.assert_close(resumed[name], weight, rtol=1e-4, atol=1e-5, msg=name)

    # The same global batches as 2 processes x 2 accumulated micro-batches of 2 (no_sync + gather + splice).
    accumulated = tmp_path / "accumulated"
    _launch_two_processes(tiny_data.argv(accumulated, *flags, "--per_device_train_batch_size", "2",
                                         "--gradient_accumulation_steps", "2"))
    curve = [(r["step"], r["loss/total"], r["gate/lcg/running_mean"]) for r in read_metrics(accumulated)]
    torch.testing.assert_close(torch.tensor(curve), torch.tensor(one_curve, dtype=torch.float32),
                               rtol=1e-4, atol=1e-5)
