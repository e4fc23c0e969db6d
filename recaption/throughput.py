"""Throughput of a run, from its completion markers: items and output tokens per second per replica, and the
replica-hours that 100M items would take at that rate.

A replica is one copy of the model doing the work: an Accelerate process, a scheduler task or a Ray actor (one
GPU each, or a few CPU cores). Each marker records the seconds its shard took from the start of its processing
to its marker (reading, decoding, generating, writing); the rate is the rows of all shards over the sum of those
seconds, so it is a per-replica figure whatever the number of replicas, and shards resumed from an earlier
launch count with the time they took then.
"""

from __future__ import annotations

from typing import Any, Iterable

PROJECTION_ROWS = 100_000_000
OUTPUT_TOKENS = "output_tokens"  # the count a generating step adds to its shard counts


def replica_description() -> str:
    """The hardware one replica ran on, in words ("NVIDIA H100 80GB HBM3", "cpu, 4 threads")."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return f"cpu, {torch.get_num_threads()} thread(s)"


def throughput(markers: Iterable[dict], unit: str) -> dict[str, Any]:
    """The run's throughput from its shards' markers (those with `shard_seconds`); `{}` when none has it."""
    rows = tokens = seconds = 0.0
    replicas = set()
    for marker in markers:
        if not marker.get("rows") or "shard_seconds" not in marker:
            continue
        rows += marker["rows"]
        tokens += marker.get("counts", {}).get(OUTPUT_TOKENS, 0)
        seconds += marker["shard_seconds"]
        replicas.add(marker.get("replica", "unknown"))
    if not rows or seconds <= 0:
        return {}
    rate = rows / seconds
    figures = {"unit": unit, "per_replica_per_second": round(rate, 3),
               "replica_hours_per_100M": round(PROJECTION_ROWS / rate / 3600, 1),
               "replica_seconds": round(seconds, 3), "replicas": sorted(replicas)}
    if tokens:
        figures["output_tokens_per_replica_per_second"] = round(tokens / seconds, 1)
    return figures


def render(figures: dict[str, Any]) -> str:
    """One line for logs and cards."""
    if not figures:
        return "no throughput recorded"
    line = (f"{figures['per_replica_per_second']:g} {figures['unit']}/s per replica "
            f"({', '.join(figures['replicas'])})")
    if "output_tokens_per_replica_per_second" in figures:
        line += f", {figures['output_tokens_per_replica_per_second']:g} output tokens/s per replica"
    return line + f"; {figures['replica_hours_per_100M']:g} replica-hours per 100M {figures['unit']}"
