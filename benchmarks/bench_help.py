"""How long each command takes to answer `--help` (a fresh interpreter each time): median wall and CPU seconds.

    OMP_NUM_THREADS=1 python benchmarks/bench_help.py --repeats 5

The library's commands bind torch and datasets lazily (`alip_hf.lazy`), so their `--help` pays only for argument
parsing. The converters' flags live in `alip_hf.convert.cli`, which imports neither torch nor `modeling_alip`
(whose import registers ALIP with transformers and so loads torch); a converter is imported after its flags parse.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ["alip_hf.train", "alip_hf.eval", "alip_hf.web", "recaption.caption", "recaption.rewrite",
            "recaption.publish", "recaption.audit", "alip_hf.convert to_clip", "alip_hf.convert from_open_clip",
            "alip_hf.convert to_open_clip", "alip_hf.convert from_veclip"]


def measure(module: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one `python -m module --help`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", *module.split(), "--help"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = {module: [] for module in COMMANDS}
    for _ in range(args.repeats):  # interleaved, so that load on the machine hits every command alike
        for module in COMMANDS:
            rows[module].append(measure(module))
    print(f"| command (`python -m ... --help`) | median wall s | median CPU s |  (n = {args.repeats})")
    print("|---|---:|---:|")
    for module, samples in rows.items():
        wall = statistics.median(s[0] for s in samples)
        cpu = statistics.median(s[1] for s in samples)
        print(f"| {module} | {wall:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
