"""The whole trainer against open_clip_train (the trainer in the open_clip_torch wheel), side by side in one run.

Same WebDataset shards (synthetic, img2dataset's layout, written by scripts/make_synthetic_webdataset.py with a
`caption` text per sample), same architecture (the `small` config: width 128, 4 layers, 4 heads, image 32,
patch 4, quick GELU; open_clip gets the equivalent model config), same batch, same DataLoader workers, fp32 on
CPU, AdamW with gradient clipping at 1. Each trainer runs as its own `python` process, end to end through its
command line:

* `train.py --recipe clip`  (streaming the shards; text padded to the longest of the batch),
* `train.py --recipe alip`  (the same shards, the `caption` text as ALIP's second path),
* `python -m open_clip_train.main --dataset-type webdataset` (texts padded to 77, its default), run by
  `--open_clip_python`: open_clip_torch[training] pins webdataset<=0.2.86, whose tar reader open_clip_train's
  data code needs (with webdataset 1.0 it fails on the sample keys).

Throughput is the steady state: samples per second between step `--skip` and the last step, from each trainer's
own per-step log (train.py's metrics.jsonl, open_clip_train's `Batch (t)` lines), so start-up and the first
steps (imports, worker start, shuffle-buffer fill) are not counted. The trainers are interleaved within each
repeat; the table gives medians over repeats and ratios of time per sample against open_clip_train.

    python -m venv --system-site-packages /tmp/oc_venv && /tmp/oc_venv/bin/pip install webdataset==0.2.86
    OMP_NUM_THREADS=1 python benchmarks/bench_trainer_vs_open_clip.py --steps 40 --skip 10 --repeats 3 \
        --open_clip_python /tmp/oc_venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# open_clip's equivalent of alip_hf.model_sizes.MODEL_CONFIGS["small"] (head_width 32 gives 4 heads at width 128;
# quick_gelu: transformers' CLIP default activation).
OPEN_CLIP_SMALL = {
    "embed_dim": 128,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "head_width": 32, "mlp_ratio": 4, "patch_size": 4},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}

# Runs open_clip_train's main with the config above registered (it has no flag for a model config file).
_OPEN_CLIP_LAUNCHER = """
import sys, open_clip
open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
"""


def write_data(root: Path, num_samples: int, per_shard: int) -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_synthetic_webdataset import write_shards

    paths = write_shards(root / "shards", num_samples=num_samples, samples_per_shard=per_shard, image_size=64,
                         extra_text_keys=("caption",))
    return str(root / "shards" / f"{{{paths[0].stem}..{paths[-1].stem}}}.tar")


def ours(recipe: str, shards: str, out: Path, args) -> list[str]:
    flags = ["--recipe", recipe, "--train_data", shards, "--streaming", "true", "--image_column", "jpg",
             "--text_column", "txt", "--model_config", "small", "--per_device_train_batch_size", str(args.batch),
             "--max_steps", str(args.steps), "--logging_steps", "1", "--dataloader_num_workers", str(args.workers),
             "--learning_rate", "5e-4", "--warmup_steps", "2", "--eval_data", "none", "--report_to", "none",
             "--output_dir", str(out), "--shuffle_buffer", "256"]
    if recipe == "alip":
        flags += ["--caption_column", "caption.txt"]
    return [sys.executable, str(ROOT / "train.py"), *flags]


def open_clip_cmd(shards: str, out: Path, config_dir: Path, num_samples: int, args) -> list[str]:
    flags = ["--model", "bench-small", "--train-data", shards, "--dataset-type", "webdataset",
             "--train-num-samples", str(num_samples), "--batch-size", str(args.batch), "--workers", str(args.workers),
             "--precision", "fp32", "--device", "cpu", "--epochs", "1", "--lr", "5e-4", "--warmup", "2",
             "--wd", "0.2", "--beta2", "0.98", "--eps", "1e-6", "--grad-clip-norm", "1.0", "--log-every-n-steps", "1",
             "--save-frequency", "0", "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "",
             "--logs", str(out), "--name", "run", "--seed", "0"]
    return [args.open_clip_python, "-c", _OPEN_CLIP_LAUNCHER, str(config_dir), *flags]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), NO_ALBUMENTATIONS_UPDATE="1")


def steady_rate_ours(out: Path, batch: int, skip: int) -> float:
    """Samples/s between step `skip` and the last step, from the cumulative rate logged at every step."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["step"] * batch / r["train/samples_per_second"] for r in rows}
    last = max(elapsed)
    return (last - skip) * batch / (elapsed[last] - elapsed[skip])


