"""ALIP's training step with several caption sources per sample against one: time per step, and the cost of the
text draw alone.

Rows run train.py's own building blocks in a fresh interpreter each (`bench_train.measure`): the ALIP recipe, the
tiny model, the bundled demo data map-style, 0 DataLoader workers (so the text draw is inside the measured data
wait, not hidden in a worker). "one source": `--caption_column caption` (the default, no draw); "three sources":
`--caption_column 'caption;vecap;alt_text' --caption_column_probs '0.5;0.3;0.2'`; "three sources + sub-captions":
the same with one random sentence of the VeCap text. Time per step = median(data wait + step); rows interleaved,
median over repeats. The second table times `TextSelector.select` alone per sample.

    OMP_NUM_THREADS=1 python benchmarks/bench_caption_sources.py --steps 20 --warmup 3 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from bench_train import _run_isolated  # noqa: E402

SOURCES = {
    "one source": [],
    "three sources": ["--caption_column", "caption;vecap;alt_text", "--caption_column_probs", "0.5;0.3;0.2"],
    "three sources + sub-captions": ["--caption_column", "caption;vecap;alt_text", "--caption_column_probs",
                                     "0.5;0.3;0.2", "--caption_column_subcaption", "none;sentence;none"],
}


def flags(batch: int, extra: list[str]) -> list[str]:
    return ["--recipe", "alip", "--model_config", "tiny", "--per_device_train_batch_size", str(batch),
            "--report_to", "none", "--eval_data", "none", "--output_dir", tempfile.mkdtemp(prefix="bench_sources_"),
            "--train_data", "demo", "--dataloader_num_workers", "0", *extra]


def select_cost(extra: list[str], samples: int = 20_000) -> float:
    """Microseconds per sample of the recipe's text draw on demo rows."""
    from alip_hf import data, recipes, sources
    from alip_hf.training.arguments import parse_args

    rows = sources.load_source("demo").select_columns(["alt_text", "caption", "vecap"]).select(range(1000)).to_list()
    select = recipes.get_recipe(parse_args(flags(32, extra))[3]).text_selector().select
    start = time.perf_counter()
    for i in range(samples):
        select(rows[i % len(rows)], data.sample_rng(0, 0, i))
    rngs = time.perf_counter()
    for i in range(samples):
        data.sample_rng(0, 0, i)
    end = time.perf_counter()
    return ((rngs - start) - (end - rngs)) / samples * 1e6  # the generator itself is made for the crop anyway


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured first steps per row")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every row")
    parser.add_argument("--batch", type=int, default=32, help="per-process batch size")
    args = parser.parse_args(argv)
    table = {name: [] for name in SOURCES}
    for _ in range(args.repeats):
        for name, extra in SOURCES.items():
            table[name].append(_run_isolated(flags(args.batch, extra), args.steps, args.warmup))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; ALIP, tiny model, demo data, batch {args.batch}, "
          f"{args.steps} steps after {args.warmup} warm-up, median of {args.repeats} repeats\n")
    print("| caption sources | ms per step (data wait + step) | vs one source | data wait ms |")
    print("|---|---:|---:|---:|")
    reference = None
    for name, results in table.items():
        per_step = statistics.median(args.batch / r["samples_per_s"] * 1e3 for r in results)
        wait = statistics.median(r["median_wait_ms"] for r in results)
        reference = reference or per_step
        print(f"| {name} | {per_step:.1f} | {per_step / reference:.3f}x | {wait:.1f} |")
    print("\n| caption sources | text draw, us per sample |\n|---|---:|")
    for name, extra in SOURCES.items():
        print(f"| {name} | {select_cost(extra):.1f} |")


if __name__ == "__main__":
    main()
