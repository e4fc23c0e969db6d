"""Sharded, resumable, multi-process runs that add columns to a dataset, joined on a stable id.

A run reads a source with `data.load_source`, cuts it into shards of `shard_size` consecutive rows, and
gives shard `i` to process `i % num_processes` (Accelerate's `process_index` / `num_processes`, so
`accelerate launch` spreads the work over GPUs and nodes). Each shard is written whole, with every input
column plus the new ones, as

    <output_dir>/data/<split>-<index:05d>.parquet     the data (temp file, then `os.replace`)
    <output_dir>/shards/<split>-<index:05d>.json      completion marker with the shard's counts
    <output_dir>/run_config.json                      what produced the run (model, revision, prompt, ...)
    <output_dir>/summary.json                         totals, written once every shard is done

A shard counts as done only when its marker exists; the marker is written after the data file, so a run
killed at any moment and started again skips finished shards, redoes the unfinished one and ends with
exactly one row per input row.

The id: the `--id_column` (default `id`) when the source has it, else WebDataset's `__key__`; it is
written as `id`. New values are looked up by id, never by position, and ids must be unique.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import datasets
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from alip_hf.data import decode_image, load_source, require_columns, undecoded_images
from alip_hf.io import write_json_atomic, write_with_atomically
from alip_hf.schema import ERROR, ID, IMAGE

WEBDATASET_KEY = "__key__"


@dataclass
class RunArguments:
    """Where the rows come from, where they go, and how the work is split."""

    source: str = field(
        metadata={"help": "Hub id, save_to_disk dir, Parquet/JSON/CSV file or glob, or WebDataset shards."}
    )
    output_dir: str = field(metadata={"help": "Where the Parquet shards, markers and summary are written."})
    split: str = field(default="train", metadata={"help": "Split of the source to read."})
    streaming: bool = field(default=False, metadata={"help": "Read the source lazily (large Hub datasets)."})
    id_column: str = field(default=ID, metadata={"help": "Stable key column; WebDataset `__key__` is used if absent."})
    image_column: str = field(default=IMAGE, metadata={"help": "Image column of the source."})
    shard_size: int = field(
        default=1000, metadata={"help": "Rows per output shard (the unit of resume and of work split)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete earlier results instead of resuming."})

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"--shard_size must be >= 1, got {self.shard_size}")


@dataclass
class GenerationArguments:
    """How text is generated; stored with the run as provenance."""

    batch_size: int = field(default=16, metadata={"help": "Rows per generate() call."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Cap on generated tokens (default: per step)."})
    num_beams: int = field(default=1, metadata={"help": "1 = greedy decoding, >1 = beam search."})
    dtype: str = field(
        default="auto",
        metadata={"help": "auto (bf16 on a GPU that has it, else fp32), float32, bfloat16 or float16.",
                  "choices": ["auto", "float32", "bfloat16", "float16"]},
    )

    def __post_init__(self):
        if self.batch_size < 1 or self.num_beams < 1:
            raise ValueError(f"--batch_size and --num_beams must be >= 1, got {self.batch_size}, {self.num_beams}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")


def torch_dtype(name: str, device):
    """`--dtype` -> torch dtype; `auto` is bf16 on a GPU that supports it (fp16 on older ones), else fp32."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if getattr(device, "type", str(device)) == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class Step(Protocol):
    """What a recaption step supplies to `run_sharded`."""

    name: str
    unit: str  # what the progress bar counts ("img", "row")

    def required_columns(self) -> dict[str, str]:
        """role -> column name the step reads."""

    def provenance(self) -> dict[str, Any]:
        """JSON-able description of the run (model, revision, prompt, generation settings)."""

    def process(self, shard: datasets.Dataset, ids: list[str], progress: Callable[[int], None]) -> "StepResult":
        """New column values for one shard, keyed by id."""

    def summarize(self, totals: dict[str, float]) -> dict[str, Any]:
        """Derived figures (means, rates) from the summed shard counts."""


@dataclass
class StepResult:
    columns: dict[str, dict[str, Any]]  # column -> id -> value
    counts: dict[str, float]  # summed over shards into the run summary


# ----------------------------------------------------------------------------- ids, images, atomic writes


def resolve_id_column(column_names: list[str], id_column: str) -> str:
    """The id column to use: `id_column` if present, else WebDataset's `__key__`; an error naming both otherwise."""
    if id_column in column_names:
        return id_column
    if WEBDATASET_KEY in column_names:
        return WEBDATASET_KEY
    raise ValueError(
        f"id column {id_column!r} not found and no WebDataset {WEBDATASET_KEY!r}; available columns: {column_names}. "
        "Pass --id_column with a column that identifies each row (new columns are joined on it)."
    )


