"""Two gloo processes under DDP compute the same sigmoid loss (SigLIP's, and ALIP's gated one) and gradients as one
process fed the concatenated batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _distributed_sigmoid_loss_worker import CASES, global_batch, tiny_model

TESTS = Path(__file__).parent
ROOT = TESTS.parent


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sigmoid")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "_distributed_sigmoid_loss_worker.py"), str(out)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _single_process(case: str):
    model = tiny_model(case)
    output = model(**global_batch(case), return_loss=True)
    output.loss.backward()
    return output.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_match_one_process_on_the_concatenated_batch(ranks, case):
    loss, grads = _single_process(case)
    assert "logit_bias" in grads and "logit_scale" in grads
    results = [rank[case] for rank in ranks]
    if CASES[case][1]:  # local loss: each process averages its own rows; their mean is the global loss
        torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, loss, rtol=1e-5, atol=1e-5)
    else:
        for result in results:
            torch.testing.assert_close(result["loss"], loss, rtol=1e-5, atol=1e-5)
    for result in results:
        assert result["grads"].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-5, msg=name)
