"""Sharded, resumable, multi-process runs that add columns to a dataset, joined on a stable id.

A run reads a source with `data.load_source`, cuts it into shards of `shard_size` consecutive rows, and
gives shard `i` to process `i % num_processes` (Accelerate's `process_index` / `num_processes`, so
`accelerate launch` spreads the work over GPUs and nodes). Each shard is written whole, with every input
column plus the new ones, as

    <output_dir>/data/<split>-<index:05d>.parquet     the data (temp file, then `os.replace`)
    <output_dir>/shards/<split>-<index:05d>.json      completion marker with the shard's counts
    <output_dir>/run_config.json                      what produced the run (model, revision, prompt, ...)
    <output_dir>/summary.json                         totals, written once every shard is done
    <output_dir>/digest_cache.json                    sha256 of local model files by path, size and mtime

A stream (`--streaming`) is split by its source shards (files, or Parquet row groups when there are fewer
files than processes): source shard `j` goes to process `j % num_processes`, which alone reads it, in chunks of
`shard_size` rows written as `data/<split>-<j:05d>-<chunk:05d>.parquet`; each chunk's marker holds the stream
state after its last row, so a resumed run continues each source shard from there without reading the
finished chunks again.

A shard counts as done only when its marker exists; the marker is written after the data file, so a run
killed at any moment and started again skips finished shards, redoes the unfinished one and ends with
exactly one row per input row.

A finished shard is only skipped when it was made from the same input by the same model: its marker records a
digest of the shard's input ids, of the source's identity (its files and their sizes), of the model (each
weight file's sha256 for a local directory; the commit for a Hub id, else the id and revision) and of the
prompt and generation settings, and a resumed or repeated run recomputes them and refuses, naming the shard,
what changed and `--overwrite_output_dir`, rather than mixing two inputs or two models in one output.

The source, the row id and empty texts follow the data contract (`alip_hf.sources`, the rules training and the
audit use too): a source is anything `sources.load_source` reads (`demo` included); the id is the `--id_column`
(default `id`) when the source has it, else the `id` img2dataset saved in each sample's `json` (`alip_hf.web` asks
it to), else WebDataset's `__key__`; it is written as `id`. New values are looked up by id, never by position, and
ids must be unique.
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

from tqdm.auto import tqdm

from alip_hf import sources  # the data contract; imports only the standard library up front
from alip_hf.identity import identity_differences, sha256_file, sha256_json
from alip_hf.io import write_json_atomic, write_with_atomically
from alip_hf.lazy import lazy_import
from alip_hf.schema import ERROR, ID, IMAGE

logger = logging.getLogger(__name__)

# Loaded on first use: `python -m recaption.<step> --help` must not wait for torch and datasets.
datasets = lazy_import("datasets")
pq = lazy_import("pyarrow.parquet")


@dataclass
class RunArguments:
    """Where the rows come from, where they go, and how the work is split."""

    source: str = field(
        metadata={"help": "Hub id, save_to_disk dir, Parquet/JSON/CSV file or glob, WebDataset shards, or 'demo' "
                          "(the bundled demo data)."}
    )
    output_dir: str = field(metadata={"help": "Where the Parquet shards, markers and summary are written."})
    split: str = field(default="train", metadata={"help": "Split of the source to read."})
    streaming: bool = field(default=False, metadata={"help": "Read the source lazily (large Hub datasets)."})
    id_column: str = field(default=ID, metadata={
        "help": "Stable key column; if absent, img2dataset's `json.id`, else WebDataset's `__key__`."})
    image_column: str = field(default=IMAGE, metadata={"help": "Image column of the source."})
    shard_size: int = field(
        default=1000, metadata={"help": "Rows per output shard (the unit of resume and of work split)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete earlier results instead of resuming."})

    def __post_init__(self):
        if self.shard_size < 1:
            raise ValueError(f"--shard_size must be >= 1, got {self.shard_size}")
        overlap = output_overlaps_source(self.output_dir, self.source)
        if overlap:
            # Checked before anything is written: --overwrite_output_dir would delete the source.
            raise ValueError(f"--output_dir {self.output_dir} {overlap} --source {self.source}; "
                             "write the results to a directory apart from the source")


def _inside(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies under it (both already real paths)."""
    return os.path.commonpath([path, directory]) == directory


