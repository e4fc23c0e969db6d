"""Two gloo processes under DDP compute the same loss and gradients as one process fed the concatenated batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _distributed_loss_worker import global_batch, tiny_model

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def _run_two_processes(tmp_path: Path, mode: str) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "_distributed_loss_worker.py"), str(tmp_path), mode]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def _single_process():
    model = tiny_model()
    output = model(**global_batch(), return_loss=True)
    output.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b for n, b in model.named_buffers() if "running_mean" in n}
    return output.loss.detach(), grads, buffers


@pytest.mark.parametrize("mode", ["global", "local"])
def test_two_processes_match_one_process_on_the_concatenated_batch(tmp_path, mode):
    loss, grads, buffers = _single_process()
    ranks = _run_two_processes(tmp_path, mode)
    if mode == "global":  # every process computes the loss of the whole global batch
        for rank in ranks:
            torch.testing.assert_close(rank["loss"], loss, rtol=1e-5, atol=1e-6)
    else:  # each process averages its own rows; their mean is the global loss
        torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, rtol=1e-5, atol=1e-6)
    for rank in ranks:
        assert rank["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
        for name, buffer in buffers.items():  # the gates saw the gathered batch, as in the official code
            torch.testing.assert_close(rank["buffers"][name], buffer, rtol=0, atol=1e-7, msg=name)
