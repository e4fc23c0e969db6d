"""Scheduler tasks: independent processes (no process group) that split a recaption run's shards by
`--num_tasks` / `--task_index` or a Slurm job array's variables, and resume each other's unfinished work."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from alip_hf.schema import ID
from recaption.arguments import GenerationArguments, RunArguments
from recaption.caption import CaptionArguments, caption
from _tiny_captioners import save_tiny_captioner
from recaption.workers import resolve_worker, scheduler_task
from tests.test_faults_input import write_source

ROOT = Path(__file__).resolve().parents[1]
ROWS, SHARD, TASKS = 9, 1, 3  # 9 shards, 3 per task


class FakeAccelerator:
    def __init__(self, world: int):
        self.process_index, self.num_processes, self.is_main_process = 0, world, True

    def wait_for_everyone(self):
        pass


def slurm(task_id: int, count: int, first: int = 0, **extra) -> dict[str, str]:
    return {"SLURM_ARRAY_TASK_ID": str(task_id), "SLURM_ARRAY_TASK_COUNT": str(count),
            "SLURM_ARRAY_TASK_MIN": str(first), **{k: str(v) for k, v in extra.items()}}


def test_task_comes_from_the_flags_else_from_a_slurm_array_else_is_the_only_one():
    assert scheduler_task(None, None, {}) == (0, 1)
    assert scheduler_task(4, 2, {}) == (2, 4)
    assert scheduler_task(None, None, slurm(5, 4, first=3)) == (2, 4)  # --array=3-6: ids 3..6 are tasks 0..3
    assert scheduler_task(4, 2, slurm(5, 4, first=3)) == (2, 4)  # flags that agree are fine


@pytest.mark.parametrize("flags, environ, message", [
    ((3, None), {}, "go together"),
    ((3, 3), {}, r"--task_index must be in \[0, --num_tasks\)"),
    ((0, 0), {}, "--num_tasks >= 1"),
    ((4, 1), slurm(2, 4), "disagree with this Slurm array task"),
    ((None, None), slurm(2, 8, SLURM_ARRAY_TASK_STEP=2), "consecutive ids"),
    ((None, None), slurm(9, 4), "not within 4 tasks"),
])
def test_inconsistent_task_settings_are_errors_naming_them(flags, environ, message):
    with pytest.raises(ValueError, match=message):
        scheduler_task(*flags, environ)


def test_tasks_inside_an_accelerate_world_and_overwrite_with_tasks_are_refused(tmp_path):
    with pytest.raises(ValueError, match="either scheduler tasks .* or `accelerate launch`"):
        resolve_worker(3, 0, FakeAccelerator(world=2))
    assert resolve_worker(3, 1, FakeAccelerator(world=1)).owns(4)
    with pytest.raises(ValueError, match="--overwrite_output_dir with 3 scheduler tasks"):
        RunArguments(source=str(tmp_path / "in.parquet"), output_dir=str(tmp_path / "out"), num_tasks=3,
                     task_index=0, overwrite_output_dir=True)


def _task(captioner: str, source: str, out: Path, env: dict, *flags: str, delay: float = 0.0) -> subprocess.Popen:
    """One task as its own process (`python -m recaption.caption`, each shard slowed by `delay` seconds)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_slow_recaption_task.py"), "--source", source, "--output_dir", str(out),
         "--model", captioner, "--shard_size", str(SHARD), "--batch_size", "4", "--max_new_tokens", "6",
         "--dtype", "float32", *flags],
        env={**clean, "PYTHONPATH": str(ROOT), "SLOW_SHARD_SECONDS": str(delay), **env}, cwd=str(ROOT),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(out: Path) -> list[dict]:
    rows = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in (out / "data").glob("*.parquet")),
                                 split="train").remove_columns(["image"]).to_list()
    return sorted(rows, key=lambda r: r[ID])


@pytest.mark.slow
def test_three_tasks_one_killed_and_relaunched_equal_one_process(tmp_path):
    captioner = save_tiny_captioner(str(tmp_path / "blip"))
    source = write_source(tmp_path / "input.parquet", n=ROWS)
    single = tmp_path / "single"
    caption(RunArguments(source=source, output_dir=str(single), shard_size=SHARD), CaptionArguments(model=captioner),
            GenerationArguments(batch_size=4, max_new_tokens=6, dtype="float32"))

    out = tmp_path / "tasks"
    tasks = [_task(captioner, source, out, slurm(0, TASKS)),
             # by flags, and slowed so that it is surely killed with shards left to do
             _task(captioner, source, out, {}, "--num_tasks", str(TASKS), "--task_index", "1", delay=3.0),
             _task(captioner, source, out, slurm(2, TASKS))]
    first_marker = out / "shards" / "train-00001.json"
    deadline = time.time() + 240
    while not first_marker.exists() and tasks[1].poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert first_marker.exists(), tasks[1].communicate()[0][-3000:]
    tasks[1].send_signal(signal.SIGKILL)
    assert tasks[1].wait() == -signal.SIGKILL
    for task in (tasks[0], tasks[2]):
        log = task.communicate(timeout=300)[0]
        assert task.returncode == 0, log[-3000:]
        assert '"complete": false' in log  # task 1's shards were unfinished when they ended
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.json")}
    assert "train-00007.json" not in before  # task 1's last shard was never reached
    assert not (out / "summary.json").exists()

    relaunch = _task(captioner, source, out, slurm(1, TASKS))  # the array's task 1, relaunched
    log = relaunch.communicate(timeout=300)[0]
    assert relaunch.returncode == 0, log[-3000:]
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.json")}
    assert {n: after[n] for n in before} == before  # finished shards were not redone
    assert sorted(after) == [f"train-{i:05d}.json" for i in range(ROWS)]
    assert '"complete": true' in log and (out / "summary.json").exists()
    assert _rows(out) == _rows(single)  # ids, captions, provenance, errors: row for row



@pytest.mark.slow
def test_sigterm_finishes_and_marks_the_current_shard_then_exits_75_and_a_rerun_completes(tmp_path):
    captioner = save_tiny_captioner(str(tmp_path / "blip"))
    source = write_source(tmp_path / "input.parquet", n=ROWS)
    out = tmp_path / "out"
    run = _task(captioner, source, out, {}, delay=1.5)
    while not list((out / "shards").glob("*.json")) and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)  # lands while the next shard is being made (each takes >= 1.5 s)
    log = run.communicate(timeout=300)[0]
    assert run.returncode == 75, log[-3000:]
    assert "SIGTERM received: stopped after finishing and marking shard" in log
    markers = sorted(p.stem for p in (out / "shards").glob("*.json"))
    data = sorted(p.stem for p in (out / "data").glob("*.parquet"))
    assert 2 <= len(markers) < ROWS and markers == data  # the shard in progress was finished, none half-marked
    assert not list(out.glob("*/.*.tmp"))
    summary = caption(RunArguments(source=source, output_dir=str(out), shard_size=SHARD),
                      CaptionArguments(model=captioner), GenerationArguments(batch_size=4, max_new_tokens=6,
                                                                              dtype="float32"))
    assert summary["complete"] and summary["rows"] == ROWS