def output_overlaps_source(output_dir: str, source: str) -> str | None:
    """How `output_dir` overlaps the local source (`"is"`, `"contains"`, `"lies inside"`), or None."""
    files = sources.local_files(source)
    if files is None:
        return None  # a Hub id
    out = os.path.realpath(output_dir)
    if os.path.isdir(source):
        root = os.path.realpath(source)
        if out == root:
            return "is"
        if _inside(root, out):
            return "contains"
        if _inside(out, root):
            return "lies inside"
    for path in files:
        path = os.path.realpath(path)
        if path == out:
            return "is"
        if _inside(path, out):
            return "contains"
    return None


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


def load_image(value):
    """A PIL RGB image from an image cell, decoded by `data.decode_image` (the decoder train.py uses, so a row
    flagged unreadable here is exactly a row train.py would skip)."""
    from alip_hf.data import decode_image  # torch: imported where images are decoded, not for --help

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


# ----------------------------------------------------------------------------- identities of input and model


# "real path|size|mtime_ns" -> sha256 of the file; filled from and saved to <output_dir>/digest_cache.json, so that
# a resumed run does not read a large model's weights once more just to hash them.
_FILE_DIGESTS: dict[str, str] = {}
DIGEST_CACHE = "digest_cache.json"


def file_sha256(path: str) -> str:
    """sha256 of a file, hex (the digest the Hub shows for LFS files); cached by real path, size and mtime."""
    stat = os.stat(path)
    key = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    if key not in _FILE_DIGESTS:
        _FILE_DIGESTS[key] = sha256_file(path)
    return _FILE_DIGESTS[key]


def _load_digest_cache(output_dir: str) -> None:
    try:
        with open(os.path.join(output_dir, DIGEST_CACHE), encoding="utf-8") as f:
            _FILE_DIGESTS.update(json.load(f))
    except (OSError, ValueError):
        pass  # no cache yet, or an unreadable one: the files are hashed again


def _save_digest_cache(output_dir: str, identity: dict | None) -> None:
    """Keeps the digests of this run's model files (only those: the cache stays as small as the model)."""
    files = set((identity or {}).get("files", {}).values())
    entries = {k: v for k, v in _FILE_DIGESTS.items() if v in files}
    if entries:
        atomic_write_json(os.path.join(output_dir, DIGEST_CACHE), entries)


# What `from_pretrained` reads from a model directory: weights, configs, tokenizer and processor files, remote
# code. Logs, cards and sub-directories (a training run's checkpoints/, clip_export/, sample_weights/) are not
# the model: a run that writes them later must not make the same weights look like another model.
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model", ".tiktoken", ".py",
                       ".jinja")


def model_files(model_dir: str) -> list[str]:
    """The files of a local model directory that define the model (top level only), sorted."""
    return sorted(entry.path for entry in os.scandir(model_dir)
                  if entry.is_file() and not entry.name.startswith(".") and entry.name.endswith(MODEL_FILE_SUFFIXES))


def model_identity(model: str, revision: str | None, commit: str | None) -> dict[str, Any]:
    """What identifies the weights a step ran: every file of a local model directory with its sha256 (weights
    replaced at the same path must not pass as the same model), else the Hub commit, else the id and revision
    (a Hub model whose commit could not be resolved)."""
    if os.path.isdir(model):
        return {"files": {os.path.basename(f): file_sha256(f) for f in model_files(model)}}
    if commit:
        return {"id": model, "commit": commit}
    return {"id": model, "revision": revision}


def source_identity(args: "RunArguments") -> dict[str, Any]:
    """The source as named, its split and, for local sources, its files with their sizes (a file replaced by
    another of a different size, or files added or removed, change it). Hub sources: name and split; their
    rows are checked through the ids of each shard."""
    files = sources.local_files(args.source)
    identity: dict[str, Any] = {"source": args.source, "split": args.split}
    if files is not None:
        base = args.source if os.path.isdir(args.source) else os.path.dirname(files[0]) if files else ""
        identity["files"] = {os.path.relpath(f, base or "."): os.path.getsize(f) for f in files if os.path.isfile(f)}
    return identity


# The parts of a run's configuration that each shard marker records a digest of.
_MODEL_KEYS = ("model", "revision", "commit", "model_identity")
_SOURCE_KEYS = ("source", "split", "id_column", "source_identity")


