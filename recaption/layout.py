"""The output directory of a recaption run and its completion markers.

    <output_dir>/data/<split>-<index:05d>.parquet     the data (temp file, then `os.replace`)
    <output_dir>/shards/<split>-<index:05d>.json      completion marker with the shard's counts
    <output_dir>/run_config.json                      what produced the run (model, revision, prompt, ...)
    <output_dir>/summary.json                         totals, written once every shard is done
    <output_dir>/digest_cache.json                    sha256 of local model files by path, size and mtime

Streams write `<split>-<source shard:05d>-<chunk:05d>` instead of `<split>-<index:05d>`. A shard counts as done
only when its marker exists; the marker is written after the data file.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from typing import Any

from alip_hf.io import write_json_atomic, write_with_atomically
from alip_hf.lazy import lazy_import
from recaption.arguments import RunArguments
from recaption.workers import Worker

datasets = lazy_import("datasets")


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


def stream_chunk_name(split: str, source_shard: int, chunk: int) -> str:
    return f"{split}-{source_shard:05d}-{chunk:05d}"


def prepare_output(args: RunArguments, config: dict, worker: Worker) -> None:
    """Creates the layout; refuses to resume into results produced by a different configuration, naming each
    changed field and the shards already written with the earlier one."""
    if worker.is_main:
        create_layout(args, worker)
    worker.wait()
    check_config(args, config)
    worker.wait()
    if worker.is_main:
        save_config(args, config)


def create_layout(args: RunArguments, worker: Worker) -> None:
    """The `data/` and `shards/` folders (after deleting earlier results with `--overwrite_output_dir`), without
    the temporary files of a killed run."""
    if args.overwrite_output_dir and os.path.isdir(args.output_dir):
        shutil.rmtree(args.output_dir)
    for sub in ("data", "shards"):
        os.makedirs(os.path.join(args.output_dir, sub), exist_ok=True)
    remove_stale_files(args, worker)


def check_config(args: RunArguments, config: dict) -> None:
    """Refuses to resume into results of another configuration, naming each changed field and the shards
    already written with the earlier one."""
    path = os.path.join(args.output_dir, "run_config.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
    if changed:
        done = sorted(done_shards(args))
        written = (f"; shards already written with the earlier one: {shard_list(args, done)}" if done else "")
        raise ValueError(
            f"{args.output_dir} holds results of another configuration: "
            f"{'; '.join(_describe_change(k, previous.get(k), config.get(k)) for k in changed)}{written}. "
            "Resuming would mix the two in one output; use another --output_dir or pass --overwrite_output_dir "
            "to start over"
        )


def save_config(args: RunArguments, config: dict) -> None:
    """`run_config.json`, unless there (independent workers may race here: they write the same bytes, atomically)."""
    path = os.path.join(args.output_dir, "run_config.json")
    if not os.path.exists(path):
        atomic_write_json(path, config)


def remove_stale_files(args: RunArguments, worker: Worker) -> None:
    """Removes the temporary files a killed run left. In a process group nobody writes yet (every process waits
    for the main one); a scheduler task removes only those of its own shards, as the other tasks may be writing."""
    pattern = re.compile(rf"^\.{re.escape(args.split)}-(\d+)")
    for stale in glob.glob(os.path.join(args.output_dir, "*", ".*.tmp")):
        match = pattern.match(os.path.basename(stale))
        if worker.in_group or (match and worker.owns(int(match.group(1)))):
            try:
                os.remove(stale)
            except FileNotFoundError:
                pass


def shard_list(args: RunArguments, indices: list[int], limit: int = 5) -> str:
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


def done_shards(args: RunArguments) -> set[int]:
    """Indices of the finished map-style shards (stream chunks, `<split>-<j>-<chunk>`, are not numbers)."""
    done = set()
    for marker in glob.glob(os.path.join(args.output_dir, "shards", f"{args.split}-*.json")):
        name = os.path.basename(marker)[len(args.split) + 1 : -len(".json")]
        if name.isdigit():
            done.add(int(name))
    return done


def read_markers(args: RunArguments) -> dict[str, dict]:
    """name -> completion marker of every finished shard (or stream chunk) of the split."""
    found = {}
    for marker in glob.glob(os.path.join(args.output_dir, "shards", f"{args.split}-*.json")):
        with open(marker, encoding="utf-8") as f:
            found[os.path.basename(marker)[: -len(".json")]] = json.load(f)
    return found

def read_marker(args: RunArguments, index: int) -> dict:
    with open(os.path.join(args.output_dir, "shards", f"{shard_name(args.split, index)}.json"), encoding="utf-8") as f:
        return json.load(f)
