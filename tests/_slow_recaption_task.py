"""`python -m recaption.caption` with every shard slowed by `SLOW_SHARD_SECONDS`, so that a test can kill a task, a
driver or a Ray replica (a real signal) while it has shards left. Nothing else is changed.

`slow_caption_step` is also a step factory for the Ray engine: Ray replicas import it from here by name.
"""

import functools
import os
import sys
import time

import recaption.caption as caption_module

_build_caption_step = caption_module.build_caption_step


def slow_caption_step(delay: float, *args, **kwargs):
    """`build_caption_step(...)` whose step sleeps `delay` seconds before each shard."""
    step = _build_caption_step(*args, **kwargs)
    process = step.process

    def slow_process(shard, ids, progress):
        time.sleep(delay)
        return process(shard, ids, progress)

    step.process = slow_process
    return step


if __name__ == "__main__":
    caption_module.build_caption_step = functools.partial(slow_caption_step,
                                                          float(os.environ.get("SLOW_SHARD_SECONDS", "0")))
    caption_module.main(sys.argv[1:])
