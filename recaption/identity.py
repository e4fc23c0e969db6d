"""Identities of a run's input and model: the digests a completion marker records, so that a finished shard is
only skipped when it was made from the same input by the same model with the same settings."""

from __future__ import annotations

import json
import os
from typing import Any

from alip_hf import sources
from alip_hf.identity import sha256_file, sha256_json
from recaption.arguments import RunArguments
from recaption.layout import atomic_write_json


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


def load_digest_cache(output_dir: str) -> None:
    try:
        with open(os.path.join(output_dir, DIGEST_CACHE), encoding="utf-8") as f:
            _FILE_DIGESTS.update(json.load(f))
    except (OSError, ValueError):
        pass  # no cache yet, or an unreadable one: the files are hashed again


def save_digest_cache(output_dir: str, identity: dict | None) -> None:
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
