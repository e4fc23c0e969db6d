"""Time to resume a streaming run against its position in the stream: restored state (train.py) vs replay.

A stream of `--shards` Parquet files of `--rows_per_shard` rows (64 px JPEG images + a text), read as train.py
reads it: `StreamingExamples` (decode, RandomResizedCrop, text selection; shuffled in blocks of 256) under a
`StatefulDataLoader` (batch 32, no workers, so only the resume itself is timed). For each position, the time
from building the loader to its first batch:

* state: `load_state_dict` of the state saved at that position (what a checkpoint holds), then one batch;
* replay: what train.py did before: iterate and discard every consumed batch, then one batch.

Medians over `--repeats` (the two methods interleaved). The state column should stay flat: a resume re-reads at
most the current shuffle block and, inside `datasets`, the current shard up to the position. Its constant part
here is mostly `datasets`' wait for a Parquet stream's reader threads to shut down
(`datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN`).

    OMP_NUM_THREADS=1 python benchmarks/bench_resume.py --shards 16 --rows_per_shard 500 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BATCH, BLOCK = 32, 256


def write_stream(root: Path, shards: int, rows: int) -> str:
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for shard in range(shards):
        images = []
        for _ in range(rows):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
            images.append({"bytes": buffer.getvalue(), "path": None})
        features = datasets.Features({"image": datasets.Image(), "alt_text": datasets.Value("string")})
        datasets.Dataset.from_dict({"image": images, "alt_text": [f"text {shard} {i}" for i in range(rows)]},
                                   features=features).to_parquet(str(root / f"train-{shard:05d}.parquet"))
    return str(root / "train-*.parquet")


def open_stream(pattern: str):
    """The `datasets` stream (opened once: resolving the files costs the same for both methods)."""
    from alip_hf import data

    stream = data.load_source(pattern, streaming=True)
    return data.undecoded_images(stream, "image").shuffle(seed=0, buffer_size=1)


def make_loader(stream):
    from torchdata.stateful_dataloader import StatefulDataLoader

    from alip_hf import data
    from alip_hf.recipes import TextSelector

    selector = TextSelector({"alt_text": "alt_text"}, lambda row, rng: ({"text": row["alt_text"], "caption": None}, {}))
    build = data.ExampleBuilder("image", selector, data.ImageTransform(32, train=True), seed=0)
    examples = data.StreamingExamples(stream, build, shuffle_block=BLOCK, seed=0)
    return StatefulDataLoader(examples, batch_size=BATCH, collate_fn=lambda b: len(b))


def _drop(batches) -> None:
    """Closes an abandoned loader iterator outside the timed region: `datasets`' Parquet reader waits for its
    reading threads when an unfinished stream is collected, seconds that no resume pays."""
    del batches
    gc.collect()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--rows_per_shard", type=int, default=500)
    parser.add_argument("--positions", type=int, nargs="+", default=None, help="Batches consumed before the resume.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import logging
    import warnings

    from alip_hf.training.data import _EMPTY_BUFFER_NOTICE

    warnings.filterwarnings("ignore", message=".*set_vital.*")
    logging.getLogger("datasets.iterable_dataset").addFilter(_EMPTY_BUFFER_NOTICE)  # as train.py does

    total_batches = args.shards * args.rows_per_shard // BATCH
    positions = sorted(set(args.positions or [1, total_batches // 8, total_batches // 4, total_batches // 2,
                                              total_batches - 2]))
    stream = open_stream(write_stream(Path(tempfile.mkdtemp(prefix="bench-resume-")), args.shards,
                                      args.rows_per_shard))
    states = {}
    loader = make_loader(stream)
    batches = iter(loader)
    for consumed in range(1, max(positions) + 1):
        next(batches)
        if consumed in positions:
            states[consumed] = loader.state_dict()
    _drop(batches)

    times = {(p, method): [] for p in positions for method in ("state", "replay")}
    gc.disable()  # collections only in _drop, outside the timed regions
    for _ in range(args.repeats):
        for p in positions:
            started = time.perf_counter()
            resumed = make_loader(stream)
            resumed.load_state_dict(states[p])
            batches = iter(resumed)
            next(batches)
            times[(p, "state")].append(time.perf_counter() - started)
            _drop(batches)
            started = time.perf_counter()
            batches = iter(make_loader(stream))
            for _ in range(p + 1):
                next(batches)
            times[(p, "replay")].append(time.perf_counter() - started)
            _drop(batches)
    print(f"{args.shards} shards x {args.rows_per_shard} rows, batch {BATCH}, shuffle block {BLOCK}, "
          f"{args.repeats} repeats (medians)")
    print("| batches consumed | samples | resume from state s | replay s | replay / state |")
    print("|---:|---:|---:|---:|---:|")
    rows = []
    for p in positions:
        state, replay = statistics.median(times[(p, "state")]), statistics.median(times[(p, "replay")])
        rows.append({"batches": p, "state_s": state, "replay_s": replay})
        print(f"| {p} | {p * BATCH} | {state:.3f} | {replay:.3f} | {replay / state:.1f}x |")
    return rows


if __name__ == "__main__":
    main()
