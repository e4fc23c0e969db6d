"""Preemption: a real SIGTERM or SIGUSR1 to a real `train.py` (one process, and `accelerate launch` with two): the run
finishes its step, saves a checkpoint, exits with status 75, and the resumed run ends bit-identical to an
uninterrupted one.

Rows of docs/reliability.md point here."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, read_metrics
from safetensors.torch import load_file

from alip_hf import train
from alip_hf.training import checkpoints
from alip_hf.training.preemption import PREEMPTED_EXIT_CODE

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
STEPS = 40  # long enough that the signal, sent after step 1, arrives well before the end


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys() and any("running_mean" in name for name in a)
    for name in a:  # same operations in the same order: bit-identical
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)


def _wait_for_first_step(process: subprocess.Popen, output_dir: Path, timeout: float = 300):
    """Until the first metrics line is written (handlers are installed by then), or the process ended."""
    deadline = time.time() + timeout
    metrics = output_dir / "metrics.jsonl"
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            return
        time.sleep(0.02)
    raise AssertionError(f"no step was logged (exit status {process.poll()})")


def test_preempted_exit_status_is_not_a_shells_killed_by_signal_status():
    # 128 + N is what a shell reports for a process the signal killed; 1 is an error.
    assert PREEMPTED_EXIT_CODE not in {1, 2, 128 + signal.SIGTERM, 128 + signal.SIGUSR1, 128 + signal.SIGKILL}


@pytest.mark.slow  # a second interpreter and two 40-step runs: 20-60 s on shared CPUs
@pytest.mark.parametrize("signum, to_group, workers", [
    # Kubernetes: SIGTERM to the container's main process only.
    pytest.param(signal.SIGTERM, False, "0", id="SIGTERM"),
    # Slurm's --signal: every process of the step, here with a DataLoader worker that must not die of it.
    pytest.param(signal.SIGUSR1, True, "1", id="SIGUSR1-to-the-process-group"),
    pytest.param(signal.SIGTERM, True, "1", id="SIGTERM-to-the-process-group"),
])
def test_signal_saves_a_checkpoint_exits_75_and_the_resumed_run_is_bit_identical(
        tiny_data, tmp_path_factory, tmp_path, signum, to_group, workers):
    flags = ("--max_steps", str(STEPS), "--dataloader_num_workers", workers)  # no --save_steps: no other checkpoint
    full = tmp_path_factory.getbasetemp() / "uninterrupted_40"
    if not full.exists():
        train.main(tiny_data.argv(full, "--max_steps", str(STEPS)))

    out = tmp_path / "preempted"
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), *tiny_data.argv(out, *flags)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_first_step(process, out)
        if to_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    name = signal.Signals(signum).name
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    found = re.search(rf"received {name}: stopped after step (\d+) of {STEPS} with checkpoint (\S+); run the same "
                      rf"command with --resume_from_checkpoint latest to continue \(exit status 75\)", stderr)
    assert found, stderr[-3000:]
    step = int(found.group(1))
    assert 1 <= step < STEPS
    assert [p.name for p in checkpoints._checkpoints(str(out))] == [f"step_{step:06d}"]
    assert found.group(2) == str(checkpoints.checkpoint_dir(str(out)) / f"step_{step:06d}")
    assert not (out / "model.safetensors").exists() and not (out / ".train.lock").exists()
    assert [row["step"] for row in read_metrics(out)][-1] == step

    train.main(tiny_data.argv(out, *flags, "--resume_from_checkpoint", "latest"))
    _assert_same(_weights(full), _weights(out))
    assert [r["loss/total"] for r in read_metrics(out)] == [r["loss/total"] for r in read_metrics(full)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv: list[str], **kwargs) -> subprocess.Popen:
    env = dict(ENV, ACCELERATE_USE_CPU="true")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(REPO_ROOT / "train.py"), *argv]
    return subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True, **kwargs)


def _worker_of_rank(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the training process of `rank` among the launcher's descendants."""
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "train.py" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no process of rank {rank}")


@pytest.mark.slow  # three launches of two processes: 60-150 s on shared CPUs
def test_two_processes_stop_at_the_same_step_when_one_is_signalled_and_resume_bit_identically(tiny_data, tmp_path):
    flags = ("--max_steps", str(STEPS), "--per_device_train_batch_size", "4")
    full = _launch(tiny_data.argv(tmp_path / "full", *flags))
    _, stderr = full.communicate(timeout=400)
    assert full.returncode == 0, stderr[-3000:]

    out = tmp_path / "preempted"
    process = _launch(tiny_data.argv(out, *flags))
    try:
        _wait_for_first_step(process, out)
        os.kill(_worker_of_rank(process, 1), signal.SIGUSR1)  # rank 1 only: rank 0 learns it from the agreement
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    stops = dict(re.findall(r"process (\d): received (?:SIGUSR1|a stop signal on another process): stopped after "
                            r"step (\d+)", stderr))
    assert stops.keys() == {"0", "1"} and len(set(stops.values())) == 1, stderr[-3000:]
    assert "process 1: received SIGUSR1" in stderr and "process 0: received a stop signal on another process" in stderr
    assert re.search(r"exitcode\s*:\s*75", stderr), stderr[-3000:]  # torch's launcher reports each worker's status
    step = int(stops["0"])
    assert 1 <= step < STEPS
    assert [p.name for p in checkpoints._checkpoints(str(out))] == [f"step_{step:06d}"]

    resumed = _launch(tiny_data.argv(out, *flags, "--resume_from_checkpoint", "latest"))
    _, stderr = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, stderr[-3000:]
    _assert_same(_weights(tmp_path / "full"), _weights(out))
