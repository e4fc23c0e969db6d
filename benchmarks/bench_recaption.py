"""Captioning throughput: batched `Captioner` vs a per-image loop vs transformers' pipeline, side by side.

All three use the same tiny random BLIP (`tests/_tiny_captioners.py`), the same images, the same prompt, greedy
decoding and the same `max_new_tokens`; the pipeline keeps its other defaults and is timed both called per
image and called on the whole list. Methods take turns within each of `--repeats` rounds, after one
warm-up; the table gives the median images/s and the ratio to the loop.
Also timed in the same rounds: the whole `recaption.caption` step on a Parquet file (decode, generate,
join, write).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/bench_recaption.py --images 64 --batch_size 64 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tiny test models: tests/_tiny_captioners.py

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

PROMPT = "w1 w2"  # in the tiny vocabulary; the pipeline needs a text in transformers 5


def _images(n: int, size: int) -> list[Image.Image]:
    pixels = [np.random.RandomState(i).randint(0, 255, (size, size, 3), dtype=np.uint8) for i in range(n)]
    return [Image.fromarray(p) for p in pixels]


def _interleaved_median_rates(methods, n_images: int, repeats: int) -> dict[str, tuple[float, list]]:
    """Median images/s per method; methods take turns within each repeat so that they share the same
    machine load (the CPU is shared), after one warm-up call each."""
    outputs = {name: fn() for name, fn in methods}
    rates: dict[str, list[float]] = {name: [] for name, _ in methods}
    for _ in range(repeats):
        for name, fn in methods:
            start = time.perf_counter()
            outputs[name] = fn()
            rates[name].append(n_images / (time.perf_counter() - start))
    return {name: (statistics.median(rates[name]), outputs[name]) for name, _ in methods}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


def in_memory_methods(args, model: str, images: list) -> list[tuple[str, callable]]:
    """The per-image loop, the pipeline (per image and per list) and the batched `Captioner`."""
    from transformers import pipeline

    from recaption.arguments import GenerationArguments
    from recaption.caption import Captioner

    generation = GenerationArguments(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, dtype="float32")
    batched = Captioner(model, PROMPT, generation)
    pipe = pipeline("image-text-to-text", model=model)

    def loop():
        return [batched([image])[0] for image in images]

    def batch():
        starts = range(0, len(images), args.batch_size)
        return [text for start in starts for text in batched(images[start : start + args.batch_size])]

    def pipeline_per_image():
        out = [pipe(images=image, text=PROMPT, max_new_tokens=args.max_new_tokens)[0] for image in images]
        return [o["generated_text"][len(PROMPT):].strip() for o in out]

    def pipeline_list():
        # transformers 5 runs a list of images with a list of texts as one generate() call.
        out = pipe(images=images, text=[PROMPT] * len(images), max_new_tokens=args.max_new_tokens)
        return [o["generated_text"][len(PROMPT):].strip() for o in out]

    return [
        ("per-image loop (`Captioner`, 1 image per call)", loop),
        ("pipeline, one call per image (defaults)", pipeline_per_image),
        ("pipeline, whole list in one call (defaults)", pipeline_list),
        (f"batched `Captioner` (batch {args.batch_size})", batch),
    ]


def step_method(args, model: str, images: list, workdir: str) -> tuple[str, callable]:
    """The whole `recaption.caption` step: PNG decode, generation, join on id, Parquet write, markers, summary."""
    import datasets

    from alip_hf.data import FEATURES, load_source
    from recaption.caption import CaptionArguments, caption
    from recaption.arguments import GenerationArguments, RunArguments

    buffers = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        buffers.append({"bytes": buffer.getvalue(), "path": None})
    source = os.path.join(workdir, "in.parquet")
    datasets.Dataset.from_dict(
        {"id": [str(i) for i in range(len(images))], "image": buffers},
        features=datasets.Features({"id": FEATURES["id"], "image": FEATURES["image"]}),
    ).to_parquet(source)
    runs = iter(range(10**6))

    def step():
        out = os.path.join(workdir, f"out{next(runs)}")
        caption(
            RunArguments(source=source, output_dir=out, shard_size=args.batch_size),
            CaptionArguments(model=model, prompt=PROMPT, prompt_version="bench"),
            GenerationArguments(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, dtype="float32"),
        )
        return load_source(os.path.join(out, "data"))["caption"]

    return f"`recaption.caption` step, shards of {args.batch_size} (incl. PNG decode, Parquet write)", step


def main(argv=None):
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    from _tiny_captioners import save_tiny_captioner

    hf_logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    workdir = tempfile.mkdtemp()
    model = save_tiny_captioner(os.path.join(workdir, "captioner"))
    images = _images(args.images, args.image_size)
    methods = [*in_memory_methods(args, model, images), step_method(args, model, images, workdir)]
    results = _interleaved_median_rates(methods, len(images), args.repeats)
    loop_name = methods[0][0]
    reference = results[loop_name][1]
    same = {name: out == reference for name, (_, out) in results.items()}

    loop_rate = results[loop_name][0]
    print(f"\n{len(images)} images of {args.image_size}px, max_new_tokens={args.max_new_tokens}, "
          f"torch threads={torch.get_num_threads()}, median of {args.repeats}\n")
    print("| method | images/s (median) | vs per-image loop | same captions as loop |")
    print("|---|---:|---:|---|")
    for name, (rate, _) in results.items():
        print(f"| {name} | {rate:.1f} | {rate / loop_rate:.2f}x | {same[name]} |")


if __name__ == "__main__":
    main()
