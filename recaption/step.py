"""What a recaption step is to the runner: a `Step` turns one shard into new columns keyed by id (`StepResult`),
which `join_columns` adds to the shard's rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

from alip_hf.lazy import lazy_import
from alip_hf.schema import ERROR, ID

datasets = lazy_import("datasets")


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



def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def join_columns(shard: datasets.Dataset, ids: list[str], result: StepResult, features, image_column: str) -> datasets.Dataset:
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



def error_column(shard: datasets.Dataset, ids: list[str], new_errors: dict[str, str]) -> dict[str, str]:
    """The `error` value per id: this step's error, else the one already recorded, else empty."""
    old = shard[ERROR] if ERROR in shard.column_names else [""] * len(ids)
    return {i: new_errors.get(i) or (previous or "") for i, previous in zip(ids, old)}
