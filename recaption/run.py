"""Sharded, resumable, multi-process runs that add columns to a dataset, joined on a stable id.

A run reads a source (`recaption.source`), cuts it into shards of `shard_size` consecutive rows, and gives
shard `i` to process `i % num_processes` (Accelerate's `process_index` / `num_processes`, so `accelerate
launch` spreads the work over GPUs and nodes). Each shard is written whole, with every input column plus the
new ones, in the layout of `recaption.layout`.

A stream (`--streaming`) is split by its source shards (files, or Parquet row groups when there are fewer
files than processes): source shard `j` goes to process `j % num_processes`, which alone reads it, in chunks of
`shard_size` rows; each chunk's marker holds the stream state after its last row, so a resumed run continues
each source shard from there without reading the finished chunks again (`recaption.sharding`).

A run killed at any moment and started again skips finished shards, redoes the unfinished one and ends with
exactly one row per input row. A finished shard is only skipped when it was made from the same input by the
same model: its marker records a digest of the shard's input ids, of the source's identity, of the model and of
the prompt and generation settings (`recaption.identity`), and a resumed or repeated run recomputes them and
refuses, naming the shard, what changed and `--overwrite_output_dir` (`recaption.resume`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable

from tqdm.auto import tqdm

from alip_hf import sources
from alip_hf.lazy import lazy_import
from alip_hf.schema import ID
from recaption.arguments import RunArguments
from alip_hf.identity import sha256_json
from recaption.identity import (
    identity_digests, load_digest_cache, model_identity, save_digest_cache, source_identity,
)
from recaption.layout import (
    atomic_write_json, atomic_write_parquet, done_shards, prepare_output, read_markers, shard_name, stream_chunk_name,
)
from recaption.resume import check_no_extra_shards, verify_done_chunks, verify_done_shard
from recaption.sharding import iter_shards, iter_stream_chunks, stream_sources
from recaption.source import Input, load_input
from recaption.step import Step, join_columns
from recaption.throughput import render as render_throughput
from recaption.throughput import replica_description, throughput
from recaption.workers import Worker, resolve_worker

logger = logging.getLogger(__name__)
datasets = lazy_import("datasets")
pq = lazy_import("pyarrow.parquet")


def run_sharded(args: RunArguments, step: Step, accelerator=None, source: Input | None = None) -> dict[str, Any]:
    """Runs `step` over every shard owned by this worker, then checks and summarises the run when it is complete.

    `source` is the already checked input (`load_input`), when the caller checked it before loading a model. The
    worker is an Accelerate process of `accelerator`'s group, or a scheduler task (`args.num_tasks > 1`).

    Returns:
        The run summary (rows, failures, the step's counts, derived figures and throughput); the same dict is
        written to `<output_dir>/summary.json`. Processes other than the main one return `{}`; a scheduler task
        that finds shards of other tasks unfinished returns its own part (`"complete": False`) and writes no
        summary: the last task to finish does.
    """
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    keep_freed_memory()
    worker = resolve_worker(args.num_tasks, args.task_index, accelerator)
    source = source or load_input(args, step.required_columns())
    if isinstance(source.dataset, datasets.IterableDataset):
        source = dataclasses.replace(source, dataset=stream_sources(source.dataset, worker.count))
    config = run_config(args, step, source)
    identity = identity_digests(config)
    open_output(args, config, worker)
    started = time.time()
    from alip_hf.training.preemption import StopSignal

    with StopSignal() as stop:  # SIGTERM / SIGUSR1: the current shard is finished and marked, then the run stops
        if isinstance(source.dataset, datasets.Dataset):
            todo = owned_map_style_shards(args, source, worker, identity)
            bar = progress_bar(step, worker, total=sum(len(rows) for _, rows in todo))
            writer = ShardWriter(args, step, source, identity, worker.index, bar.update, stop)
            for index, rows in todo:
                writer.write(shard_name(args.split, index), source.dataset.select(rows), {"index": index})
        else:
            bar = progress_bar(step, worker, total=None)  # a stream's length is known only once read
            writer = ShardWriter(args, step, source, identity, worker.index, bar.update, stop)
            run_stream_chunks(args, source, worker, identity, writer)
    bar.close()
    worker.wait()
    if not worker.is_main:
        return {}
    return finish(args, step, source, worker, time.time() - started)


def keep_freed_memory() -> None:
    """Lets glibc's malloc keep up to 64 MiB of freed memory in the process instead of returning it at once.

    Every `generate` step on CPU allocates and frees its activations. With glibc's starting thresholds (128 KiB)
    the freed memory goes back to the system and each step faults it in again, page by page; glibc raises the
    thresholds itself after the first large free (to the size freed, at most 32 MiB, trimming at twice that), so
    whether a process pays depends on what it happened to allocate before. A Ray replica measured 46,000 page
    faults a second and shards 16% slower than an `accelerate` process running the same code (BENCHMARKS.md,
    "Scaling recaption"). Setting the end point of glibc's own rule at start makes every replica and process
    alike. Elsewhere (macOS, musl) there is nothing to set.
    """
    import ctypes

    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 64 << 20)


def run_config(args: RunArguments, step: Step, source: Input) -> dict[str, Any]:
    """What produced the run, as saved in `run_config.json` and compared when resuming: the source and its
    identity, the step's provenance and the model's identity (its files' digests for a local directory)."""
    provenance = step.provenance()
    model = provenance.get("model")
    load_digest_cache(args.output_dir)
    config = {"step": step.name, "source": args.source, "split": args.split, "id_column": source.id_column,
              "shard_size": args.shard_size, "source_identity": source_identity(args), **provenance,
              "model_identity": model_identity(model, provenance.get("revision"), provenance.get("commit"))
              if model else None}
    if isinstance(source.dataset, datasets.IterableDataset):
        config["stream_shards"] = source.dataset.num_shards  # the unit of the work split and of resume
    return json.loads(json.dumps(config, default=str))  # compared with its JSON copy when resuming


def open_output(args: RunArguments, config: dict, worker: Worker) -> None:
    """Creates (or checks, when resuming) the output layout and saves the model files' digests."""
    prepare_output(args, config, worker)
    if worker.is_main:
        save_digest_cache(args.output_dir, config["model_identity"])


def owned_map_style_shards(args: RunArguments, source: Input, worker: Worker,
                           identity: dict[str, str]) -> list[tuple[int, range]]:
    """(index, row range) of this worker's unfinished map-style shards; its finished ones are checked against this
    input, model and settings on the way (`verify_done_shard`), and shards beyond the source's end refused."""
    rows_in = len(source.dataset)
    check_no_extra_shards(args, math.ceil(rows_in / args.shard_size), rows_in)
    todo = []
    for index, shard in iter_shards(source.dataset, args.shard_size, worker.index, worker.count, done_shards(args),
                                    source.id_column):
        if isinstance(shard, list):  # finished earlier: only its ids, to check it against this input
            verify_done_shard(args, index, shard, identity)
        else:
            todo.append((index, range(index * args.shard_size, min((index + 1) * args.shard_size, rows_in))))
    return todo


def run_stream_chunks(args: RunArguments, source: Input, worker: Worker, identity: dict[str, str],
                      writer: "ShardWriter") -> None:
    """Checks this worker's finished stream chunks, then writes the rest of its source shards chunk by chunk."""
    markers = read_markers(args)
    for source_shard in range(worker.index, source.dataset.num_shards, worker.count):
        finished = sorted((m for m in markers.values() if m.get("source_shard") == source_shard),
                          key=lambda m: m["chunk"])
        if finished:
            verify_done_chunks(args, source.dataset, source_shard, finished, source.id_column, identity)
    for name, shard, fields in iter_stream_chunks(source.dataset, args.shard_size, worker.index, worker.count,
                                                  args.split, markers):
        if shard is not None:
            writer.write(name, shard, fields)
        else:  # the source shard ended on a chunk boundary: an end marker, no data file
            writer.write_end_marker(name, fields)


def progress_bar(step: Step, worker: Worker, total: int | None) -> tqdm:
    """This worker's bar: its unfinished rows, their rate and the time left (ETA) when the total is known."""
    return tqdm(total=total, unit=step.unit, desc=f"{step.name} [{worker.label}]",
                position=worker.index if worker.in_group else 0, dynamic_ncols=True)


class ShardWriter:
    """Runs the step on one shard and writes its data file, then its completion marker (in that order, so that a
    marker always stands for a complete data file).

    Used by every engine: an Accelerate process or scheduler task runs it in its own loop, a Ray actor on the
    shards it is handed.
    """

    def __init__(self, args: RunArguments, step: Step, source: Input, identity: dict[str, str], worker_index: int,
                 progress: Callable[[int], Any] = lambda n: None, stop=None):
        self.args, self.step, self.source, self.identity = args, step, source, identity
        self.worker_index, self.progress, self.stop = worker_index, progress, stop
        self.replica = replica_description()

    def write(self, name: str, shard: datasets.Dataset, fields: dict) -> dict:
        """Processes and writes one shard; returns its marker."""
        started = time.time()
        ids = sources.read_ids(shard, self.source.id_column)
        repeated = sources.duplicate_ids(ids)
        if repeated:
            raise ValueError(f"ids {repeated} appear more than once in column {self.source.id_column!r}; ids must be "
                             "unique")
        result = self.step.process(shard, ids, self.progress)
        out = join_columns(shard, ids, result, self.source.features, self.args.image_column)
        atomic_write_parquet(out, os.path.join(self.args.output_dir, "data", f"{name}.parquet"))
        return self._mark(name, {**fields, "rows": len(ids), "process_index": self.worker_index,
                                 "counts": result.counts, "shard_seconds": round(time.time() - started, 4),
                                 "finished_at": time.time(),
                                 "replica": self.replica, "ids_sha256": sha256_json(ids), "first_id": ids[0],
                                 "identity": self.identity})

    def write_end_marker(self, name: str, fields: dict) -> dict:
        return self._mark(name, {**fields, "rows": 0, "process_index": self.worker_index, "counts": {},
                                 "identity": self.identity})

    def _mark(self, name: str, marker: dict) -> dict:
        atomic_write_json(os.path.join(self.args.output_dir, "shards", f"{name}.json"), marker)
        if self.stop is not None and self.stop.received:
            raise RecaptionStopped(f"{self.stop.received} received: stopped after finishing and marking shard {name}; "
                                   f"run the same command again to continue from the unfinished shards")
        return marker


class RecaptionStopped(SystemExit):
    """A run stopped by SIGTERM or SIGUSR1 after its current shard: exits with status 75 (`EX_TEMPFAIL`, as a
    preempted training run does, so that a job script can tell "stopped cleanly, requeue me" from "died"). The
    message is logged; `except Exception` does not catch it."""

    def __init__(self, message: str):
        from alip_hf.training.preemption import PREEMPTED_EXIT_CODE

        super().__init__(PREEMPTED_EXIT_CODE)
        self.message = message
        logger.warning(message)
        print(message, file=sys.stderr, flush=True)

    def __str__(self) -> str:
        return self.message


def finish(args: RunArguments, step: Step, source: Input, worker: Worker, seconds: float) -> dict[str, Any]:
    """The run's summary once every shard is done (checked and written by `_finalize`); a scheduler task that
    finds other tasks' shards unfinished reports its own part instead, and leaves the summary to the last task."""
    expected = (_map_style_names(args, len(source.dataset)) if isinstance(source.dataset, datasets.Dataset)
                else _stream_names(args, source.dataset.num_shards))
    if not worker.in_group:
        missing = [n for n in expected[0] if not os.path.exists(os.path.join(args.output_dir, "shards", f"{n}.json"))]
        if missing:
            logger.info("%s done; %d shard(s) of other tasks unfinished (%s...): the last task to finish writes "
                        "the summary", worker.label, len(missing), missing[0])
            part = {"step": step.name, "complete": False, "task_index": worker.index, "num_tasks": worker.count,
                    "shards_unfinished": len(missing), "seconds_this_run": round(seconds, 3)}
            print(json.dumps(part, indent=2))
            return part
    summary = _finalize(args, step, expected, seconds)
    print(json.dumps(summary, indent=2))
    logger.info("throughput: %s", render_throughput(summary.get("throughput", {})))
    return summary


def _map_style_names(args: RunArguments, rows_in: int) -> tuple[list[str], int]:
    """The shard names a complete run of `rows_in` map-style rows has, and the row count."""
    return [shard_name(args.split, i) for i in range(math.ceil(rows_in / args.shard_size))], rows_in


def _stream_names(args: RunArguments, num_sources: int) -> tuple[list[str], int]:
    """The chunk names a complete streaming run has, read from the markers (each source shard's chunks up to the
    one marked `last`), and the rows they counted; shards not finished are reported as missing."""
    markers = read_markers(args)
    names, rows = [], 0
    for source in range(num_sources):
        chunks = sorted((m for m in markers.values() if m.get("source_shard") == source), key=lambda m: m["chunk"])
        count = chunks[-1]["chunk"] + 1 if chunks and chunks[-1]["last"] else len(chunks) + 1
        names += [stream_chunk_name(args.split, source, c) for c in range(count)]
        rows += sum(m["rows"] for m in chunks)
    return names, rows


def _finalize(args: RunArguments, step: Step, expected: tuple[list[str], int], seconds: float) -> dict[str, Any]:
    """Checks that every shard is there with every id exactly once, sums the counts, writes summary.json."""
    names, rows_in = expected
    num_shards = len(names)
    if names and names[0] == shard_name(args.split, 0):  # map-style
        check_no_extra_shards(args, num_shards, rows_in)
    missing = [n for n in names if not os.path.exists(os.path.join(args.output_dir, "shards", f"{n}.json"))]
    if missing:
        raise RuntimeError(f"shards not written: {missing[:10]} ({len(missing)} in all); run again to finish them")
    totals: dict[str, float] = {}
    ids: set[str] = set()
    rows_out = 0
    markers = []
    for name in names:
        with open(os.path.join(args.output_dir, "shards", f"{name}.json"), encoding="utf-8") as f:
            marker = json.load(f)
        markers.append(marker)
        for key, value in marker["counts"].items():
            totals[key] = totals.get(key, 0) + value
        if not marker["rows"]:  # a stream's end marker: no data file
            num_shards -= 1
            continue
        shard_ids = pq.read_table(os.path.join(args.output_dir, "data", f"{name}.parquet"), columns=[ID])[ID]
        rows_out += len(shard_ids)
        ids.update(shard_ids.to_pylist())
    if rows_out != rows_in or len(ids) != rows_in:
        raise RuntimeError(f"{rows_in} rows in, {rows_out} rows out with {len(ids)} distinct ids")
    summary = {"step": step.name, "complete": True, "rows": rows_out, "shards": num_shards,
               "seconds_this_run": round(seconds, 3), "counts": totals, **step.summarize(totals),
               "throughput": throughput(markers, step.unit)}
    atomic_write_json(os.path.join(args.output_dir, "summary.json"), summary)
    return summary