def load_image(value):
    """A PIL RGB image from an image cell, decoded by `data.decode_image` (the decoder train.py uses, so a row
    flagged unreadable here is exactly a row train.py would skip)."""
    return decode_image(value).convert("RGB")


def atomic_write_json(path: str, payload: dict) -> None:
    write_json_atomic(path, payload, indent=2, sort_keys=True, default=str)


def atomic_write_parquet(dataset: datasets.Dataset, path: str) -> None:
    # One bar per run, not one per shard written.
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        write_with_atomically(path, dataset.to_parquet)
    finally:
        if bars_were_on:
            datasets.utils.enable_progress_bars()


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# ----------------------------------------------------------------------------- input


@dataclass
class Input:
    dataset: datasets.Dataset | datasets.IterableDataset
    id_column: str
    features: datasets.Features | None  # as read, to restore decodable images when writing


def load_input(args: RunArguments, required: dict[str, str]) -> Input:
    """Loads the source, checks the needed columns and the id, and turns image decoding off (images are
    decoded one by one so that an unreadable one becomes an `error` value, not a crash)."""
    dataset = load_source(args.source, split=args.split, streaming=args.streaming)
    columns = list(dataset.column_names or (dataset.features or {}).keys())
    id_column = resolve_id_column(columns, args.id_column)
    require_columns(dataset, required)
    return Input(undecoded_images(dataset, args.image_column), id_column, dataset.features)


def iter_shards(
    dataset: datasets.Dataset | datasets.IterableDataset,
    shard_size: int,
    rank: int,
    world: int,
    skip: set[int],
    seen: dict[str, int] | None = None,
) -> Iterator[tuple[int, datasets.Dataset | None]]:
    """(index, rows) for every shard of this process; rows is None for shards in `skip`.

    A stream is read whole by every process (each keeps only its own shards), so every process learns the
    number of input rows, which it stores in `seen["rows"]`.
    """
    seen = {} if seen is None else seen
    if isinstance(dataset, datasets.Dataset):
        seen["rows"] = len(dataset)
        for index in range(rank, math.ceil(len(dataset) / shard_size), world):
            start = index * shard_size
            yield index, None if index in skip else dataset.select(range(start, min(start + shard_size, len(dataset))))
        return
    rows, current, position = [], 0, -1
    for position, row in enumerate(dataset):
        index = position // shard_size
        if index != current:
            yield from _emit(current, rows, rank, world, skip, dataset.features)
            rows, current = [], index
        if index % world == rank and index not in skip:
            rows.append(row)
    seen["rows"] = position + 1
    if position >= 0:
        yield from _emit(current, rows, rank, world, skip, dataset.features)


def _emit(index, rows, rank, world, skip, features):
    if index % world == rank:
        yield index, None if index in skip else datasets.Dataset.from_list(rows, features=features)


# ----------------------------------------------------------------------------- the run


