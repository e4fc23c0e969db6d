"""Streaming recaption runs split the stream by source shards across processes (no process reads it all) and
resume a source shard from the stream state in its last chunk's marker."""

import datasets
import pytest

from alip_hf.data import load_source
from recaption.arguments import RunArguments
from recaption.run import run_sharded
from recaption.source import Input, load_input
from recaption.step import StepResult

FILES, ROWS_PER_FILE = 4, 10


class FakeAccelerator:
    """One of `world` processes, run one after the other in this interpreter (the last one run is rank 0)."""

    def __init__(self, rank: int, world: int):
        self.process_index, self.num_processes = rank, world
        self.is_main_process = rank == 0

    def wait_for_everyone(self):
        pass

    def print(self, *args):
        pass


class EchoStep:
    """A recaption step without a model: caption = "cap " + id; can fail after some shards, as a killed run."""

    name, unit = "echo", "row"

    def __init__(self, fail_after: int | None = None):
        self.fail_after, self.shards = fail_after, 0

    def required_columns(self):
        return {"alt_text": "alt_text"}

    def provenance(self):
        return {"model": "echo"}

    def process(self, shard, ids, progress):
        if self.fail_after is not None and self.shards == self.fail_after:
            raise KeyboardInterrupt("killed")
        self.shards += 1
        return StepResult({"caption": {i: f"cap {i}" for i in ids}}, {"rows": len(ids)})

    def summarize(self, totals):
        return {}


def _write_files(root) -> str:
    for f in range(FILES):
        ids = [f"f{f}-r{r}" for r in range(ROWS_PER_FILE)]
        datasets.Dataset.from_dict({"id": ids, "alt_text": [f"text {i}" for i in ids]}).to_parquet(
            str(root / f"part-{f}.parquet"))
    return str(root / "part-*.parquet")


def _counted_input(args: RunArguments, reads: list) -> Input:
    """The run's input with a counter of the rows `datasets` reads (a `map` runs once per row read)."""
    source = load_input(args, {"alt_text": "alt_text"})

    def count(row):
        reads.append(row["id"])
        return row

    return Input(source.dataset.map(count), source.id_column, source.features)


def test_two_processes_each_read_only_their_source_shards(tmp_path):
    pattern = _write_files(tmp_path)
    args = RunArguments(source=pattern, output_dir=str(tmp_path / "out"), streaming=True, shard_size=4)
    reads = {}
    for rank in (1, 0):  # rank 0 last: it checks that all shards are there and writes the summary
        reads[rank] = []
        summary = run_sharded(args, EchoStep(), FakeAccelerator(rank, 2), _counted_input(args, reads[rank]))
    total = FILES * ROWS_PER_FILE
    assert len(reads[0]) == len(reads[1]) == total // 2  # each process read its half, once
    assert not set(reads[0]) & set(reads[1])
    assert {i.split("-")[0] for i in reads[0]} == {"f0", "f2"}  # source shard j -> process j % 2
    assert summary["rows"] == total
    result = load_source(str(tmp_path / "out" / "data"))
    assert sorted(result["id"]) == sorted(reads[0] + reads[1])
    assert all(c == f"cap {i}" for i, c in zip(result["id"], result["caption"]))


def test_killed_streaming_run_resumes_each_source_shard_without_rereading_finished_chunks(tmp_path):
    pattern = _write_files(tmp_path)
    args = RunArguments(source=pattern, output_dir=str(tmp_path / "out"), streaming=True, shard_size=4)
    first = []
    with pytest.raises(KeyboardInterrupt):
        run_sharded(args, EchoStep(fail_after=4), FakeAccelerator(0, 1), _counted_input(args, first))
    second = []
    summary = run_sharded(args, EchoStep(), FakeAccelerator(0, 1), _counted_input(args, second))
    total = FILES * ROWS_PER_FILE
    assert summary["rows"] == total
    # 4 chunks finished (files 0 and 1: 4 + 4 + 2 rows, then file 2's first 4); the rerun reads the rest only.
    assert len(second) == total - 14
    assert not set(second) & set(first[:14])
    assert sorted(load_source(str(tmp_path / "out" / "data"))["id"]) == sorted(
        f"f{f}-r{r}" for f in range(FILES) for r in range(ROWS_PER_FILE))


def test_a_single_file_stream_is_split_by_parquet_row_groups(tmp_path):
    ids = [f"r{i}" for i in range(40)]
    datasets.Dataset.from_dict({"id": ids, "alt_text": ids}).to_parquet(str(tmp_path / "one.parquet"),
                                                                           batch_size=10)
    args = RunArguments(source=str(tmp_path / "one.parquet"), output_dir=str(tmp_path / "out"), streaming=True,
                        shard_size=8)
    reads = {}
    for rank in (1, 0):
        reads[rank] = []
        summary = run_sharded(args, EchoStep(), FakeAccelerator(rank, 2), _counted_input(args, reads[rank]))
    assert summary["rows"] == 40 and 0 < len(reads[1]) < 40 and len(reads[0]) + len(reads[1]) == 40
