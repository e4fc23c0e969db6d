"""From a table of image URLs and texts to WebDataset shards, with img2dataset: `python -m alip_hf.web`.

Three steps, each a function:

1. `read_url_table`: a Parquet / CSV / JSON Lines / JSON table of URLs and texts -> one Parquet file with the
   columns img2dataset reads, `url`, `alt_text`, and a stable `id`. Besides tables of records it reads
   VeCap-300M's released layout: each of its 10 files (`wit_300m-0X-of-10.json`, listed in apple/ml-veclip's
   `vecap300m.txt`) is one JSON object mapping an image URL to its caption ("for each image, we save the web
   link and our caption", the ml-veclip README; the upload script in that repository reads a file as
   `json.load(f).items()` -> `(url, caption)`).
2. `download`: runs img2dataset on it (`--output_format webdataset`, `--save_additional_columns ["id"]`), so
   each sample's `json` carries the id that `recaption/` joins on (`alip_hf.sources.resolve_id_column`).
3. `read_stats`: sums img2dataset's per-shard `<shard>_stats.json` and lists every URL that failed (its
   per-shard `<shard>.parquet` has a `status` and an `error_message` per URL), written as
   `download_summary.json` and `failed.parquet`.

The shards then feed `recaption` and `train.py` as they are (docs/web_data.md). img2dataset runs as a separate
program (`--img2dataset`, default: the one on PATH), since it pins pandas<3 and webdataset<0.3 and may live in its
own environment.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alip_hf.io import write_json_atomic, write_with_atomically
from alip_hf.schema import ALT_TEXT, ID

logger = logging.getLogger(__name__)

URL = "url"
URL_TABLE = "urls.parquet"
SUMMARY_FILE = "download_summary.json"
FAILED_FILE = "failed.parquet"


# ----------------------------------------------------------------------------------------------------------------
# 1. The URL table
# ----------------------------------------------------------------------------------------------------------------


def stable_id(url: str, occurrence: int = 0) -> str:
    """The id of a URL: a hash of it, so the same table gives the same ids in every download; the k-th repeat of a
    URL (web tables have them, with other texts) gets `-k`."""
    digest = hashlib.sha1(url.encode("utf-8")).hexdigest()[:20]
    return digest if occurrence == 0 else f"{digest}-{occurrence}"


def _read_records(path: str, text_column: str):
    """A table file as a pandas DataFrame; a JSON file that is one object `{url: text}` (VeCap-300M) becomes rows."""
    import pandas as pd

    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix == ".csv":
        return pd.read_csv(path)
    if suffix in (".jsonl", ".ndjson"):
        return pd.read_json(path, lines=True)
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            loaded = json.load(f)
        if isinstance(loaded, dict):  # VeCap-300M: {url: caption, ...}
            return pd.DataFrame({URL: list(loaded.keys()), text_column: list(loaded.values())})
        if isinstance(loaded, list):
            return pd.DataFrame.from_records(loaded)
        raise ValueError(f"{path}: expected a JSON object {{url: text}} or a list of records, got {type(loaded).__name__}")
    raise ValueError(f"{path}: unknown table format {suffix!r} (Parquet, CSV, JSON Lines or JSON)")


def read_url_table(paths: list[str], url_column: str = URL, text_column: str = "caption",
                   id_column: str | None = None):
    """The rows img2dataset downloads: `url`, `alt_text` (the text to keep with the image) and `id`.

    Args:
        paths: table files (their rows are concatenated in this order).
        url_column, text_column: where the URL and the text are (VeCap-300M's JSON: `url` and `caption`).
        id_column: a column of the table holding a stable id; default: `stable_id(url)`.

    Returns:
        A pandas DataFrame with the columns `url`, `alt_text`, `id`; rows without a URL are dropped (and logged).

    Raises:
        ValueError: a missing column (named, with the available ones) or duplicate ids in `id_column`.
    """
    import pandas as pd

    frames = []
    for path in paths:
        frame = _read_records(path, text_column)
        for role, column in (("url", url_column), ("text", text_column), ("id", id_column)):
            if column is not None and column not in frame.columns:
                raise ValueError(f"{path}: {role} column {column!r} not found; available columns: {list(frame.columns)}")
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    urls = table[url_column].astype("string")
    keep = urls.notna() & (urls.str.strip() != "")
    if (~keep).sum():
        logger.warning("%d row(s) without a URL dropped", int((~keep).sum()))
    table, urls = table[keep], urls[keep].str.strip()
    texts = table[text_column].astype("string").fillna("")
    if id_column is not None:
        ids = table[id_column].astype("string")
        if ids.duplicated().any():
            raise ValueError(f"id {ids[ids.duplicated()].iloc[0]!r} appears twice in column {id_column!r}")
    else:
        occurrence = urls.groupby(urls).cumcount()
        ids = pd.Series([stable_id(u, int(k)) for u, k in zip(urls, occurrence)], index=urls.index)
    return pd.DataFrame({URL: urls.to_numpy(), ALT_TEXT: texts.to_numpy(), ID: ids.to_numpy()})


# ----------------------------------------------------------------------------------------------------------------
# 2. img2dataset
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DownloadArguments:
    """What to download and how; the img2dataset settings are passed through under their own names."""

    tables: list[str] = field(metadata={"help": "URL + text tables: Parquet, CSV, JSON Lines, JSON (VeCap-300M)."})
    output_dir: str = field(metadata={"help": "Where the WebDataset shards, the URL table and the summary go."})
    url_column: str = field(default=URL, metadata={"help": "Column of the image URL."})
    text_column: str = field(default="caption", metadata={"help": "Column of the text (VeCap-300M: caption)."})
    id_column: str | None = field(default=None, metadata={"help": "Column of a stable id; default: a URL hash."})
    image_size: int = field(default=256, metadata={"help": "img2dataset --image_size."})
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = field(
        default="keep_ratio", metadata={"help": "img2dataset --resize_mode (keep_ratio: short side = image_size)."})
    processes_count: int = field(default=1, metadata={"help": "img2dataset --processes_count."})
    thread_count: int = field(default=16, metadata={"help": "img2dataset --thread_count (downloads per process)."})
    timeout: float = field(default=10.0, metadata={"help": "img2dataset --timeout: seconds per URL."})
    retries: int = field(default=0, metadata={"help": "img2dataset --retries."})
    number_sample_per_shard: int = field(default=10000, metadata={"help": "img2dataset --number_sample_per_shard."})
    img2dataset: str = field(
        default="img2dataset",
        metadata={"help": "The img2dataset program (a path, e.g. in its own venv; env ALIP_IMG2DATASET)."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace an existing download."})

    def __post_init__(self):
        if not self.tables:
            raise ValueError("--tables needs at least one file")
        for name in ("image_size", "processes_count", "thread_count", "number_sample_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")


def find_img2dataset(program: str = "img2dataset") -> str:
    """The img2dataset executable: `$ALIP_IMG2DATASET`, else `program` (a path or a name on PATH).

    Raises:
        FileNotFoundError: with the install command.
    """
    candidate = os.environ.get("ALIP_IMG2DATASET") if program == "img2dataset" else None
    found = candidate or shutil.which(program) or (program if os.path.isfile(program) else None)
    if not found:
        raise FileNotFoundError(f"img2dataset not found ({program!r}); `pip install 'alip-hf[web]'`, or install it in "
                                "its own venv and pass --img2dataset /path/to/venv/bin/img2dataset")
    return found


def img2dataset_command(args: DownloadArguments, url_table: str, program: str) -> list[str]:
    """The img2dataset command line for `url_table` (a Parquet file with `url`, `alt_text`, `id`)."""
    return [
        program, f"--url_list={url_table}", "--input_format=parquet", f"--url_col={URL}", f"--caption_col={ALT_TEXT}",
        f"--save_additional_columns={json.dumps([ID])}", "--output_format=webdataset",
        f"--output_folder={Path(args.output_dir) / 'shards'}", f"--processes_count={args.processes_count}",
        f"--thread_count={args.thread_count}", f"--timeout={args.timeout}", f"--retries={args.retries}",
        f"--image_size={args.image_size}", f"--resize_mode={args.resize_mode}",
        f"--number_sample_per_shard={args.number_sample_per_shard}", "--enable_wandb=False",
        "--distributor=multiprocessing",
    ]


def download(args: DownloadArguments) -> dict:
    """Writes the URL table, runs img2dataset into `<output_dir>/shards`, and returns `read_stats(...)`.

    Raises:
        FileExistsError: the output directory holds an earlier download (pass `overwrite_output_dir`).
        RuntimeError: img2dataset exited with an error (its last output lines are in the message).
    """
    out = Path(args.output_dir)
    if (out / "shards").exists():
        if not args.overwrite_output_dir:
            raise FileExistsError(f"{out / 'shards'} exists: a second download there would mix two runs' shards; "
                                  "use another --output_dir or --overwrite_output_dir")
        shutil.rmtree(out / "shards")
    out.mkdir(parents=True, exist_ok=True)
    table = read_url_table(args.tables, args.url_column, args.text_column, args.id_column)
    url_table = out / URL_TABLE
    write_with_atomically(url_table, lambda tmp: table.to_parquet(tmp, index=False))
    program = find_img2dataset(args.img2dataset)
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")  # img2dataset's resizer imports albumentations
    completed = subprocess.run(img2dataset_command(args, str(url_table), program), env=env, capture_output=True,
                               text=True)
    if completed.returncode != 0:
        tail = "\n".join((completed.stdout + completed.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"img2dataset exited with {completed.returncode}:\n{tail}")
    return read_stats(out, expected_rows=len(table))


# ----------------------------------------------------------------------------------------------------------------
# 3. What was downloaded
# ----------------------------------------------------------------------------------------------------------------


def read_stats(output_dir: str | os.PathLike, expected_rows: int | None = None) -> dict:
    """Sums img2dataset's `<shard>_stats.json` files and collects the failed URLs from its `<shard>.parquet` files.

    Writes `<output_dir>/download_summary.json` (counts, failures by reason, shard patterns) and
    `<output_dir>/failed.parquet` (`id`, `url`, `status`, `error_message` of every URL without an image).

    Returns:
        The summary: `count`, `successes`, `failed_to_download`, `failed_to_resize`, `status` (reason -> count),
        `shards` (a brace pattern for `train.py --train_data` / `recaption --source`), `success_rate`.

    Raises:
        RuntimeError: some URL of the table is in no shard's status file (img2dataset stopped early).
    """
    import pandas as pd

    out = Path(output_dir)
    shard_dir = out / "shards"
    totals = {"count": 0, "successes": 0, "failed_to_download": 0, "failed_to_resize": 0}
    status: dict[str, int] = {}
    for path in sorted(glob.glob(str(shard_dir / "*_stats.json"))):
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
        for key in totals:
            totals[key] += int(stats.get(key, 0))
        for reason, n in stats.get("status_dict", {}).items():
            status[reason] = status.get(reason, 0) + int(n)
    frames = [pd.read_parquet(p) for p in sorted(glob.glob(str(shard_dir / "*.parquet")))]
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[ID, URL, "status"])
    if expected_rows is not None and len(rows) != expected_rows:
        raise RuntimeError(f"{expected_rows} URLs in the table, {len(rows)} in img2dataset's status files: "
                           "the download did not finish; run it again with --overwrite_output_dir")
    failed = rows[rows["status"] != "success"][[ID, URL, "status", "error_message"]]
    write_with_atomically(out / FAILED_FILE, lambda tmp: failed.to_parquet(tmp, index=False))
    tars = sorted(Path(p).name for p in glob.glob(str(shard_dir / "*.tar")))
    summary = {
        **totals,
        "status": dict(sorted(status.items(), key=lambda kv: -kv[1])),
        "success_rate": totals["successes"] / totals["count"] if totals["count"] else 0.0,
        "shards": _brace_pattern(shard_dir, tars),
        "num_shards": len(tars),
    }
    write_json_atomic(out / SUMMARY_FILE, summary, indent=2)
    return summary


def _brace_pattern(shard_dir: Path, tars: list[str]) -> str | None:
    """`dir/{00000..00002}.tar` for consecutively numbered shards (img2dataset's names), else a glob."""
    if not tars:
        return None
    stems = [Path(t).stem for t in tars]
    if all(s.isdigit() for s in stems) and [int(s) for s in stems] == list(range(int(stems[0]), int(stems[0]) + len(stems))):
        if len(stems) == 1:
            return str(shard_dir / tars[0])
        return str(shard_dir / f"{{{stems[0]}..{stems[-1]}}}.tar")
    return str(shard_dir / "*.tar")


def main(argv: list[str] | None = None) -> dict:
    """`python -m alip_hf.web --tables vecap/wit_300m-00-of-10.json --output_dir web/vecap-00`."""
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(DownloadArguments).parse_args_into_dataclasses(
        args=list(sys.argv[1:] if argv is None else argv))
    summary = download(args)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
