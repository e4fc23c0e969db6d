"""`python -m recaption.caption` with a simulated straggler: one replica's shards take three times as long (after
each shard it sleeps twice the time the shard took). Used by `bench_recaption_scaling.py` only.

Which replica is the straggler: under `--engine ray`, the first replica to create the file named by
`STRAGGLER_CLAIM` (atomically, O_EXCL); under scheduler tasks, the task whose environment has `STRAGGLER=1`.
"""

import functools
import os
import sys
import time

import recaption.caption as caption_module

_build_caption_step = caption_module.build_caption_step
SLOWDOWN = 3.0


def _is_straggler() -> bool:
    if os.environ.get("STRAGGLER") == "1":
        return True
    claim = os.environ.get("STRAGGLER_CLAIM")
    if not claim:
        return False
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def straggler_caption_step(*args, **kwargs):
    """`build_caption_step(...)`, slowed threefold when this replica is the straggler."""
    step = _build_caption_step(*args, **kwargs)
    if not _is_straggler():
        return step
    process = step.process

    def slow_process(shard, ids, progress):
        start = time.perf_counter()
        result = process(shard, ids, progress)
        time.sleep((SLOWDOWN - 1) * (time.perf_counter() - start))  # the simulated straggler's extra time
        return result

    step.process = slow_process
    return step


if __name__ == "__main__":
    caption_module.build_caption_step = functools.partial(straggler_caption_step)
    caption_module.main(sys.argv[1:])
