"""Checks that finished shards were made from this input by this model with these settings before a resumed
run skips them; a mismatch is refused naming the shard, what changed and `--overwrite_output_dir`."""

from __future__ import annotations

import itertools

from alip_hf import sources
from alip_hf.lazy import lazy_import
from recaption.arguments import RunArguments
from alip_hf.identity import identity_differences, sha256_json
from recaption.identity import source_identity
from recaption.layout import done_shards, read_marker, shard_list, shard_name, stream_chunk_name

datasets = lazy_import("datasets")


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
            refuse(args, stream_chunk_name(args.split, source_shard, marker["chunk"]),
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
            refuse(args, stream_chunk_name(args.split, source_shard, marker["chunk"]),
                    f"its input ids changed: it was made from {marker['rows']} rows starting at id "
                    f"{marker.get('first_id')!r}; the source's rows for it now number {len(ids)}, starting at id "
                    f"{ids[0] if ids else None!r} (the source was replaced or reordered)")


def refuse(args: RunArguments, name: str, problem: str) -> None:
    raise ValueError(f"finished shard {name} in {args.output_dir} does not match this run: {problem}. Skipping it "
                     "would mix two inputs or two models in one output; pass --overwrite_output_dir to start over "
                     "(or use another --output_dir)")


def verify_done_shard(args: RunArguments, index: int, ids: list[str], identity: dict[str, str]) -> None:
    """Refuses a finished shard that was not made from these ids by this model with these settings.

    Raises:
        ValueError: naming the shard, what changed (its input ids; the source, model or settings digest) and
            `--overwrite_output_dir`.
    """
    name = shard_name(args.split, index)
    marker = read_marker(args, index)
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
    refuse(args, name, problem)


def check_no_extra_shards(args: RunArguments, num_shards: int, rows_in: int) -> None:
    """Refuses finished shards beyond the source's end: they hold rows of an earlier, longer source."""
    extra = sorted(i for i in done_shards(args) if i >= num_shards)
    if extra:
        raise ValueError(
            f"{args.output_dir} holds finished shards {shard_list(args, extra)} beyond the source's {rows_in} rows "
            f"({num_shards} shards): they come from an earlier, longer source. Pass --overwrite_output_dir to start "
            "over (or use another --output_dir)")