def identity_digests(config: dict) -> dict[str, str]:
    """`{"source", "model", "settings"}` digests of a run configuration (settings: everything else: the step,
    shard size, prompt and its version, generation settings, labels)."""
    parts = {"source": {k: config.get(k) for k in _SOURCE_KEYS}, "model": {k: config.get(k) for k in _MODEL_KEYS}}
    parts["settings"] = {k: v for k, v in config.items() if k not in _MODEL_KEYS + _SOURCE_KEYS}
    return {name: sha256_json(value) for name, value in parts.items()}


# ----------------------------------------------------------------------------- input


@dataclass
class Input:
    dataset: datasets.Dataset | datasets.IterableDataset
    id_column: str
    features: datasets.Features | None  # as read, to restore decodable images when writing


def load_input(args: RunArguments, required: dict[str, str]) -> Input:
    """Loads the source, checks the needed columns and the id, and turns image decoding off (images are
    decoded one by one so that an unreadable one becomes an `error` value, not a crash)."""
    dataset = sources.load_source(args.source, split=args.split, streaming=args.streaming)
    id_column = sources.resolve_id_column(dataset, args.id_column)
    sources.require_columns(dataset, required)
    from alip_hf.data import undecoded_images

    return Input(undecoded_images(dataset, args.image_column), id_column, dataset.features)


def iter_shards(
    dataset: datasets.Dataset,
    shard_size: int,
    rank: int,
    world: int,
    skip: set[int],
    id_column: str | None = None,
) -> Iterator[tuple[int, datasets.Dataset | list[str] | None]]:
    """(index, rows) for every shard of this process of a map-style dataset; for shards in `skip`, rows is the
    list of the shard's ids (as strings) when `id_column` is given (so finished shards can be checked against the
    input), else None. Streams go through `iter_stream_chunks`."""
    ids_only = (dataset.select_columns([sources.id_source_column(id_column, dataset.column_names)])
                if id_column else None)
    for index in range(rank, math.ceil(len(dataset) / shard_size), world):
        rows = range(index * shard_size, min((index + 1) * shard_size, len(dataset)))
        if index not in skip:
            yield index, dataset.select(rows)
        else:
            yield index, None if ids_only is None else sources.read_ids(ids_only.select(rows), id_column)


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
    """Creates the layout; refuses to resume into results produced by a different configuration, naming each
    changed field and the shards already written with the earlier one."""
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
        changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
        if changed:
            done = sorted(_done_shards(args))
            written = (f"; shards already written with the earlier one: {_shard_list(args, done)}" if done else "")
            raise ValueError(
                f"{args.output_dir} holds results of another configuration: "
                f"{'; '.join(_describe_change(k, previous.get(k), config.get(k)) for k in changed)}{written}. "
                "Resuming would mix the two in one output; use another --output_dir or pass --overwrite_output_dir "
                "to start over"
            )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not os.path.exists(path):
        atomic_write_json(path, config)


def _shard_list(args: RunArguments, indices: list[int], limit: int = 5) -> str:
    names = [shard_name(args.split, i) for i in indices[:limit]]
    return ", ".join(names) + (f" and {len(indices) - limit} more" if len(indices) > limit else "")


def _describe_change(key: str, before: Any, now: Any) -> str:
    """One changed configuration field in words; file maps (model files, source files) by the files that differ."""
    if isinstance(before, dict) and isinstance(now, dict) and key in ("model_identity", "source_identity"):
        parts = []
        for sub in sorted(set(before) | set(now)):
            if before.get(sub) == now.get(sub):
                continue
            old, new = before.get(sub), now.get(sub)
            if isinstance(old, dict) and isinstance(new, dict):
                files = sorted(f for f in set(old) | set(new) if old.get(f) != new.get(f))
                shown = ", ".join(f"{f} ({_short(old.get(f))} -> {_short(new.get(f))})" for f in files[:5])
                parts.append(f"{sub}: {shown}" + (f" and {len(files) - 5} more" if len(files) > 5 else ""))
            else:
                parts.append(f"{sub}: {old!r} -> {new!r}")
        what = {"model_identity": "model weights changed", "source_identity": "source changed"}[key]
        return f"{what} ({'; '.join(parts)})"
    return f"{key}: {_short(before)} -> {_short(now)}"


