"""Embedding throughput of eval.py against open_clip on the same network, and the class-embedding cache.

The model is open_clip's ViT-B-32 with random weights, converted to `ALIPModel` (`convert_open_clip`), so both
sides compute the same network (the script checks that their features agree before timing). Rows:

* images, end to end: PIL images -> preprocessing -> image tower -> normalised features. open_clip: its
  eval transform + `encode_image`; eval.py: `encode_images` (CLIP image processor + `get_image_features`);
* images, tower only: the same `(B, 3, 224, 224)` tensor through `encode_image` / `get_image_features`;
* texts, end to end: zero-shot prompts -> tokens -> text tower. open_clip: `tokenize` (77 wide) +
  `encode_text`; eval.py: `encode_texts` (ALIPProcessor, padded to the batch's longest prompt);
* class embeddings: `zeroshot_classifier` on a miss (encodes every prompt), on an in-memory hit and on a
  disk hit (a fresh cache reading the file another run wrote). A hit still hashes the weights (the key must
  change after every training step), so its cost is about one pass over the parameters.

Rows are interleaved inside each repeat so that load from other processes hits every row alike; the table
reports medians over repeats and each row's ratio to its open_clip row.

    OMP_NUM_THREADS=1 python benchmarks/bench_eval.py --repeats 5 --output benchmarks/RESULTS_eval.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import open_clip  # noqa: E402

import eval as ev  # noqa: E402
from modeling_alip import ALIPProcessor  # noqa: E402
from alip_hf.convert.from_open_clip import convert_open_clip  # noqa: E402

FEATURE_ATOL = 1e-4  # fp32 features of the converted model vs open_clip (as tests/test_convert.py)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--images", type=int, default=32, help="images per repeat")
    parser.add_argument("--texts", type=int, default=128, help="prompts per repeat")
    parser.add_argument("--batch_size", type=int, default=32, help="batch size of every row")
    parser.add_argument("--classes", type=int, default=10, help="classes of the cached classifier")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=None, help="write the markdown report here (atomically)")
    return parser.parse_args(argv)


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def build(model_name: str):
    torch.manual_seed(0)
    reference, _, preprocess = open_clip.create_model_and_transforms(model_name)
    reference.eval()
    model = convert_open_clip(reference.state_dict(), model_name=model_name)
    processor = ALIPProcessor.from_config(model.config)
    return reference, preprocess, model, processor


def check_same_network(reference, model, pixels, tokens):
    with torch.no_grad():
        ours_image = model.get_image_features(pixel_values=pixels).pooler_output
        ours_text = model.get_text_features(input_ids=tokens).pooler_output
        torch.testing.assert_close(ours_image, reference.encode_image(pixels), atol=FEATURE_ATOL, rtol=0)
        torch.testing.assert_close(ours_text, reference.encode_text(tokens), atol=FEATURE_ATOL, rtol=0)


def main(argv=None) -> str:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    reference, preprocess, model, processor = build(args.model)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (256, 320, 3), dtype=np.uint8)) for _ in range(args.images)]
    names = ev.named_list("imagenet", "classnames")
    templates = ev.check_templates(ev.named_list("clip_benchmark:cifar10", "templates"))
    prompts = [t.format(names[i % len(names)]) for i, t in zip(range(args.texts), templates * args.texts)]
    pixels = torch.stack([preprocess(im) for im in images[: args.batch_size]])
    check_same_network(reference, model, pixels[:4], open_clip.tokenize(prompts[:4]))
    cache_dir = tempfile.mkdtemp(prefix="bench-eval-cache-")
    class_names = names[: args.classes]
    bs = args.batch_size

    def open_clip_images():
        for start in range(0, len(images), bs):
            batch = torch.stack([preprocess(im) for im in images[start : start + bs]])
            torch.nn.functional.normalize(reference.encode_image(batch), dim=-1)

    def open_clip_texts():
        for start in range(0, len(prompts), bs):
            tokens = open_clip.tokenize(prompts[start : start + bs])
            torch.nn.functional.normalize(reference.encode_text(tokens), dim=-1)

    disk_cache = {"n": 0}

    def disk_hit():
        disk_cache["n"] += 1
        cache = ev.ClassifierCache(cache_dir)
        ev.zeroshot_classifier(model, processor, class_names, templates, bs, cache=cache)
        assert cache.hits == 1, "expected a disk hit"

    memory_cache = ev.ClassifierCache()
    rows = {
        "images end to end: open_clip": (open_clip_images, args.images, "images end to end: open_clip"),
        "images end to end: eval.encode_images": (
            lambda: ev.encode_images(model, processor, images, bs), args.images, "images end to end: open_clip"),
        "image tower only: open_clip encode_image": (
            lambda: reference.encode_image(pixels), len(pixels), "image tower only: open_clip encode_image"),
        "image tower only: get_image_features": (
            lambda: model.get_image_features(pixel_values=pixels), len(pixels),
            "image tower only: open_clip encode_image"),
        "texts end to end: open_clip (77 wide)": (open_clip_texts, args.texts, "texts end to end: open_clip (77 wide)"),
        "texts end to end: eval.encode_texts (longest)": (
            lambda: ev.encode_texts(model, processor, prompts, bs), args.texts,
            "texts end to end: open_clip (77 wide)"),
        "class embeddings: miss (encode all prompts)": (
            lambda: ev.zeroshot_classifier(model, processor, class_names, templates, bs, cache=ev.ClassifierCache()),
            None, "class embeddings: miss (encode all prompts)"),
        "class embeddings: in-memory hit": (
            lambda: ev.zeroshot_classifier(model, processor, class_names, templates, bs, cache=memory_cache),
            None, "class embeddings: miss (encode all prompts)"),
        "class embeddings: disk hit": (disk_hit, None, "class embeddings: miss (encode all prompts)"),
    }
    # Warm-up: first calls pay for lazy initialisation; it also fills both caches.
    ev.zeroshot_classifier(model, processor, class_names, templates, bs, cache=memory_cache)
    ev.zeroshot_classifier(model, processor, class_names, templates, bs, cache=ev.ClassifierCache(cache_dir))
    for function, _, _ in rows.values():
        function()
    times = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, (function, _, _) in rows.items():
            times[name].append(timed(function))
    medians = {name: statistics.median(values) for name, values in times.items()}

    command = "OMP_NUM_THREADS={} python benchmarks/bench_eval.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "unset"), " ".join(sys.argv[1:] if argv is None else argv))
    lines = [
        "# Benchmarks: evaluation (eval.py)", "", "Produced by:", "", f"    {command}", "",
        f"Machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"open_clip {open_clip.__version__} {args.model}, random weights, fp32, CPU; batches of {bs}; "
        f"median of {args.repeats} repeats, rows interleaved. Features of both sides agree within "
        f"{FEATURE_ATOL:g}. Zero-shot classifier: {len(class_names)} classes x {len(templates)} CIFAR templates "
        f"= {len(class_names) * len(templates)} prompts.", "",
        "| row | median s | items/s | time vs reference row |", "|---|---:|---:|---:|",
    ]
    for name, (_, count, reference_row) in rows.items():
        rate = f"{count / medians[name]:,.1f}" if count else "-"
        lines.append(f"| {name} | {medians[name]:.4f} | {rate} | {medians[name] / medians[reference_row]:.3f}x |")
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output:
        fd, tmp = tempfile.mkstemp(dir=Path(args.output).parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(report)
        os.replace(tmp, args.output)
    return report


if __name__ == "__main__":
    main()
