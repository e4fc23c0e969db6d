"""The input of a recaption run: the source loaded and checked, its id column resolved, images decoded.

The source, the row id and empty texts follow the data contract (`alip_hf.sources`, the rules training and the
audit use too): a source is anything `sources.load_source` reads (`demo` included); the id is the `--id_column`
(default `id`) when the source has it, else the `id` img2dataset saved in each sample's `json` (`alip_hf.web` asks
it to), else WebDataset's `__key__`; it is written as `id`. New values are looked up by id, never by position, and
ids must be unique.
"""

from __future__ import annotations

from dataclasses import dataclass

from alip_hf import sources  # the data contract; imports only the standard library up front
from alip_hf.lazy import lazy_import
from recaption.arguments import RunArguments

datasets = lazy_import("datasets")


def load_image(value):
    """A PIL RGB image from an image cell, decoded by `data.decode_image` (the decoder train.py uses, so a row
    flagged unreadable here is exactly a row train.py would skip)."""
    from alip_hf.data import decode_image  # torch: imported where images are decoded, not for --help

    return decode_image(value).convert("RGB")


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
    return Input(sources.undecoded_images(dataset, args.image_column), id_column, dataset.features)