def _short(value: Any) -> str:
    if value is None:
        return "absent"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"sha256 {value[:12]}"
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _done_shards(args: RunArguments) -> set[int]:
    """Indices of the finished map-style shards (stream chunks, `<split>-<j>-<chunk>`, are not numbers)."""
    done = set()
    for marker in glob.glob(os.path.join(args.output_dir, "shards", f"{args.split}-*.json")):
        name = os.path.basename(marker)[len(args.split) + 1 : -len(".json")]
        if name.isdigit():
            done.add(int(name))
    return done


def _markers(args: RunArguments) -> dict[str, dict]:
    """name -> completion marker of every finished shard (or stream chunk) of the split."""
    found = {}
    for marker in glob.glob(os.path.join(args.output_dir, "shards", f"{args.split}-*.json")):
        with open(marker, encoding="utf-8") as f:
            found[os.path.basename(marker)[: -len(".json")]] = json.load(f)
    return found


def verify_done_chunks(args: RunArguments, dataset: datasets.IterableDataset, source_shard: int,
                       finished: list[dict], id_column: str, identity: dict[str, str]) -> None:
    """Refuses finished chunks of a source shard made from another source, model or settings.

    Their input ids are re-read (the id column only) when the source's identity has no files to vouch for it (a
    Hub source); for local files the source digest (their names and sizes) does, and a resume reads none of the
    finished rows.

    Raises:
        ValueError: naming the chunk, what changed and `--overwrite_output_dir`.
    """
    for marker in finished:
        recorded = marker.get("identity") or {}
        changed = list(identity_differences(recorded, identity))  # of source, model, settings
        if changed:
            _refuse(args, stream_chunk_name(args.split, source_shard, marker["chunk"]),
                    f"it was made with another {' and '.join(changed)} ({'; '.join(changed)} digest differs)")
    if "files" in (source_identity(args) or {}):
        return
    head = sources.id_source_column(id_column, dataset.column_names)
    rows = iter(dataset.shard(num_shards=dataset.num_shards, index=source_shard, contiguous=True)
                .select_columns([head]))
    for marker in finished:
        taken = list(itertools.islice(rows, args.shard_size))
        ids = [sources.read_id(row, id_column) for row in taken]
        if marker.get("ids_sha256", sha256_json(ids)) != sha256_json(ids):
            _refuse(args, stream_chunk_name(args.split, source_shard, marker["chunk"]),
                    f"its input ids changed: it was made from {marker['rows']} rows starting at id "
                    f"{marker.get('first_id')!r}; the source's rows for it now number {len(ids)}, starting at id "
                    f"{ids[0] if ids else None!r} (the source was replaced or reordered)")


def _refuse(args: RunArguments, name: str, problem: str) -> None:
    raise ValueError(f"finished shard {name} in {args.output_dir} does not match this run: {problem}. Skipping it "
                     "would mix two inputs or two models in one output; pass --overwrite_output_dir to start over "
                     "(or use another --output_dir)")


def _read_marker(args: RunArguments, index: int) -> dict:
    with open(os.path.join(args.output_dir, "shards", f"{shard_name(args.split, index)}.json"), encoding="utf-8") as f:
        return json.load(f)


def verify_done_shard(args: RunArguments, index: int, ids: list[str], identity: dict[str, str]) -> None:
    """Refuses a finished shard that was not made from these ids by this model with these settings.

    Raises:
        ValueError: naming the shard, what changed (its input ids; the source, model or settings digest) and
            `--overwrite_output_dir`.
    """
    name = shard_name(args.split, index)
    marker = _read_marker(args, index)
    recorded = marker.get("identity")
    if recorded is None or "ids_sha256" not in marker:
        problem = "its marker records no input digest (written by an earlier version), so it cannot be checked"
    elif marker["ids_sha256"] != sha256_json(ids):
        problem = (f"its input ids changed: it was made from {marker['rows']} rows starting at id "
                   f"{marker.get('first_id')!r}; the source's rows for it now number {len(ids)}, starting at id "
                   f"{ids[0] if ids else None!r} (the source was replaced or reordered)")
    else:
        changed = list(identity_differences(recorded, identity))  # of source, model, settings
        if not changed:
            return
        problem = f"it was made with another {' and '.join(changed)} ({'; '.join(changed)} digest differs)"
    _refuse(args, name, problem)


