"""Streaming data resumes from saved state in constant time, and exactly: `StreamingExamples` + torchdata's
`StatefulDataLoader`, without replaying the consumed stream."""

import datasets
import pytest
import torch
from conftest import write_parquet
from torchdata.stateful_dataloader import StatefulDataLoader

from alip_hf import data

ROWS, SHARDS = 240, 8


class Counted:
    """Counts the rows `datasets` hands to the pipeline (a `map` on the stream runs once per row read)."""

    def __init__(self):
        self.rows = 0

    def __call__(self, row):
        self.rows += 1
        return row


def _stream(counter: Counted | None = None, rows: int = ROWS, shards: int = SHARDS) -> datasets.IterableDataset:
    stream = datasets.Dataset.from_dict({"n": list(range(rows))}).to_iterable_dataset(num_shards=shards)
    stream = stream.shuffle(seed=3, buffer_size=1)  # shard order per epoch, as build_train_data does
    return stream.map(counter) if counter is not None else stream


def _build(row, epoch, index):
    """An ExampleBuilder stand-in: the row number, its epoch and its per-sample seed index; every 7th row fails."""
    if row["n"] % 7 == 3:
        return None, "skipped_images"
    return {"n": row["n"], "epoch": epoch, "index": index, "stats": {}}, None


def _take(iterator, k: int) -> list[tuple]:
    return [(e["n"], e["epoch"], e["index"], e["stats"].get("skipped_images", 0)) for e in
            (next(iterator) for _ in range(k))]


def test_stream_resumes_at_the_next_example_across_an_epoch_boundary():
    full = iter(data.StreamingExamples(_stream(), _build, shuffle_block=16, seed=1))
    expected = _take(full, 500)  # more than one epoch of the 206 valid rows
    for cut in (1, 37, 205, 206, 300):
        first = data.StreamingExamples(_stream(), _build, shuffle_block=16, seed=1)
        head = _take(iter(first), cut)
        resumed = data.StreamingExamples(_stream(), _build, shuffle_block=16, seed=1)
        resumed.load_state_dict(first.state_dict())
        assert head + _take(iter(resumed), 500 - cut) == expected, cut
    assert len({n for n, epoch, *_ in expected if epoch == 0}) == 206  # each valid row once per epoch
    assert [n for n, epoch, *_ in expected if epoch == 0] != sorted(n for n, epoch, *_ in expected if epoch == 0)


def test_resuming_reads_one_block_whatever_the_stream_position():
    read_to_resume = {}
    for cut in (20, 190):
        first = data.StreamingExamples(_stream(Counted()), _build, shuffle_block=16, seed=1)
        _take(iter(first), cut)
        counter = Counted()
        resumed = data.StreamingExamples(_stream(counter), _build, shuffle_block=16, seed=1)
        resumed.load_state_dict(first.state_dict())
        _take(iter(resumed), 1)
        read_to_resume[cut] = counter.rows
    # Re-reading the current block (16 rows) and, within one shard of 30 rows, `datasets`' own skip: flat.
    assert all(rows <= 16 + 30 for rows in read_to_resume.values()), read_to_resume
    assert 190 > 5 * max(read_to_resume.values())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_loader_resumes_the_same_batches(num_workers):
    def loader():
        stream = data.StreamingExamples(_stream(), _build, shuffle_block=16, seed=1)
        return StatefulDataLoader(stream, batch_size=5, num_workers=num_workers, collate_fn=lambda b: [e["n"] for e in b])

    full = iter(loader())
    expected = [next(full) for _ in range(30)]
    first = loader()
    batches = iter(first)
    head = [next(batches) for _ in range(13)]
    state = first.state_dict()
    del batches
    resumed = loader()
    resumed.load_state_dict(state)
    batches = iter(resumed)
    assert head + [next(batches) for _ in range(17)] == expected


def test_shuffle_block_zero_keeps_the_stream_order():
    stream = data.StreamingExamples(_stream(shards=1), _build, shuffle_block=0)
    assert [n for n, *_ in _take(iter(stream), 20)] == [n for n in range(24) if n % 7 != 3][:20]


# ------------------------------------------------------------------------------------------- through train.main


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    """The tiny training rows as two parquet files: a stream of two shards."""
    root = tmp_path_factory.mktemp("two_shards")
    write_parquet(root / "part-0.parquet", 24, seed=5)
    write_parquet(root / "part-1.parquet", 24, seed=6)
    return str(root / "part-*.parquet")


@pytest.mark.slow  # three streaming runs with DataLoader workers: 15-40 s on shared CPUs
@pytest.mark.parametrize("extra", [("--dataloader_num_workers", "2"), ("--gradient_accumulation_steps", "2")])
def test_streaming_run_stopped_and_resumed_from_state_ends_with_the_same_weights(tiny_data, tmp_path, two_shards,
                                                                                 extra):
    import json

    from safetensors.torch import load_file

    from alip_hf import train

    flags = ("--streaming", "true", "--shuffle_buffer", "8", "--max_steps", "4", "--save_steps", "1",
             "--per_device_train_batch_size", "4", *extra)
    train.main(tiny_data.argv(tmp_path / "full", *flags, data_file=two_shards))
    train.main(tiny_data.argv(tmp_path / "cut", *flags, "--stop_after_steps", "3", data_file=two_shards))
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step_000003" / "data_state_0.json").read_text())
    assert state  # the stream position travels with the checkpoint
    train.main(tiny_data.argv(tmp_path / "cut", *flags, "--resume_from_checkpoint", "latest", data_file=two_shards))
    full, resumed = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(
        str(tmp_path / "cut" / "model.safetensors"))
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=0, msg=name)


def test_resuming_a_stream_with_another_number_of_processes_is_refused(tmp_path):
    from alip_hf.training.checkpoints import load_data_state

    for rank in (0, 1):
        (tmp_path / f"data_state_{rank}.json").write_text("{}")
    with pytest.raises(ValueError, match="same number of processes"):
        load_data_state(tmp_path, rank=0, world_size=1)
    assert load_data_state(tmp_path, rank=1, world_size=2) == {}
