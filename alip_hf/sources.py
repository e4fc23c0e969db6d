"""The data contract's rules: what a data source can be and how it is read, which column is a row's id, and which
texts count as empty.

Training (`alip_hf.training.data`), the recaption steps and the noise audit (`recaption/`) and evaluation
(`alip_hf.evaluation`) all read data through this module, so a source, an id and an empty text mean the same in
every command. The column names themselves are in `alip_hf.schema`.

- **Sources** (`resolve_source`, `load_source`, `local_files`): the name `demo` (the bundled demo data); a
  `save_to_disk` directory; a Parquet/JSON(L)/CSV file, a glob of them or a directory of them split by file name
  as on the Hub; WebDataset `.tar` shards (img2dataset's format) as a file, glob, directory or brace pattern;
  anything else is a Hub dataset id. Damaged local files are errors naming the file (and the tar member or the
  line): shards cut short, tar members that are links, text files that are not UTF-8, `.parquet` files that are
  not Parquet.
- **Row ids** (`resolve_id_column`, `read_id`, `read_ids`): `--id_column` (default `id`) when the source has it,
  else the `id` that img2dataset's `--save_additional_columns '["id"]'` keeps in each sample's `json` (what
  `python -m alip_hf.web` writes), read as `json.id`; else WebDataset's `__key__` (a position in one download, not
  stable across downloads). Recaption outputs, the audit and `train.py --log_sample_weights` are all joined on it.
- **Empty texts** (`is_empty_text`): a text is empty when it is missing, not a string, or has no printable,
  non-space character once HTML entities are unescaped (`"&nbsp;"`, a zero-width space, NUL). Training skips
  such rows and counts them; recaption writes an `error` for them; the audit does not score them.

Only the standard library is imported at module level (`datasets` on first use), so that `--help` of every command
stays fast.
"""

from __future__ import annotations

import glob
import html
import os
import tarfile
from pathlib import Path
from typing import Any

from alip_hf.lazy import lazy_import
from alip_hf.resources import DEMO_DATA
from alip_hf.schema import ID, PRODUCED_BY

datasets = lazy_import("datasets")

DEMO = "demo"  # the name of the bundled demo data (`alip_hf/demo_data`, docs/demo_data.md) in every command
WEBDATASET_KEY = "__key__"  # WebDataset's sample key: the member names up to their first dot
IMG2DATASET_METADATA = "json"  # img2dataset writes each sample's metadata (url, status, saved columns) there

_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tar": "webdataset"}


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


def resolve_source(source: str) -> str:
    """`demo` -> the bundled demo data's directory; any other source unchanged."""
    return str(DEMO_DATA) if source == DEMO else source


def is_demo_data(source: str) -> bool:
    """Whether `source` is the bundled demo data (its name `demo` or its packaged path)."""
    if source == DEMO:
        return True
    path = Path(source)
    return path.exists() and DEMO_DATA.exists() and path.resolve() == DEMO_DATA.resolve()


def _data_files(source: str) -> list[str]:
    """Files named by a path or a glob, sorted so every process sees the same order."""
    return sorted(glob.glob(source)) if any(ch in source for ch in "*?[") else [source]


