"""Send SIGTERM / SIGUSR1 to a running train.py, measure how long it takes to stop, resume it, and compare with an
uninterrupted run.

    PYTHONPATH=. python benchmarks/bench_preemption.py [--max_steps 40]

Each row: the signal, the step logged when it was sent, the step the run stopped after, seconds from the signal
to the exit (the rest of the step + the checkpoint + shutdown), the exit status, and whether the resumed run's
final weights are bit-identical to the uninterrupted run's. Tiny model on CPU: the times say what the machinery
costs, not what a real step costs (a real run needs its step time + its checkpoint time within the grace period).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import TinyData  # noqa: E402  (the test suite's tiny data and tokenizer)

from alip_hf import train  # noqa: E402


def _logged_steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", type=int, default=40)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="preemption-"))
    data = TinyData(root / "data")
    flags = ("--max_steps", str(args.max_steps))
    train.main(data.argv(root / "full", *flags))
    full = load_file(str(root / "full" / "model.safetensors"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    rows = []
    for name, after_step in (("SIGTERM", 1), ("SIGUSR1", 1), ("SIGTERM", args.max_steps // 2)):
        out = root / f"{name}_{after_step}"
        process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *data.argv(out, *flags)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while _logged_steps(out) < after_step and process.poll() is None:
            time.sleep(0.005)
        sent_at, step_at = time.perf_counter(), _logged_steps(out)
        process.send_signal(getattr(signal, name))
        status = process.wait()
        seconds = time.perf_counter() - sent_at
        stopped = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
        train.main(data.argv(out, *flags, "--resume_from_checkpoint", "latest"))
        resumed = load_file(str(out / "model.safetensors"))
        same = resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)
        rows.append((name, step_at, stopped, seconds, status, "yes" if same else "NO"))

    print(f"tiny model, {args.max_steps} steps, one process, CPU\n")
    print("| signal | logged step when sent | stopped after step | signal to exit (s) | exit status | resumed "
          "weights bit-identical |")
    print("|---|---|---|---|---|---|")
    for name, step_at, stopped, seconds, status, same in rows:
        print(f"| {name} | {step_at} | {stopped} | {seconds:.2f} | {status} | {same} |")


if __name__ == "__main__":
    main()
