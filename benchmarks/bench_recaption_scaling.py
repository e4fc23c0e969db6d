"""Ways to scale `recaption.caption`, same work, tiny captioner on CPU: wall time of the whole command (start-up
included), median of `--repeats`.

Two figures per configuration: the wall time of the whole command (process and model start-up included: Ray's
local cluster start is most of its extra time on a small job), and the shards' makespan (from the start of the
first shard to the end of the last, from the markers' `finished_at` and `shard_seconds`), which is what the
scheduling decides once the replicas are up.

1. Two replicas, no straggler: `accelerate launch` with 2 CPU processes against `--engine ray` with 2 replicas
   of 1 CPU each (target: Ray at most 1.15x accelerate's time), Ray both starting its own local cluster and
   joining one already running (`--ray_address auto`, a cluster started untimed with `ray start` just before).
2. Two replicas, one a simulated straggler (its shards take 3x as long, an injected delay; `_straggler.py`):
   static shard assignment (2 scheduler tasks, shard j to task j % 2, as `accelerate launch` assigns them)
   against Ray's dynamic scheduling (an idle replica takes the next shard; target: at most 0.75x the time).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_recaption_scaling.py --images 8000 --shard_size 50 \
        --max_new_tokens 32 --repeats 3

Ray's cluster and pool start-up is a fixed cost, so its share shrinks with the job; `--comparisons engines` runs
the first comparison alone, for a longer job:

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_recaption_scaling.py --images 24000 --shard_size 50 \
        --max_new_tokens 32 --repeats 3 --comparisons engines
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tiny test models: tests/_tiny_captioners.py


def _source(path: str, n: int) -> str:
    import io

    import datasets
    import numpy as np
    from PIL import Image

    def png(i):
        buffer = io.BytesIO()
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "alt_text": datasets.Value("string")})
    datasets.Dataset.from_dict({"id": [f"img-{i:05d}" for i in range(n)], "image": [png(i) for i in range(n)],
                                "alt_text": [f"alt {i}" for i in range(n)]}, features=features).to_parquet(path)
    return path


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    return {**env, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


@contextlib.contextmanager
def _running_cluster(settle: float):
    """A local Ray cluster up before the timed command and stopped after it: the long-lived cluster (`ray start`,
    KubeRay) that jobs join with `--ray_address auto`. Its start-up is given `settle` seconds, untimed."""
    ray = [sys.executable, "-m", "ray.scripts.scripts"]
    subprocess.run([*ray, "start", "--head", "--num-cpus", "2", "--include-dashboard", "false",
                    "--disable-usage-stats"], env=_env(), check=True, capture_output=True)
    try:
        time.sleep(settle)
        yield
    finally:
        subprocess.run([*ray, "stop"], env=_env(), check=True, capture_output=True)


def _makespan(output_dir: str) -> float:
    import glob
    import json

    markers = [json.load(open(p)) for p in glob.glob(os.path.join(output_dir, "shards", "*.json"))]
    markers = [m for m in markers if "finished_at" in m]
    return max(m["finished_at"] for m in markers) - min(m["finished_at"] - m["shard_seconds"] for m in markers)


def _timed(commands: list[tuple[list[str], dict]]) -> float:
    """Seconds until every command (started together) has finished; a failure stops the benchmark."""
    start = time.perf_counter()
    processes = [subprocess.Popen(c, env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c, e in commands]
    for process in processes:
        log = process.communicate()[0]
        if process.returncode:
            raise RuntimeError(f"{commands[0][0][:4]}... failed:\n{log[-3000:]}")
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--shard_size", type=int, default=10)
    parser.add_argument("--max_new_tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds of idle between runs, so that one run's exiting processes do not slow the next")
    parser.add_argument("--comparisons", choices=["all", "engines", "straggler"], default="all",
                        help="engines: Ray against accelerate only; straggler: dynamic against static only")
    args = parser.parse_args(argv)

    from _tiny_captioners import save_tiny_captioner

    work = tempfile.mkdtemp()
    model = save_tiny_captioner(os.path.join(work, "captioner"))
    source = _source(os.path.join(work, "input.parquet"), args.images)
    common = ["--source", source, "--model", model, "--shard_size", str(args.shard_size), "--batch_size", "8",
              "--max_new_tokens", str(args.max_new_tokens), "--dtype", "float32"]
    straggler = [sys.executable, os.path.join(ROOT, "benchmarks", "_straggler.py"), *common]

    def out(name):
        path = os.path.join(work, name)
        shutil.rmtree(path, ignore_errors=True)
        return ["--output_dir", path]

    ray_pool = ["--engine", "ray", "--num_replicas", "2", "--cpus_per_replica", "1"]
    # name: (comparison, output folder, run on an already running cluster, the commands started together given
    # their `--output_dir` arguments)
    configs = {
        "accelerate, 2 processes": ("engines", "acc", False, lambda output_dir: [(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "recaption.caption",
             *common, *output_dir], _env(ACCELERATE_USE_CPU="true"))]),
        "ray, 2 replicas": ("engines", "ray", False, lambda output_dir: [(
            [sys.executable, "-m", "recaption.caption", *common, *output_dir, *ray_pool], _env())]),
        "ray on a running cluster, 2 replicas": ("engines", "ray-running", True, lambda output_dir: [(
            [sys.executable, "-m", "recaption.caption", *common, *output_dir, *ray_pool, "--ray_address",
             "auto"], _env())]),
        "static (2 tasks), straggler": ("straggler", "static", False, lambda output_dir: [
            ([*straggler, *output_dir, "--num_tasks", "2", "--task_index", "0"], _env(STRAGGLER="1")),
            ([*straggler, *output_dir, "--num_tasks", "2", "--task_index", "1"], _env())]),
        "ray dynamic, straggler": ("straggler", "dynamic", False, lambda output_dir: [(
            [*straggler, *output_dir, *ray_pool],
            _env(STRAGGLER_CLAIM=os.path.join(work, f"claim-{time.time_ns()}")))]),
    }
    configs = {name: config for name, config in configs.items() if args.comparisons in ("all", config[0])}
    load_before = os.getloadavg()
    seconds = {name: [] for name in configs}
    spans = {name: [] for name in configs}
    try:
        for _ in range(args.repeats):  # configurations take turns, so that they share the machine's load
            for name, (_, output, on_running_cluster, commands) in configs.items():
                time.sleep(args.settle)
                with _running_cluster(args.settle) if on_running_cluster else contextlib.nullcontext():
                    seconds[name].append(_timed(commands(out(output))))
                spans[name].append(_makespan(os.path.join(work, output)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    wall = {name: statistics.median(values) for name, values in seconds.items()}
    span = {name: statistics.median(values) for name, values in spans.items()}
    load = ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in zip(load_before, os.getloadavg()))
    print(f"{args.images} images, shard_size {args.shard_size}, max_new_tokens {args.max_new_tokens}, median of "
          f"{args.repeats}; seconds. Load average (1, 5, 15 min) before -> after: {load}\n")
    print("| configuration | wall (start-up included) | runs | shards' makespan | runs |")
    print("|---|---|---|---|---|")
    for name in configs:
        print(f"| {name} | {wall[name]:.1f} | {', '.join(f'{v:.1f}' for v in seconds[name])} | {span[name]:.1f} | "
              f"{', '.join(f'{v:.1f}' for v in spans[name])} |")
    for label, a, b, target in (("ray / accelerate (no straggler)", "ray, 2 replicas", "accelerate, 2 processes",
                                 1.15),
                                ("ray on a running cluster / accelerate (no straggler)",
                                 "ray on a running cluster, 2 replicas", "accelerate, 2 processes", 1.15),
                                ("ray dynamic / static (straggler)", "ray dynamic, straggler",
                                 "static (2 tasks), straggler", 0.75)):
        if a in wall:
            pairs = ", ".join(f"{x / y:.2f}" for x, y in zip(seconds[a], seconds[b]))
            print(f"\n{label}: wall {wall[a] / wall[b]:.2f}x (pairs of runs {pairs}), makespan "
                  f"{span[a] / span[b]:.2f}x (target <= {target}x); outside the shards (start-up, shutdown) "
                  f"{wall[a] - span[a]:.1f} s against {wall[b] - span[b]:.1f} s")


if __name__ == "__main__":
    main()
