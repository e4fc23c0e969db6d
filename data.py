"""The data contract between recaption/ and train.py, and loading image-text data from any source.

Column names and their `datasets.Features` are defined once here; `recaption/` writes them and `train.py`
reads them by default, so a recaptioned dataset trains without flags. Users whose data uses other names
map them by argument.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import datasets

# The data contract.
ID = "id"  # stable key: new columns are joined on it, never on row order
IMAGE = "image"
ALT_TEXT = "alt_text"  # the web text (AltText, title, ...)
CAPTION = "caption"  # synthetic caption written from the image alone
VECAP = "vecap"  # LLM fusion of alt_text and caption (VeCLIP)
CAPTION_MODEL = "caption_model"
CAPTION_PROMPT_VERSION = "caption_prompt_version"
REWRITE_MODEL = "rewrite_model"
REWRITE_PROMPT_VERSION = "rewrite_prompt_version"
ERROR = "error"  # why a row failed (empty when it did not)

FEATURES = datasets.Features(
    {
        ID: datasets.Value("string"),
        IMAGE: datasets.Image(),
        ALT_TEXT: datasets.Value("string"),
        CAPTION: datasets.Value("string"),
        VECAP: datasets.Value("string"),
        CAPTION_MODEL: datasets.Value("string"),
        CAPTION_PROMPT_VERSION: datasets.Value("string"),
        REWRITE_MODEL: datasets.Value("string"),
        REWRITE_PROMPT_VERSION: datasets.Value("string"),
        ERROR: datasets.Value("string"),
    }
)

# Columns that only exist after a recaption step, with the step that writes them.
PRODUCED_BY = {CAPTION: "python -m recaption.caption", VECAP: "python -m recaption.rewrite"}

_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tar": "webdataset"}


def _data_files(source: str) -> list[str]:
    """Files named by a path or a glob, sorted so every process sees the same order."""
    return sorted(glob.glob(source)) if any(ch in source for ch in "*?[") else [source]


def load_source(
    source: str, split: str = "train", streaming: bool = False
) -> datasets.Dataset | datasets.IterableDataset:
    """Loads image-text data from a `save_to_disk` directory, local files, WebDataset shards or the Hub.

    Args:
        source: one of
            - a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
            - a Parquet/JSON(L)/CSV file or a glob of them (`data/*.parquet`), all read as `split`;
            - a directory of such files or of WebDataset shards, split by file name as on the Hub
              (`train-00000-of-00004.parquet`, `test.parquet`, `train/0000.tar`);
            - WebDataset `.tar` shards (img2dataset's format): a file, a glob, or a brace pattern
              (`shards/{00000..00099}.tar`);
            - a Hub dataset id (`org/name`).
        split: the split to read.
        streaming: return an `IterableDataset` that reads lazily.

    Raises:
        FileNotFoundError: a local path or pattern that matches nothing.
        ValueError: a split that the source does not have, or files of mixed or unknown formats.
    """
    if os.path.isdir(source) and _is_saved_dataset(source):
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{source} has splits {list(loaded)}, not {split!r}")
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if streaming else loaded
    if os.path.isdir(source):
        # Split names come from the file names, as on the Hub (`train-00000.parquet`, `test/...`).
        return datasets.load_dataset(source, split=split, streaming=streaming)
    if "{" in source and ".tar" in source:
        files = _expand_braces(source)
    elif _looks_local(source):
        files = _data_files(source)
        if not files or not all(os.path.exists(f) for f in files):
            raise FileNotFoundError(f"no data files found at {source!r}")
    else:
        return datasets.load_dataset(source, split=split, streaming=streaming)
    builders = {_FILE_BUILDERS.get(Path(f).suffix) for f in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"{source!r}: expected files of one format among {sorted(_FILE_BUILDERS)}, got {files[:5]}")
    return datasets.load_dataset(builders.pop(), data_files={split: files}, split=split, streaming=streaming)


def _is_saved_dataset(path: str) -> bool:
    return any((Path(path) / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _looks_local(source: str) -> bool:
    return os.path.exists(source) or source.startswith((".", "/", "~")) or any(ch in source for ch in "*?[") or (
        Path(source).suffix in _FILE_BUILDERS
    )


def _expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> `["a/000.tar", "a/001.tar", "a/002.tar"]` (img2dataset's shard notation)."""
    head, rest = pattern.split("{", 1)
    body, tail = rest.split("}", 1)
    if ".." in body:
        lo, hi = body.split("..")
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [f for item in items for f in _expand_braces(head + item + tail)] if "{" in tail else [
        head + item + tail for item in items
    ]


def require_columns(dataset: datasets.Dataset | datasets.IterableDataset, columns: dict[str, str | None]) -> None:
    """Fails at once, listing the available columns, when a needed column is missing.

    Args:
        dataset: the loaded data.
        columns: role -> column name (e.g. `{"image": "jpg", "text": "txt"}`); `None` names are skipped.
    """
    available = list(dataset.column_names or (dataset.features or {}).keys())
    for role, name in columns.items():
        if name is None or name in available:
            continue
        hint = f"; run `{PRODUCED_BY[role]}` first to add it" if role in PRODUCED_BY else ""
        raise ValueError(f"column {name!r} ({role}) not found; available columns: {available}{hint}")