def _check_no_extra_shards(args: RunArguments, num_shards: int, rows_in: int) -> None:
    """Refuses finished shards beyond the source's end: they hold rows of an earlier, longer source."""
    extra = sorted(i for i in _done_shards(args) if i >= num_shards)
    if extra:
        raise ValueError(
            f"{args.output_dir} holds finished shards {_shard_list(args, extra)} beyond the source's {rows_in} rows "
            f"({num_shards} shards): they come from an earlier, longer source. Pass --overwrite_output_dir to start "
            "over (or use another --output_dir)")


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
    provenance = step.provenance()
    model = provenance.get("model")
    _load_digest_cache(args.output_dir)
    config = {"step": step.name, "source": args.source, "split": args.split, "id_column": source.id_column,
              "shard_size": args.shard_size, "source_identity": source_identity(args), **provenance,
              "model_identity": model_identity(model, provenance.get("revision"), provenance.get("commit"))
              if model else None}
    if isinstance(source.dataset, datasets.IterableDataset):
        source = dataclasses.replace(source, dataset=stream_sources(source.dataset, accelerator.num_processes))
        config["stream_shards"] = source.dataset.num_shards  # the unit of the work split and of resume
    config = json.loads(json.dumps(config, default=str))  # compared with its JSON copy when resuming
    identity = identity_digests(config)
    _prepare_output(args, config, accelerator)
    if accelerator.is_main_process:
        _save_digest_cache(args.output_dir, config["model_identity"])
    done = _done_shards(args)
    rank, world = accelerator.process_index, accelerator.num_processes
    if isinstance(source.dataset, datasets.Dataset):  # a stream's length is known only once read
        rows_in = len(source.dataset)
        _check_no_extra_shards(args, math.ceil(rows_in / args.shard_size), rows_in)

    total = None
    if isinstance(source.dataset, datasets.Dataset):
        owned = range(rank, math.ceil(len(source.dataset) / args.shard_size), world)
        total = sum(min(args.shard_size, len(source.dataset) - i * args.shard_size) for i in owned if i not in done)
    bar = tqdm(total=total, unit=step.unit, desc=f"{step.name} [{rank}/{world}]",
               position=rank, dynamic_ncols=True)
    started = time.time()

    def write(name: str, shard: datasets.Dataset, fields: dict) -> None:
        ids = sources.read_ids(shard, source.id_column)
        repeated = sources.duplicate_ids(ids)
        if repeated:
            raise ValueError(f"ids {repeated} appear more than once in column {source.id_column!r}; ids must be "
                             "unique")
        result = step.process(shard, ids, bar.update)
        out = _join(shard, ids, result, source.features, args.image_column)
        atomic_write_parquet(out, os.path.join(args.output_dir, "data", f"{name}.parquet"))
        atomic_write_json(
            os.path.join(args.output_dir, "shards", f"{name}.json"),
            {**fields, "rows": len(ids), "process_index": rank, "counts": result.counts,
             "seconds": time.time() - started, "ids_sha256": sha256_json(ids), "first_id": ids[0],
             "identity": identity},
        )

    if isinstance(source.dataset, datasets.Dataset):
        for index, shard in iter_shards(source.dataset, args.shard_size, rank, world, done, source.id_column):
            if isinstance(shard, list):  # finished earlier: only its ids, to check it against this input
                verify_done_shard(args, index, shard, identity)
                continue
            write(shard_name(args.split, index), shard, {"index": index})
    else:
        markers = _markers(args)
        for source_shard in range(rank, source.dataset.num_shards, world):
            finished = sorted((m for m in markers.values() if m.get("source_shard") == source_shard),
                              key=lambda m: m["chunk"])
            if finished:
                verify_done_chunks(args, source.dataset, source_shard, finished, source.id_column, identity)
        for name, shard, fields in iter_stream_chunks(source.dataset, args.shard_size, rank, world, args.split,
                                                      markers):
            if shard is not None:
                write(name, shard, fields)
            else:  # the source shard ended on a chunk boundary: an end marker, no data file
                atomic_write_json(os.path.join(args.output_dir, "shards", f"{name}.json"),
                                  {**fields, "rows": 0, "process_index": rank, "counts": {}, "identity": identity})
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
    if names and names[0] == shard_name(args.split, 0):  # map-style
        _check_no_extra_shards(args, num_shards, rows_in)
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