def _prepare_output(args: RunArguments, config: dict, accelerator) -> None:
    """Creates the layout; refuses to resume into results produced by a different configuration."""
    if accelerator.is_main_process:
        if args.overwrite_output_dir and os.path.isdir(args.output_dir):
            shutil.rmtree(args.output_dir)
        for sub in ("data", "shards"):
            os.makedirs(os.path.join(args.output_dir, sub), exist_ok=True)
        # Leftovers of a killed run; nobody is writing yet, every process waits below.
        for stale in glob.glob(os.path.join(args.output_dir, "*", ".*.tmp")):
            os.remove(stale)
    accelerator.wait_for_everyone()
    path = os.path.join(args.output_dir, "run_config.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
        changed = {k for k in set(previous) | set(config) if previous.get(k) != config.get(k)}
        if changed:
            raise ValueError(
                f"{args.output_dir} holds results of another configuration (differs in {sorted(changed)}); "
                "use another --output_dir or --overwrite_output_dir"
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not os.path.exists(path):
        atomic_write_json(path, config)


def _done_shards(args: RunArguments) -> set[int]:
    done = set()
    for marker in glob.glob(os.path.join(args.output_dir, "shards", f"{args.split}-*.json")):
        done.add(int(os.path.basename(marker)[len(args.split) + 1 : -len(".json")]))
    return done


def _join(shard: datasets.Dataset, ids: list[str], result: StepResult, features, image_column: str) -> datasets.Dataset:
    """Adds the new columns to `shard` by looking each row's id up in the step's output."""
    for column, by_id in result.columns.items():
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise RuntimeError(f"step produced no {column!r} for ids {missing[:5]}")
        if column in shard.column_names:
            shard = shard.remove_columns(column)
        shard = shard.add_column(column, [by_id[i] for i in ids])
    if ID not in shard.column_names:
        shard = shard.add_column(ID, ids)
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        shard = shard.cast_column(image_column, features[image_column])
    return shard


def run_sharded(args: RunArguments, step: Step, accelerator=None, source: Input | None = None) -> dict[str, Any]:
    """Runs `step` over every shard owned by this process, then (main process) checks and summarises.

    `source` is the already checked input (`load_input`), when the caller checked it before loading a model.

    Returns:
        The run summary (rows, failures, the step's counts and derived figures); the same dict is written
        to `<output_dir>/summary.json`. Processes other than the main one return `{}`.
    """
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    source = source or load_input(args, step.required_columns())
    config = {"step": step.name, "source": args.source, "split": args.split, "id_column": source.id_column,
              "shard_size": args.shard_size, **step.provenance()}
    config = json.loads(json.dumps(config, default=str))  # compared with its JSON copy when resuming
    _prepare_output(args, config, accelerator)
    done = _done_shards(args)
    rank, world = accelerator.process_index, accelerator.num_processes

    total = None
    if isinstance(source.dataset, datasets.Dataset):
        owned = range(rank, math.ceil(len(source.dataset) / args.shard_size), world)
        total = sum(min(args.shard_size, len(source.dataset) - i * args.shard_size) for i in owned if i not in done)
    bar = tqdm(total=total, unit=step.unit, desc=f"{step.name} [{rank}/{world}]",
               position=rank, dynamic_ncols=True)
    started = time.time()
    seen: dict[str, int] = {}
    for index, shard in iter_shards(source.dataset, args.shard_size, rank, world, done, seen):
        if shard is None:
            continue
        ids = [str(i) for i in shard[source.id_column]]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"id {duplicate!r} appears twice in column {source.id_column!r}; ids must be unique")
        result = step.process(shard, ids, bar.update)
        out = _join(shard, ids, result, source.features, args.image_column)
        name = shard_name(args.split, index)
        atomic_write_parquet(out, os.path.join(args.output_dir, "data", f"{name}.parquet"))
        atomic_write_json(
            os.path.join(args.output_dir, "shards", f"{name}.json"),
            {"index": index, "rows": len(ids), "process_index": rank, "counts": result.counts,
             "seconds": time.time() - started},
        )
    bar.close()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    summary = _finalize(args, step, seen["rows"], time.time() - started)
    accelerator.print(json.dumps(summary, indent=2))
    return summary


def _finalize(args: RunArguments, step: Step, rows_in: int, seconds: float) -> dict[str, Any]:
    """Checks that every shard is there with every id exactly once, sums the counts, writes summary.json."""
    num_shards = math.ceil(rows_in / args.shard_size)
    names = [shard_name(args.split, i) for i in range(num_shards)]
    missing = [n for n in names if not os.path.exists(os.path.join(args.output_dir, "shards", f"{n}.json"))]
    if missing:
        raise RuntimeError(f"shards not written: {missing[:10]} ({len(missing)} in all); run again to finish them")
    totals: dict[str, float] = {}
    ids: set[str] = set()
    rows_out = 0
    for name in names:
        with open(os.path.join(args.output_dir, "shards", f"{name}.json"), encoding="utf-8") as f:
            marker = json.load(f)
        for key, value in marker["counts"].items():
            totals[key] = totals.get(key, 0) + value
        shard_ids = pq.read_table(os.path.join(args.output_dir, "data", f"{name}.parquet"), columns=[ID])[ID]
        rows_out += len(shard_ids)
        ids.update(shard_ids.to_pylist())
    if rows_out != rows_in or len(ids) != rows_in:
        raise RuntimeError(f"{rows_in} rows in, {rows_out} rows out with {len(ids)} distinct ids")
    summary = {"step": step.name, "rows": rows_out, "shards": num_shards, "seconds_this_run": round(seconds, 3),
               "counts": totals, **step.summarize(totals)}
    atomic_write_json(os.path.join(args.output_dir, "summary.json"), summary)
    return summary


def error_column(shard: datasets.Dataset, ids: list[str], new_errors: dict[str, str]) -> dict[str, str]:
    """The `error` value per id: this step's error, else the one already recorded, else empty."""
    old = shard[ERROR] if ERROR in shard.column_names else [""] * len(ids)
    return {i: new_errors.get(i) or (previous or "") for i, previous in zip(ids, old)}

