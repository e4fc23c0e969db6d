"""Who does which share of a run: an Accelerate process of a process group, or an independent scheduler task.

Accelerate processes (`accelerate launch`) share one torch.distributed world: they start together, wait for each
other, and the main one writes the summary. Scheduler tasks (`--num_tasks N --task_index i`, or a Slurm job
array's `SLURM_ARRAY_TASK_ID` / `SLURM_ARRAY_TASK_COUNT`) share nothing but the output directory: each takes the
shards `j` with `j % N == i`, never waits for another, and the one that finds every shard done writes the
summary. Either way the unit of work and of resume is the shard and its completion marker, so a relaunch (of the
launch, or of the array) redoes only the shards without a marker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

SLURM_TASK_ID, SLURM_TASK_COUNT = "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"
SLURM_TASK_MIN, SLURM_TASK_STEP = "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"


def scheduler_task(num_tasks: int | None, task_index: int | None,
                   environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """`(task_index, num_tasks)` from the flags, else from a Slurm job array's variables, else `(0, 1)`.

    A Slurm array `--array=a-b` numbers its tasks `a..b`; the task index is `SLURM_ARRAY_TASK_ID - a`.

    Raises:
        ValueError: one flag without the other, an index outside `[0, num_tasks)`, flags that disagree with the
            Slurm variables, or an array with a step (`--array=0-15:2`: its ids do not cover `0..N-1`).
    """
    if (num_tasks is None) != (task_index is None):
        raise ValueError("--num_tasks and --task_index go together (or neither: then SLURM_ARRAY_TASK_ID and "
                         f"SLURM_ARRAY_TASK_COUNT are read), got --num_tasks {num_tasks} --task_index {task_index}")
    if SLURM_TASK_ID in environ:
        slurm = _slurm_array_task(environ)
        if num_tasks is not None and (task_index, num_tasks) != slurm:
            raise ValueError(
                f"--task_index {task_index} --num_tasks {num_tasks} disagree with this Slurm array task "
                f"({SLURM_TASK_ID}={environ[SLURM_TASK_ID]}, {SLURM_TASK_COUNT}={environ.get(SLURM_TASK_COUNT)}: "
                f"task {slurm[0]} of {slurm[1]}); drop the flags or run outside the array")
        return slurm
    if num_tasks is None:
        return 0, 1
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"--task_index must be in [0, --num_tasks) with --num_tasks >= 1, got --task_index "
                         f"{task_index} --num_tasks {num_tasks}")
    return task_index, num_tasks


def _slurm_array_task(environ: Mapping[str, str]) -> tuple[int, int]:
    try:
        task_id = int(environ[SLURM_TASK_ID])
        count = int(environ[SLURM_TASK_COUNT])
        first = int(environ.get(SLURM_TASK_MIN, 0))
        step = int(environ.get(SLURM_TASK_STEP, 1))
    except (KeyError, ValueError) as e:
        raise ValueError(f"this Slurm array task's {SLURM_TASK_ID} / {SLURM_TASK_COUNT} / {SLURM_TASK_MIN} are "
                         f"not all integers: {e}") from e
    if step != 1:
        raise ValueError(f"{SLURM_TASK_STEP}={step}: submit the array with consecutive ids (--array=0-N, "
                         "optionally %K to limit how many run at once), so that its tasks cover every share")
    index = task_id - first
    if not 0 <= index < count:
        raise ValueError(f"{SLURM_TASK_ID}={task_id} is not within {count} tasks from {SLURM_TASK_MIN}={first}")
    return index, count


@dataclass
class Worker:
    """One worker of a run: it owns the shards `j` with `j % count == index`.

    Attributes:
        index, count: this worker's place in the split (Accelerate's `process_index` / `num_processes`, or the
            scheduler task's index and count).
        is_main: creates the layout and writes `run_config.json` (every scheduler task does: none waits for
            another) and the summary.
        in_group: an Accelerate process group, whose members wait for each other (`wait`).
        wait: a barrier across the group; does nothing for a scheduler task.
    """

    index: int
    count: int
    is_main: bool
    in_group: bool
    wait: Callable[[], None]

    @property
    def label(self) -> str:
        return f"process {self.index}/{self.count}" if self.in_group else f"task {self.index}/{self.count}"

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index


def _nothing() -> None:
    pass


def resolve_worker(num_tasks: int, task_index: int, accelerator) -> Worker:
    """This worker: a scheduler task when `num_tasks > 1`, else an Accelerate process of `accelerator`'s group.

    Raises:
        ValueError: scheduler tasks inside an Accelerate world of several processes (two work splits at once).
    """
    if num_tasks > 1:
        if accelerator.num_processes > 1:
            raise ValueError(
                f"task {task_index} of {num_tasks} was started in an Accelerate world of {accelerator.num_processes} "
                "processes: use either scheduler tasks (one process each, no process group) or `accelerate "
                "launch`, not both")
        return Worker(task_index, num_tasks, is_main=True, in_group=False, wait=_nothing)
    return Worker(accelerator.process_index, accelerator.num_processes, is_main=accelerator.is_main_process,
                  in_group=True, wait=accelerator.wait_for_everyone)
