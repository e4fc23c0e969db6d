"""Sharded, resumable, multi-process runs that add columns to a dataset, joined on a stable id.

A run reads a source with `data.load_source`, cuts it into shards of `shard_size` consecutive rows, and
gives shard `i` to process `i % num_processes` (Accelerate's `process_index` / `num_processes`, so
`accelerate launch` spreads the work over GPUs and nodes). Each shard is written whole, with every input
column plus the new ones, as

    <output_dir>/data/<split>-<index:05d>.parquet     the data (temp file, then `os.replace`)
    <output_dir>/shards/<split>-<index:05d>.json      completion marker with the shard's counts
    <output_dir>/run_config.json                      what produced the run (model, revision, prompt, ...)
    <output_dir>/summary.json                         totals, written once every shard is done

A stream (`--streaming`) is split by its source shards (files, or Parquet row groups when there are fewer
files than processes): source shard `j` goes to process `j % num_processes`, which alone reads it, in chunks of
`shard_size` rows written as `data/<split>-<j:05d>-<chunk:05d>.parquet`; each chunk's marker holds the stream
state after its last row, so a resumed run continues each source shard from there without reading the
finished chunks again.

A shard counts as done only when its marker exists; the marker is written after the data file, so a run
killed at any moment and started again skips finished shards, redoes the unfinished one and ends with
exactly one row per input row.

The id: the `--id_column` (default `id`) when the source has it, else the `id` img2dataset saved in each
sample's `json` (`alip_hf.web` asks it to), else WebDataset's `__key__`; it is written as `id`. New values are looked up by id, never by position, and ids must be unique.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import logging
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

logger = logging.getLogger(__name__)

WEBDATASET_KEY = "__key__"
IMG2DATASET_METADATA = "json"  # img2dataset writes each sample's metadata (url, status, saved columns) there


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


def resolve_id_column(column_names: list[str], id_column: str, features=None) -> str:
    """The id column to use: `id_column` if present (`json.id` names a field of a struct column), else the `id`
    that img2dataset's `--save_additional_columns` put in each sample's `json`, else WebDataset's `__key__`
    (a position in the download, not stable across downloads); an error naming them otherwise."""
    if id_column in column_names:
        return id_column
    head, _, field_name = id_column.partition(".")
    if field_name and head in column_names:
        return id_column
    metadata = (features or {}).get(IMG2DATASET_METADATA)
    if isinstance(metadata, dict) and ID in metadata:
        return f"{IMG2DATASET_METADATA}.{ID}"
    if WEBDATASET_KEY in column_names:
        return WEBDATASET_KEY
    raise ValueError(
        f"id column {id_column!r} not found and no WebDataset {WEBDATASET_KEY!r}; available columns: {column_names}. "
        "Pass --id_column with a column that identifies each row (new columns are joined on it)."
    )


def read_ids(shard: datasets.Dataset, id_column: str) -> list[str]:
    """The shard's ids as strings; `column.field` reads a field of a struct column (img2dataset's `json.id`)."""
    if id_column in shard.column_names:
        return [str(i) for i in shard[id_column]]
    head, _, field_name = id_column.partition(".")
    return [str(value[field_name]) for value in shard[head]]


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
    id_column = resolve_id_column(columns, args.id_column, dataset.features)
    require_columns(dataset, required)
    return Input(undecoded_images(dataset, args.image_column), id_column, dataset.features)


def iter_shards(
    dataset: datasets.Dataset,
    shard_size: int,
    rank: int,
    world: int,
    skip: set[int],
) -> Iterator[tuple[int, datasets.Dataset | None]]:
    """(index, rows) for every shard of this process of a map-style dataset; rows is None for shards in `skip`."""
    for index in range(rank, math.ceil(len(dataset) / shard_size), world):
        start = index * shard_size
        yield index, None if index in skip else dataset.select(range(start, min(start + shard_size, len(dataset))))


def stream_sources(dataset: datasets.IterableDataset, world: int) -> datasets.IterableDataset:
    """The stream with at least `world` source shards where its files allow (Parquet row groups), so that every
    process gets some; a stream is split by its source shards, never read whole by every process."""
    if dataset.num_shards < world and hasattr(dataset, "reshard"):
        dataset = dataset.reshard()
    if dataset.num_shards < world:
        logger.warning("the stream has %d source shard(s) for %d processes: %d process(es) will have no work",
                       dataset.num_shards, world, world - dataset.num_shards)
    return dataset


def stream_chunk_name(split: str, source_shard: int, chunk: int) -> str:
    return f"{split}-{source_shard:05d}-{chunk:05d}"


def iter_stream_chunks(
    dataset: datasets.IterableDataset, shard_size: int, rank: int, world: int, split: str, markers: dict[str, dict]
) -> Iterator[tuple[str, datasets.Dataset | None, dict]]:
    """(name, rows, marker fields) for chunks of `shard_size` rows of the source shards `j` with
    `j % world == rank`; the other shards are never read.

    Resuming a source shard restores the stream state saved in the marker of its last finished chunk
    (`IterableDataset.load_state_dict`), so finished chunks are not read again. A source shard ends with a
    marker whose `last` is true (a final chunk with no rows when the shard ended on a chunk boundary).
    """
    for source_shard in range(rank, dataset.num_shards, world):
        finished = sorted((m for m in markers.values() if m.get("source_shard") == source_shard),
                          key=lambda m: m["chunk"])
        if finished and finished[-1]["last"]:
            continue
        part = dataset.shard(num_shards=dataset.num_shards, index=source_shard, contiguous=True)
        if finished:
            part.load_state_dict(finished[-1]["stream_state"])
        chunk = finished[-1]["chunk"] + 1 if finished else 0
        rows = iter(part)
        while True:
            taken = list(itertools.islice(rows, shard_size))
            fields = {"source_shard": source_shard, "chunk": chunk, "stream_state": part.state_dict(),
                      "last": len(taken) < shard_size}
            shard = datasets.Dataset.from_list(taken, features=dataset.features) if taken else None
            yield stream_chunk_name(split, source_shard, chunk), shard, fields
            if fields["last"]:
                break
            chunk += 1


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


def _markers(args: RunArguments) -> dict[str, dict]:
    """name -> completion marker of every finished shard (or stream chunk) of the split."""
    found = {}
    for marker in glob.glob(os.path.join(args.output_dir, "shards", f"{args.split}-*.json")):
        with open(marker, encoding="utf-8") as f:
            found[os.path.basename(marker)[: -len(".json")]] = json.load(f)
    return found


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
    if isinstance(source.dataset, datasets.IterableDataset):
        source = dataclasses.replace(source, dataset=stream_sources(source.dataset, accelerator.num_processes))
        config["stream_shards"] = source.dataset.num_shards  # the unit of the work split and of resume
    config = json.loads(json.dumps(config, default=str))  # compared with its JSON copy when resuming
    _prepare_output(args, config, accelerator)
    markers = _markers(args)
    rank, world = accelerator.process_index, accelerator.num_processes

    total = None
    if isinstance(source.dataset, datasets.Dataset):
        done = {m["index"] for m in markers.values() if "index" in m}
        owned = range(rank, math.ceil(len(source.dataset) / args.shard_size), world)
        total = sum(min(args.shard_size, len(source.dataset) - i * args.shard_size) for i in owned if i not in done)
        work = ((shard_name(args.split, i), shard, {"index": i})
                for i, shard in iter_shards(source.dataset, args.shard_size, rank, world, done))
    else:
        work = iter_stream_chunks(source.dataset, args.shard_size, rank, world, args.split, markers)
    bar = tqdm(total=total, unit=step.unit, desc=f"{step.name} [{rank}/{world}]",
               position=rank, dynamic_ncols=True)
    started = time.time()
    for name, shard, fields in work:
        marker = {**fields, "rows": 0, "process_index": rank, "counts": {}}
        if shard is not None:
            ids = read_ids(shard, source.id_column)
            if len(set(ids)) != len(ids):
                duplicate = next(i for i in ids if ids.count(i) > 1)
                raise ValueError(f"id {duplicate!r} appears twice in column {source.id_column!r}; ids must be unique")
            result = step.process(shard, ids, bar.update)
            out = _join(shard, ids, result, source.features, args.image_column)
            atomic_write_parquet(out, os.path.join(args.output_dir, "data", f"{name}.parquet"))
            marker.update(rows=len(ids), counts=result.counts)
        elif "index" in fields:  # a finished map-style shard
            continue
        atomic_write_json(os.path.join(args.output_dir, "shards", f"{name}.json"),
                          {**marker, "seconds": time.time() - started})
    bar.close()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return {}
    expected = (_map_style_names(args, len(source.dataset)) if isinstance(source.dataset, datasets.Dataset)
                else _stream_names(args, source.dataset.num_shards))
    summary = _finalize(args, step, expected, time.time() - started)
    accelerator.print(json.dumps(summary, indent=2))
    return summary


def _map_style_names(args: RunArguments, rows_in: int) -> tuple[list[str], int]:
    """The shard names a complete run of `rows_in` map-style rows has, and the row count."""
    return [shard_name(args.split, i) for i in range(math.ceil(rows_in / args.shard_size))], rows_in


def _stream_names(args: RunArguments, num_sources: int) -> tuple[list[str], int]:
    """The chunk names a complete streaming run has, read from the markers (each source shard's chunks up to the
    one marked `last`), and the rows they counted; shards not finished are reported as missing."""
    markers = _markers(args)
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
        if not marker["rows"]:  # a stream's end marker: no data file
            num_shards -= 1
            continue
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