def load_source(
    source: str, split: str = "train", streaming: bool = False, config_name: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Loads image-text data from the demo data, a `save_to_disk` directory, local files, WebDataset shards or the
    Hub.

    Args:
        source: one of
            - `demo`: the bundled demo data (offline, on a fresh cache);
            - a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
            - a Parquet/JSON(L)/CSV file or a glob of them (`data/*.parquet`), all read as `split`;
            - a directory of such files or of WebDataset shards, split by file name as on the Hub
              (`train-00000-of-00004.parquet`, `test.parquet`, `train/0000.tar`);
            - WebDataset `.tar` shards (img2dataset's format): a file, a glob, or a brace pattern
              (`shards/{00000..00099}.tar`);
            - a Hub dataset id (`org/name`).
        split: the split to read.
        streaming: return an `IterableDataset` that reads lazily.
        config_name: the configuration (subset) of a Hub dataset or dataset directory (`load_dataset`'s `name`).
        cache_dir: where `datasets` caches what it downloads and prepares.

    Raises:
        FileNotFoundError: a local path or pattern that matches nothing.
        ValueError: a split that the source does not have, files of mixed or unknown formats, or a damaged file
            (named, with its tar member or line).
    """
    source = resolve_source(source)
    hub = {"name": config_name, "cache_dir": cache_dir}
    if config_name is not None and (_is_saved_dataset(source) if os.path.isdir(source) else _looks_local(source)):
        raise ValueError(f"--dataset_config_name {config_name!r}: {source!r} is a saved dataset or data files, "
                         "which have no configurations; it applies to Hub datasets and dataset directories")
    if os.path.isdir(source) and _is_saved_dataset(source):
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{source} has splits {list(loaded)}, not {split!r}")
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if streaming else loaded
    if os.path.isdir(source):
        files = local_files(source)
        check_files(files)
        # Split names come from the file names, as on the Hub (`train-00000.parquet`, `test/...`).
        return _load_files(source, files, source, split=split, streaming=streaming, **hub)
    if "{" in source and ".tar" in source:
        files = _expand_braces(source)
    elif _looks_local(source):
        files = _data_files(source)
        if not files or not all(os.path.exists(f) for f in files):
            raise FileNotFoundError(f"no data files found at {source!r}")
    else:
        return datasets.load_dataset(source, split=split, streaming=streaming, **hub)
    builders = {_FILE_BUILDERS.get(Path(f).suffix) for f in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"{source!r}: expected files of one format among {sorted(_FILE_BUILDERS)}, got {files[:5]}")
    check_files(files)
    return _load_files(source, files, builders.pop(), data_files={split: files}, split=split, streaming=streaming,
                       cache_dir=cache_dir)


def _load_files(source: str, files: list[str], path: str, split: str, **kwargs):
    """`datasets.load_dataset` on local files, with an error naming the source when they hold no rows (datasets
    says "Instruction 'train' corresponds to no data!" for empty Parquet files and raises a bare StopIteration
    for empty JSON ones), and naming the damaged file (and member or line) when a reader fails on one."""
    try:
        return datasets.load_dataset(path, split=split, **kwargs)
    except StopIteration:
        raise ValueError(f"{source} (split {split!r}) has no rows: its files are empty") from None
    except Exception as error:  # noqa: BLE001 - re-raised as is unless a damaged file explains it
        if isinstance(error, ValueError) and "corresponds to no data" in str(error):
            raise ValueError(f"{source} (split {split!r}) has no rows") from error
        problem = find_damaged_file(files)
        if problem is not None:
            raise ValueError(problem) from error
        raise


def local_files(source: str) -> list[str] | None:
    """The local files `source` reads (as `load_source` resolves it), sorted; `None` for a Hub id.

    A directory gives every file under it except hidden ones (`.cache`, temporary files)."""
    source = resolve_source(source)
    if os.path.isdir(source):
        found = []
        for root, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
        return found
    if "{" in source and ".tar" in source:
        return _expand_braces(source)
    if _looks_local(source):
        return _data_files(source)
    return None


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


# ----------------------------------------------------------------------------------------------------------------
# Damaged files
#
# The readers' own messages name neither the file nor the place, or there is no message at all: datasets says a
# tar "should be in WebDataset format" when the first shard holds a link member and reads a link in a later shard
# as a sample without error; Python's codec says "can't decode byte 0xff in position 4" (which file? which line?),
# and only once the row is read; pyarrow says "Parquet magic bytes not found in footer". So local files are checked
# before every load (`check_files`): tar member headers, UTF-8 of text files, Parquet's markers. The checks read
# headers, markers and text, never images; a Parquet footer is read only once a reader has failed on it.
# ----------------------------------------------------------------------------------------------------------------


def check_files(files: list[str]) -> None:
    """Fails fast on the first damaged local file, naming it (and its tar member or line): a WebDataset shard cut
    short or holding a member that is not a regular file, a JSON(L)/CSV file that is not UTF-8, a `.parquet` file
    without Parquet's markers."""
    check_webdataset_shards([f for f in files if f.endswith(".tar")])
    for path in files:
        suffix = Path(path).suffix
        if suffix == ".tar":
            problem = _tar_member_problem(path)
        elif suffix in (".json", ".jsonl", ".csv"):
            problem = _text_file_problem(path)
        elif suffix == ".parquet":
            problem = _parquet_problem(path)
        else:
            problem = None
        if problem:
            raise ValueError(problem)


def find_damaged_file(files: list[str]) -> str | None:
    """The first `.parquet` file among `files` whose footer cannot be read, as a message naming it, else None
    (called once a reader has failed: the markers at both ends were checked before loading)."""
    for path in files:
        if path.endswith(".parquet"):
            problem = _parquet_problem(path, footer=True)
            if problem:
                return problem
    return None


def _parquet_problem(path: str, footer: bool = False) -> str | None:
    """Why `path` is not a readable Parquet file (its magic bytes; with `footer`, its metadata), or None."""
    size = os.path.getsize(path)
    if size >= 12:
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(size - 4)
            tail = f.read(4)
        if head == tail == b"PAR1":
            if not footer:
                return None
            import pyarrow.parquet as pq

            try:
                pq.ParquetFile(path)
                return None
            except Exception as error:  # noqa: BLE001 - any reader failure is the message
                return f"{path}: not a readable Parquet file ({error})"
    return (f"{path}: not a Parquet file ({size} bytes without Parquet's 'PAR1' marker at both ends); it is damaged "
            "or of another format under a .parquet name")


def _text_file_problem(path: str) -> str | None:
    """The first line of a JSON(L)/CSV file that is not UTF-8, as a message naming the file and line, or None."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return (f"{path}, line {number}: not valid UTF-8 (byte {line[error.start:error.start + 1]!r} at "
                        f"column {error.start + 1}); re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)")
    return None


def _tar_member_problem(path: str) -> str | None:
    """The first member of a WebDataset shard that is not a regular file (a symbolic or hard link, a device), as a
    message naming the shard and the member, or None. WebDataset samples are regular files; a link's target is
    outside the sample (or the archive), so readers refuse the shard without saying where."""
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isfile() or member.isdir():
                    continue
                kind = ("a symbolic link" if member.issym() else "a hard link" if member.islnk()
                        else "not a regular file")
                target = f" to {member.linkname!r}" if member.linkname else ""
                return (f"WebDataset shard {path}: member {member.name!r} is {kind}{target}; WebDataset samples "
                        "are regular files. Write the shard again with the files themselves (e.g. "
                        "`tar --dereference`), or leave it out of the source.")
    except tarfile.TarError as error:
        return f"WebDataset shard {path}: not a readable tar archive ({error})"
    return None


# WebDataset shards cut short
#
# A tar cut off between two members, or inside a member header, reads as a shorter, valid archive: datasets'
# webdataset builder (5.x) and the `webdataset` package (1.x) both stop there without an error, so a download
# killed half-way trains or captions on part of the shard silently. A cut inside a member's data raises tarfile's
# "unexpected end of data" instead, without naming the file (datasets) or only deep in a traceback. Every tar
# written whole ends with the end-of-archive marker (two zero blocks, padded to a multiple of 512 bytes), so
# checking the last 1024 bytes finds a cut shard at the cost of one small read per shard.


def check_webdataset_shards(files: list[str]) -> None:
    """Fails fast on the first shard that does not end with the end-of-archive marker.

    Raises:
        ValueError: naming the file, the member it ends in or after, and how many samples it holds whole. A
            cut shard is refused rather than skipped: its samples would be missing from training and from every
            recaption step's output (whose row count must equal the source's).
    """
    for path in files:
        size = os.path.getsize(path)
        if size >= 1024 and size % 512 == 0:
            with open(path, "rb") as f:
                f.seek(size - 1024)
                if f.read(1024) == bytes(1024):
                    continue
        raise ValueError(_truncation_report(path, size))


def _truncation_report(path: str, size: int) -> str:
    """What a cut shard still holds whole: the number of complete samples and where it ends."""
    keys, counts, cut_in = [], [], None  # sample keys in order, members per key, the member cut off
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                member = tar.next()
                if member is None:
                    break
                if member.offset_data + member.size > size:
                    cut_in = member.name
                    break
                key = member.name.split(".", 1)[0]  # webdataset's sample key: the name up to the first dot
                if not keys or keys[-1] != key:
                    keys.append(key)
                    counts.append(0)
                counts[-1] += 1
    except tarfile.TarError:
        pass  # the header after the last complete member is cut: what was counted is what there is
    members = sum(counts)
    # The last sample read is whole unless the cut member belongs to it or it has fewer members than the others.
    last_cut = bool(keys) and ((cut_in is not None and cut_in.split(".", 1)[0] == keys[-1])
                               or counts[-1] < max(counts))
    whole = len(keys) - int(last_cut)
    where = f"inside member {cut_in!r}" if cut_in else f"after {members} members without the end-of-archive marker"
    return (f"WebDataset shard {path} is truncated ({size} bytes, ends {where}): only {whole} samples "
            "can be read from it whole, and readers would stop there without an error. Download or write the "
            "shard again, or leave it out of the source.")


# ----------------------------------------------------------------------------------------------------------------
# Columns
# ----------------------------------------------------------------------------------------------------------------


def undecoded_images(dataset, image_column: str):
    """The dataset with `image_column` left as bytes, so that a corrupt image fails in our code, not in `datasets`."""
    features = dataset.features
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def column_names(dataset) -> list[str]:
    """The dataset's columns (a stream whose features are unknown up front: none)."""
    return list(dataset.column_names or (dataset.features or {}).keys())


def require_columns(dataset, columns: dict[str, str | None]) -> None:
    """Fails at once, listing the available columns, when a needed column is missing.

    Args:
        dataset: the loaded data.
        columns: role -> column name (e.g. `{"image": "jpg", "text": "txt"}`); `None` names are skipped.
    """
    available = column_names(dataset)
    for role, name in columns.items():
        if name is None or name in available:
            continue
        hint = f"; run `{PRODUCED_BY[role]}` first to add it" if role in PRODUCED_BY else ""
        raise ValueError(f"column {name!r} ({role}) not found; available columns: {available}{hint}")


_TEXT_DTYPES = ("string", "large_string")


def require_text_columns(dataset, columns: dict[str, str], source: str = "the data") -> None:
    """Fails at once when a text column is not of string type (ints, lists, ...), naming the column and its type.

    Features unknown up front (some streams) are judged from the first row.
    """
    features = dataset.features or {}
    first = None
    for role, name in columns.items():
        feature = features.get(name)
        if feature is None and isinstance(dataset, datasets.IterableDataset):
            first = first if first is not None else next(iter(dataset), {})
            value = first.get(name)
            if value is None or isinstance(value, str):
                continue
            kind = type(value).__name__
        elif isinstance(feature, datasets.Value) and feature.dtype in _TEXT_DTYPES:
            continue
        else:
            kind = getattr(feature, "dtype", None) or type(feature).__name__
        raise ValueError(f"text column {name!r} ({role}) of {source} holds {kind}, not strings; pass the column "
                         "with the text (--text_column / --caption_column / --vecap_column) or cast it to string")


# ----------------------------------------------------------------------------------------------------------------
# Row ids
# ----------------------------------------------------------------------------------------------------------------


def resolve_id_column(dataset, id_column: str = ID) -> str:
    """The id column of `dataset`: `id_column` if present (`json.id` names a field of a struct column), else the
    `id` that img2dataset's `--save_additional_columns` put in each sample's `json` (read as `json.id`), else
    WebDataset's `__key__`.

    Raises:
        ValueError: none of them, naming the columns there are.
    """
    names = column_names(dataset)
    if id_column in names:
        return id_column
    head, _, field_name = id_column.partition(".")
    if field_name and head in names:
        return id_column
    if IMG2DATASET_METADATA in names and _has_field(dataset, IMG2DATASET_METADATA, ID):
        return f"{IMG2DATASET_METADATA}.{ID}"
    if WEBDATASET_KEY in names:
        return WEBDATASET_KEY
    raise ValueError(
        f"id column {id_column!r} not found, nor img2dataset's 'json.id' nor WebDataset's {WEBDATASET_KEY!r}; "
        f"available columns: {names}. Pass --id_column with a column that identifies each row (new columns and "
        "per-sample logs are joined on it).")


def _has_field(dataset, column: str, name: str) -> bool:
    """Whether the struct column `column` has the field `name` (from the features, else from the first row)."""
    feature = (dataset.features or {}).get(column)
    if feature is not None:
        return isinstance(feature, dict) and name in feature
    first = next(iter(dataset.select_columns([column])), {}) if hasattr(dataset, "select_columns") else {}
    value = first.get(column)
    return isinstance(value, dict) and name in value


def id_source_column(id_column: str, available: list[str] | None = None) -> str:
    """The dataset column an id is read from: `json` for `json.id`, else the id column itself."""
    if available is not None and id_column in available:
        return id_column
    head, _, field_name = id_column.partition(".")
    return head if field_name else id_column


def read_id(row: dict, id_column: str) -> str:
    """One row's id as a string; `column.field` reads a field of a struct column (img2dataset's `json.id`)."""
    if id_column in row:
        return str(row[id_column])
    head, _, field_name = id_column.partition(".")
    return str(row[head][field_name])


def read_ids(dataset, id_column: str) -> list[str]:
    """The ids of a map-style dataset (or shard), in row order, as strings."""
    if id_column in dataset.column_names:
        return [str(i) for i in dataset[id_column]]
    head, _, field_name = id_column.partition(".")
    return [str(value[field_name]) for value in dataset[head]]


def duplicate_ids(ids: list[str], limit: int = 5) -> list[str]:
    """Up to `limit` ids that occur more than once, in order of their second occurrence."""
    seen, repeated = set(), []
    for row_id in ids:
        if row_id in seen and row_id not in repeated:
            repeated.append(row_id)
            if len(repeated) == limit:
                break
        seen.add(row_id)
    return repeated


# ----------------------------------------------------------------------------------------------------------------
# Empty texts
# ----------------------------------------------------------------------------------------------------------------


def is_empty_text(text: Any) -> bool:
    """Whether `text` holds no text: missing, not a string, or no printable non-space character once HTML
    entities are unescaped (twice, as CLIP's cleaning does: `"&amp;nbsp;"` too).

    `"&nbsp;"` (a no-break space), `"\\u200b"` (a zero-width space, not printable), `"\\x00"` and other control
    characters are empty: they would train as an empty prompt and score as one. The rule does not depend on a
    tokenizer's cleaning, so that training, recaption and the audit skip the same rows.
    """
    if not isinstance(text, str):
        return True
    text = html.unescape(html.unescape(text)) if "&" in text else text
    return not any(ch.isprintable() and not ch.isspace() for ch in text)


__all__ = [
    "DEMO", "IMG2DATASET_METADATA", "WEBDATASET_KEY", "check_files", "check_webdataset_shards", "column_names",
    "duplicate_ids", "find_damaged_file", "id_source_column", "is_demo_data", "is_empty_text", "load_source",
    "local_files", "read_id", "read_ids", "require_columns", "require_text_columns", "resolve_id_column",
    "resolve_source",
]
