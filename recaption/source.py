"""The input of a recaption run: the source loaded and checked, the row id resolved and read, images decoded.

The id: the `--id_column` (default `id`) when the source has it, else the `id` img2dataset saved in each
sample's `json` (`alip_hf.web` asks it to), else WebDataset's `__key__`; it is written as `id`. New values are
looked up by id, never by position, and ids must be unique.
"""

from __future__ import annotations

from dataclasses import dataclass

from alip_hf.lazy import lazy_import
from recaption.arguments import RunArguments
from alip_hf.schema import ID

datasets = lazy_import("datasets")
data_lib = lazy_import("alip_hf.data")

WEBDATASET_KEY = "__key__"
IMG2DATASET_METADATA = "json"  # img2dataset writes each sample's metadata (url, status, saved columns) there


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
    return data_lib.decode_image(value).convert("RGB")


@dataclass
class Input:
    dataset: datasets.Dataset | datasets.IterableDataset
    id_column: str
    features: datasets.Features | None  # as read, to restore decodable images when writing


def load_input(args: RunArguments, required: dict[str, str]) -> Input:
    """Loads the source, checks the needed columns and the id, and turns image decoding off (images are
    decoded one by one so that an unreadable one becomes an `error` value, not a crash)."""
    dataset = data_lib.load_source(args.source, split=args.split, streaming=args.streaming)
    columns = list(dataset.column_names or (dataset.features or {}).keys())
    id_column = resolve_id_column(columns, args.id_column, dataset.features)
    data_lib.require_columns(dataset, required)
    return Input(data_lib.undecoded_images(dataset, args.image_column), id_column, dataset.features)
