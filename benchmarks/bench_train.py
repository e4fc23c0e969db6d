"""End-to-end training throughput of train.py's pipeline: samples/s with data loading, the share of step time
spent waiting for data, and peak memory with and without gradient checkpointing.

Each row runs in a fresh interpreter (so that its peak resident memory is its own) and executes train.py's own
building blocks (`build_model`, `build_train_data`, `build_optimizer`, `forward_backward`), timing per step:

* data wait: time blocked in `next(loader)`; step: forward + backward + AdamW step;
* samples/s = global batch / median(data wait + step) over the measured steps (after warm-up steps);
* peak memory: growth of the process's maximum resident set size during the steps (CPU; the imports and the
  model weights are excluded) or `torch.cuda.max_memory_allocated` (GPU).

Sources: the bundled demo data (parquet, map-style) and synthetic WebDataset shards written by
scripts/make_synthetic_webdataset.py (streaming). Rows are repeated `--repeats` times, interleaved, and the
table gives medians over repeats.

    OMP_NUM_THREADS=1 python benchmarks/bench_train.py --steps 20 --warmup 3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(argv: list[str], steps: int, warmup: int) -> dict:
    """Runs `warmup + steps` optimizer steps of the run `argv` describes; returns medians and peak memory."""
    sys.path.insert(0, str(ROOT))
    import torch
    from accelerate import Accelerator

    from alip_hf import recipes
    from alip_hf.models import build_model, build_processor, core_model
    from alip_hf.training.arguments import parse_args
    from alip_hf.training.data import build_train_data
    from alip_hf.training.loop import forward_backward
    from alip_hf.training.optim import build_optimizer

    model_args, data_args, train_args, recipe_args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=train_args.mixed_precision)
    recipe = recipes.get_recipe(recipe_args)
    model = build_model(model_args, seed=train_args.seed)
    processor = build_processor(model_args, core_model(model, accelerator))
    total = warmup + steps
    train_args.max_steps = total
    loaded = build_train_data(data_args, train_args, recipe, processor, accelerator, 0)
    optimizer, _ = build_optimizer(model, train_args, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = core_model(model, accelerator)
    batches, waits, computes = iter(loaded.loader), [], []
    k = train_args.gradient_accumulation_steps
    model.train()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for step in range(total):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(k)]
        t1 = time.perf_counter()
        forward_backward(model, core, recipe, micro, accelerator, train_args.local_loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if step >= warmup:
            waits.append(t1 - t0)
            computes.append(t2 - t1)
    wait, compute = statistics.median(waits), statistics.median(computes)
    totals = [w + c for w, c in zip(waits, computes)]
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:  # growth of the peak resident set during the steps: activations, gradients, optimizer state
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before  # Linux: KiB
    batch = train_args.per_device_train_batch_size * k
    return {"samples_per_s": batch / statistics.median(totals), "data_wait_share": sum(waits) / sum(totals),
            "median_wait_ms": wait * 1e3, "median_step_ms": compute * 1e3, "peak_mb": peak_mb}


def _run_isolated(argv: list[str], steps: int, warmup: int) -> dict:
    cmd = [sys.executable, __file__, "--_measure", json.dumps({"argv": argv, "steps": steps, "warmup": warmup})]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_rows(model_config: str, batch: int) -> dict[str, list[str]]:
    """Gradient checkpointing on and off for a larger model on the demo data (memory rows)."""
    common = ["--model_config", model_config, "--per_device_train_batch_size", str(batch), "--report_to", "none",
              "--eval_data", "none", "--output_dir", tempfile.mkdtemp(prefix="bench_train_"),
              "--train_data", str(ROOT / "alip_hf" / "demo_data"), "--dataloader_num_workers", "2"]
    return {f"{model_config} batch {batch}, no checkpointing": common,
            f"{model_config} batch {batch}, grad. checkpointing": common + ["--gradient_checkpointing", "true"]}


def rows(shards: str, batch: int, model_config: str) -> dict[str, list[str]]:
    """Row name -> train.py flags."""
    common = ["--model_config", model_config, "--per_device_train_batch_size", str(batch), "--report_to", "none",
              "--eval_data", "none", "--output_dir", tempfile.mkdtemp(prefix="bench_train_")]
    demo = ["--train_data", str(ROOT / "alip_hf" / "demo_data"), *common]
    wds = ["--train_data", shards, "--streaming", "true", "--image_column", "jpg", "--text_column", "txt",
           "--caption_column", "caption.txt", "--shuffle_buffer", "256", *common]
    return {
        "demo parquet, 0 workers": demo + ["--dataloader_num_workers", "0"],
        "demo parquet, 2 workers": demo + ["--dataloader_num_workers", "2"],
        "demo parquet, 2 workers, grad. checkpointing": demo + ["--dataloader_num_workers", "2",
                                                               "--gradient_checkpointing", "true"],
        "synthetic WebDataset, 0 workers": wds + ["--dataloader_num_workers", "0"],
        "synthetic WebDataset, 2 workers": wds + ["--dataloader_num_workers", "2"],
    }


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured first steps per row")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every row")
    parser.add_argument("--batch", type=int, default=32, help="per-process batch size")
    parser.add_argument("--model_config", default="tiny", help="train.py --model_config")
    parser.add_argument("--num_samples", type=int, default=4000, help="synthetic WebDataset samples")
    parser.add_argument("--memory_model", default="vit-b-32", help="model of the checkpointing memory rows")
    parser.add_argument("--memory_batch", type=int, default=16, help="batch of the memory rows")
    parser.add_argument("--memory_steps", type=int, default=2, help="measured steps of the memory rows")
    parser.add_argument("--_measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        job = json.loads(args._measure)
        print(json.dumps(measure(job["argv"], job["steps"], job["warmup"])))
        return
    shard_dir = Path(tempfile.mkdtemp(prefix="bench_wds_"))
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic_webdataset.py"), "--output_dir",
                    str(shard_dir), "--num_samples", str(args.num_samples), "--samples_per_shard", "500",
                    "--extra_text_keys", "caption"], check=True, capture_output=True)
    num_shards = len(list(shard_dir.glob("*.tar")))
    shards = str(shard_dir / f"{{00000..{num_shards - 1:05d}}}.tar")
    table = {name: [] for name in rows(shards, args.batch, args.model_config)}
    for _ in range(args.repeats):
        for name, flags in rows(shards, args.batch, args.model_config).items():
            table[name].append(_run_isolated(flags, args.steps, args.warmup))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; model {args.model_config}, batch {args.batch}, "
          f"{args.steps} steps after {args.warmup} warm-up, median of {args.repeats} repeats\n")
    memory = {name: _run_isolated(flags, args.memory_steps, 1)
              for name, flags in memory_rows(args.memory_model, args.memory_batch).items()}
    print("| run | samples/s | data wait share | median wait ms | median step ms | peak memory growth MiB |")
    print("|---|---|---|---|---|---|")
    reference = None
    for name, results in table.items():
        med = {key: statistics.median(r[key] for r in results) for key in results[0]}
        reference = reference or med["samples_per_s"]
        print(f"| {name} | {med['samples_per_s']:.1f} ({med['samples_per_s'] / reference:.2f}x) | "
              f"{med['data_wait_share']:.1%} | {med['median_wait_ms']:.1f} | {med['median_step_ms']:.1f} | "
              f"{med['peak_mb']:.0f} |")
    print("\n| memory run (1 repeat) | samples/s | median step ms | peak memory growth MiB |\n|---|---|---|---|")
    for name, result in memory.items():
        print(f"| {name} | {result['samples_per_s']:.1f} | {result['median_step_ms']:.0f} | {result['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
