"""`--engine ray`: a recaption step run by a Ray Data actor pool, into the same shards, markers and provenance.

The work units are the output shards themselves: a Ray dataset with one row per unfinished shard (its index and
row range, or for a stream one source shard), mapped by an actor pool (`Dataset.map_batches` with a callable
class, one shard per call). Each actor is one model replica (one GPU, or `--cpus_per_replica` CPUs): it builds
the step once, reads its shards' rows from the source through `datasets` (memory-mapped for map-style sources)
and writes each shard with the same `ShardWriter` as the other engines. Keeping the unit the shard, rather than
re-batching the source's rows inside Ray, is what keeps the output identical to a single-process run and lets
`recaption.publish`, resume and the identity checks read it unchanged.

Scheduling is dynamic: an idle replica takes the next shard, so a slow replica holds one shard, not a fixed share.
A replica that dies (its process killed, its node lost) is restarted and its shard retried (`max_restarts` /
`max_task_retries`); the retry writes the same data file and marker under the same name, atomically, so nothing
is lost or written twice. A shard whose marker already exists when an actor reaches it (written just before the
replica died) is checked and skipped. A killed driver leaves finished shards marked; the next run redoes only
the others.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import threading
import time
from typing import Any, Callable

from tqdm.auto import tqdm

from alip_hf import sources
from alip_hf.lazy import lazy_import
from recaption.arguments import RunArguments
from recaption.identity import identity_digests, save_digest_cache
from recaption.layout import check_config, create_layout, done_shards, read_markers, remove_stale_files, save_config
from recaption.layout import shard_name
from recaption.resume import check_no_extra_shards, verify_done_shard
from recaption.run import ShardWriter, finish, keep_freed_memory, run_config, run_stream_chunks
from recaption.sharding import stream_sources
from recaption.source import Input, load_input
from recaption.step import Step
from recaption.workers import Worker

logger = logging.getLogger(__name__)
datasets = lazy_import("datasets")

StepFactory = Callable[[str], Step]  # device ("cpu", "cuda") -> the step with its model loaded


def _single() -> Worker:
    """The driver, or one actor: it owns every shard it is handed; nobody to wait for."""
    return Worker(index=0, count=1, is_main=True, in_group=True, wait=lambda: None)


class ShardReplica:
    """One model replica of the pool: builds the step once, then writes the shards it is handed.

    Called by Ray Data with a batch of work units (`{"index": [...], "start": [...], "stop": [...]}` for map-style
    shards, `{"source_shard": [...]}` for a stream) and returns `{"name": [...], "rows": [...]}`.
    """

    def __init__(self, args: RunArguments, make_step: StepFactory, threads: int):
        import ray
        import torch

        torch.set_num_threads(max(1, threads))
        keep_freed_memory()
        device = "cuda" if ray.get_gpu_ids() else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to this replica's GPU
        self.args, self.step = args, make_step(device)
        self.source = load_input(args, self.step.required_columns())
        if isinstance(self.source.dataset, datasets.IterableDataset):
            self.source = dataclasses.replace(self.source, dataset=stream_sources(self.source.dataset, 1))
        config = run_config(args, self.step, self.source)
        check_config(args, config)  # the driver wrote it from another replica's provenance only if it matches
        save_config(args, config)
        self.identity = identity_digests(config)
        self.writer = ShardWriter(args, self.step, self.source, self.identity, worker_index=0)

    def __call__(self, batch: dict) -> dict:
        names, rows = [], []
        if "source_shard" in batch:
            for source_shard in batch["source_shard"]:
                source_shard = int(source_shard)
                worker = Worker(source_shard, self.source.dataset.num_shards, True, True, lambda: None)
                written = []
                run_stream_chunks(self.args, self.source, worker, self.identity, _Recorder(self.writer, written))
                names.append(f"source shard {source_shard}")
                rows.append(sum(m["rows"] for m in written))
            return {"name": names, "rows": rows}
        for index, start, stop in zip(batch["index"], batch["start"], batch["stop"]):
            index, name = int(index), shard_name(self.args.split, int(index))
            shard = self.source.dataset.select(range(int(start), int(stop)))
            if os.path.exists(os.path.join(self.args.output_dir, "shards", f"{name}.json")):
                # written by a replica that died before reporting it: checked, not redone
                verify_done_shard(self.args, index, sources.read_ids(shard, self.source.id_column), self.identity)
            else:
                self.writer.write(name, shard, {"index": index})
            names.append(name)
            rows.append(len(shard))
        return {"name": names, "rows": rows}


class _Recorder:
    """A `ShardWriter` that also keeps the markers it wrote."""

    def __init__(self, writer: ShardWriter, written: list):
        self.writer, self.written = writer, written

    def write(self, name, shard, fields):
        self.written.append(self.writer.write(name, shard, fields))

    def write_end_marker(self, name, fields):
        self.written.append(self.writer.write_end_marker(name, fields))


def _replicas(args: RunArguments, ray) -> tuple[int, float, float]:
    """(replicas, CPUs each, GPUs each) for this cluster and these flags."""
    resources = ray.cluster_resources()
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if resources.get("GPU") else 0.0)
    if args.num_replicas is not None:
        count = args.num_replicas
    elif gpus:
        count = int(resources.get("GPU", 0) // gpus)
    else:
        count = int(resources.get("CPU", 1) // args.cpus_per_replica)
    return max(1, count), args.cpus_per_replica, gpus


def work_units(args: RunArguments, source: Input) -> list[dict[str, int]]:
    """One row per unfinished map-style shard (index and row range), or per source shard of a stream not yet
    ended (a stream's source shard is read in order, so it is one unit; its finished chunks are skipped)."""
    if isinstance(source.dataset, datasets.IterableDataset):
        ended = {m["source_shard"] for m in read_markers(args).values() if m.get("last")}
        return [{"source_shard": j} for j in range(source.dataset.num_shards) if j not in ended]
    rows_in = len(source.dataset)
    check_no_extra_shards(args, math.ceil(rows_in / args.shard_size), rows_in)
    done = done_shards(args)
    return [{"index": i, "start": i * args.shard_size, "stop": min((i + 1) * args.shard_size, rows_in)}
            for i in range(math.ceil(rows_in / args.shard_size)) if i not in done]


def init_ray(address: str | None = None, **kwargs) -> None:
    """`ray.init` for the Ray engine: a local cluster (or the one at `address`), without the dashboard.

    Ray Data is imported meanwhile: starting a local cluster is mostly waiting for its processes to come up, and
    the driver's import of `ray.data` (0.5-1 s) fits in that wait instead of following it. A failed start raises
    once that import has ended.
    """
    import ray

    importer = threading.Thread(target=importlib.import_module, args=("ray.data",), name="import ray.data")
    importer.start()
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **kwargs)
    finally:
        importer.join()