def steady_rate_open_clip(out: Path, batch: int, skip: int) -> float:
    """Samples/s over steps `skip + 1 ..` from open_clip_train's per-step `Batch (t)` (data + step time)."""
    times = [float(t) for t in re.findall(r"Batch \(t\): ([0-9.]+)", (out / "run" / "out.log").read_text())]
    # open_clip logs step 0 first; each later line is the mean over the steps since the previous line (one here)
    steady = times[skip + 1 :]
    return len(steady) * batch / sum(steady)


def run_one(name: str, cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as f:
        completed = subprocess.run(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT))
    if completed.returncode != 0:
        raise RuntimeError(f"{name} failed ({completed.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=10, help="First steps left out of the steady-state rate.")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--trainers", nargs="+", default=["open_clip", "clip", "alip"])
    parser.add_argument("--open_clip_python", default=sys.executable,
                        help="Python that runs open_clip_train: open_clip_torch[training] pins webdataset<=0.2.86, "
                             "so this may be a venv (--system-site-packages) holding that version.")
    args = parser.parse_args(argv)
    if args.skip >= args.steps - 1:
        parser.error("--skip must leave at least two steps")

    root = Path(tempfile.mkdtemp(prefix="bench-trainers-"))
    # Enough samples that no trainer reaches the end of an epoch within --steps (open_clip stops at its end).
    num_samples = args.batch * (args.steps + 2) * 2
    per_shard = -(-num_samples // args.shards)
    shards = write_data(root, num_samples, per_shard)
    config_dir = root / "open_clip_configs"
    config_dir.mkdir()
    (config_dir / "bench-small.json").write_text(json.dumps(OPEN_CLIP_SMALL))

    rates: dict[str, list[float]] = {t: [] for t in args.trainers}
    walls: dict[str, list[float]] = {t: [] for t in args.trainers}
    for repeat in range(args.repeats):
        for trainer in args.trainers:
            out = root / f"{trainer}-{repeat}"
            if trainer == "open_clip":
                cmd = open_clip_cmd(shards, out, config_dir, num_samples, args)
            else:
                cmd = ours(trainer, shards, out, args)
            walls[trainer].append(run_one(trainer, cmd, root / f"{trainer}-{repeat}.log"))
            rate = (steady_rate_open_clip(out, args.batch, args.skip) if trainer == "open_clip"
                    else steady_rate_ours(out, args.batch, args.skip))
            rates[trainer].append(rate)
            print(f"repeat {repeat} {trainer}: {rate:.1f} samples/s (process wall {walls[trainer][-1]:.1f} s)",
                  flush=True)
    reference = statistics.median(rates["open_clip"]) if "open_clip" in rates else None
    names = {"open_clip": "open_clip_train (CLIP, text 77)", "clip": "train.py --recipe clip",
             "alip": "train.py --recipe alip (2 text paths)"}
    print(f"\nsmall model, batch {args.batch}, {args.workers} workers, steps {args.skip + 1}-{args.steps}, "
          f"{args.repeats} repeats (medians), {num_samples} samples in {args.shards} shards; data in {root}")
    print("| trainer | samples/s | time per sample vs open_clip_train | process wall s |")
    print("|---|---:|---:|---:|")
    table = []
    for trainer in args.trainers:
        rate = statistics.median(rates[trainer])
        ratio = reference / rate if reference else float("nan")
        table.append({"trainer": trainer, "samples_per_second": rate, "time_ratio": ratio,
                      "wall": statistics.median(walls[trainer])})
        print(f"| {names[trainer]} | {rate:.1f} | {ratio:.2f}x | {statistics.median(walls[trainer]):.1f} |")
    return table


if __name__ == "__main__":
    main()
