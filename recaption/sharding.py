"""Which rows each worker reads: map-style shards of `shard_size` consecutive rows, or a stream's source shards
cut into chunks of `shard_size` rows (resumed from the stream state in the last finished chunk's marker)."""

from __future__ import annotations

import itertools
import logging
import math
from typing import Iterator

from alip_hf import sources
from alip_hf.lazy import lazy_import
from recaption.layout import stream_chunk_name

logger = logging.getLogger(__name__)
datasets = lazy_import("datasets")


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