def run_ray(args: RunArguments, make_step: StepFactory, plan: Step, source: Input | None = None) -> dict[str, Any]:
    """Runs the step on a Ray actor pool (`--engine ray`), then checks and summarises the run as the other engines.

    Args:
        make_step: builds the step with its model on a replica (called once per actor, with its device).
        plan: the same step without a model (its name, unit, columns and `summarize`), for the driver.
        source: the already checked input, when the caller checked it before starting anything.

    Returns:
        The run summary, also written to `<output_dir>/summary.json`.
    """
    try:
        import ray
    except ImportError as e:
        raise ImportError("--engine ray needs Ray Data: pip install 'alip-hf[ray]'") from e

    source = source or load_input(args, plan.required_columns())
    if isinstance(source.dataset, datasets.IterableDataset):
        source = dataclasses.replace(source, dataset=stream_sources(source.dataset, 1))
    create_layout(args, _single())  # before any replica writes: nobody is writing yet
    units = work_units(args, source)
    started = time.time()
    started_ray = not ray.is_initialized()
    if started_ray:
        init_ray(args.ray_address)
    try:
        if units:
            _run_pool(args, make_step, plan, units, ray)
    finally:
        if started_ray:
            ray.shutdown()  # the replicas end with the run, not a minute later when they notice the driver gone
    remove_stale_files(args, _single())  # a replica killed while writing leaves its temporary file
    config_path = os.path.join(args.output_dir, "run_config.json")
    if os.path.exists(config_path):
        import json

        with open(config_path, encoding="utf-8") as f:
            save_digest_cache(args.output_dir, json.load(f).get("model_identity"))
    return finish(args, plan, source, _single(), time.time() - started)


def _run_pool(args: RunArguments, make_step: StepFactory, plan: Step, units: list[dict], ray) -> None:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one bar of our own, with the ETA over all replicas
    replicas, cpus, gpus = _replicas(args, ray)
    replicas = min(replicas, len(units))
    logger.info("%d shard(s) on %d replica(s) (%g CPU, %g GPU each)", len(units), replicas, cpus, gpus)
    total = sum(u["stop"] - u["start"] for u in units) if "index" in units[0] else None  # streams: unknown
    results = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        ShardReplica, fn_constructor_kwargs={"args": args, "make_step": make_step, "threads": int(cpus)},
        # A replica that dies is restarted and its shard retried: Ray Data's actor pools default to
        # max_restarts=-1 and max_task_retries=-1, which this relies on.
        batch_size=1, concurrency=replicas, num_cpus=cpus, num_gpus=gpus or None)
    with tqdm(total=total, unit=plan.unit, desc=f"{plan.name} [ray, {replicas} replicas]", dynamic_ncols=True) as bar:
        for row in results.iter_rows():
            bar.update(int(row["rows"]))
