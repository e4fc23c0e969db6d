"""Kill train.py with SIGKILL at spread-out moments, resume it, and compare with an uninterrupted run.

    PYTHONPATH=. python benchmarks/bench_kill_resume.py [--kills 10] [--max_steps 12]

Each kill lands at a named moment (mid-step, mid-save, after a rename, during pruning, during the final save),
found by watching the output directory; the run is then resumed with `--resume_from_checkpoint latest` (in
this process) and its final weights (gate running means included) compared bit for bit with the uninterrupted
run's. Prints one row per kill and the totals.
"""

from __future__ import annotations

import argparse
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
from alip_hf.training import checkpoints  # noqa: E402


def _state_at_kill(out: Path) -> str:
    done = [p.name for p in checkpoints._checkpoints(str(out))]
    tmp = [p.name for p in (out / "checkpoints").glob(".tmp-*")] if (out / "checkpoints").exists() else []
    parts = [f"last checkpoint {done[-1] if done else '-'}"]
    if tmp:
        parts.append(f"partial {tmp[0]}")
    if (out / "model.safetensors").exists():
        parts.append("final model written")
    return ", ".join(parts)


def _moments(max_steps: int) -> list[tuple[str, callable]]:
    """Named moments of a run and a test on its output directory that says the moment has come."""
    ckpt = lambda out, step, tmp="": out / "checkpoints" / f"{tmp}step_{step:06d}"  # noqa: E731
    middle = max_steps // 2
    return [
        ("the first metrics line is written (after step 1)",
         lambda out: (out / "metrics.jsonl").exists()),
        ("the first checkpoint is being saved", lambda out: ckpt(out, 1, ".tmp-").exists()),
        ("right after the first checkpoint's rename", lambda out: ckpt(out, 1).exists()),
        (f"checkpoint {middle} is being saved", lambda out: ckpt(out, middle, ".tmp-").exists()),
        (f"right after checkpoint {middle}'s rename", lambda out: ckpt(out, middle).exists()),
        (f"right after checkpoint {middle + 1}'s rename (the oldest being pruned)",
         lambda out: (ckpt(out, middle + 1) / checkpoints.STATE_FILE).exists()),
        ("the last checkpoint is being saved", lambda out: ckpt(out, max_steps, ".tmp-").exists()),
        ("the final model is being saved", lambda out: any(out.glob(".tmp-final-*"))),
        ("the final model is written (export and card pending)", lambda out: (out / "model.safetensors").exists()),
        ("the model card is written", lambda out: (out / "README.md").exists()),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10, help="how many of the named moments (at most 10)")
    parser.add_argument("--max_steps", type=int, default=12)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = Path(tempfile.mkdtemp(prefix="kill_resume-"))
    data = TinyData(root / "data")
    flags = ("--max_steps", str(args.max_steps), "--save_steps", "1", "--save_total_limit", "2")
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), *data.argv(root / "full", *flags)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    full_seconds = time.perf_counter() - start
    full = load_file(str(root / "full" / "model.safetensors"))

    rows, identical = [], 0
    for i, (moment, reached) in enumerate(_moments(args.max_steps)[: args.kills]):
        out = root / f"killed_{i}"
        process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *data.argv(out, *flags)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while not reached(out) and process.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        process.wait()
        state = _state_at_kill(out) if process.returncode == -signal.SIGKILL else "finished before the kill"
        # Killed before its first checkpoint: nothing to resume (`latest` would stop), the run starts over.
        restart = (("--resume_from_checkpoint", "latest") if checkpoints.resolve_checkpoint("latest", str(out))
                   else ("--overwrite_output_dir", "true"))
        train.main(data.argv(out, *flags, *restart))
        resumed = load_file(str(out / "model.safetensors"))
        same = resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)
        identical += same
        rows.append((moment, state, "yes" if same else "NO"))

    print(f"uninterrupted run: {full_seconds:.1f} s ({args.max_steps} steps, a checkpoint per step)\n")
    print("| killed when | state at the kill | resumed weights bit-identical |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n{identical} of {len(rows)} killed runs resumed to bit-identical weights")


if __name__ == "__main__":
    main()
