"""`python -m recaption.caption` with every shard slowed by `SLOW_SHARD_SECONDS`, so that a test can kill the
process (a real signal) while it is between shards or inside one. Nothing else is changed."""

import os
import sys
import time

import recaption.run as run

DELAY = float(os.environ.get("SLOW_SHARD_SECONDS", "0"))
_write = run.ShardWriter.write


def _slow_write(self, *args, **kwargs):
    time.sleep(DELAY)
    return _write(self, *args, **kwargs)


run.ShardWriter.write = _slow_write

if __name__ == "__main__":
    from recaption.caption import main

    main(sys.argv[1:])
