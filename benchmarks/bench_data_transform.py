"""Per-image cost of the training transform against the evaluation transform, and of collation.

Times, on decoded demo images (bundled clip art, resized to the model's input size):

* eval: `ImageTransform(train=False)`: bicubic resize of the short side + centre crop + normalise;
* train: the sample's generator (`sample_rng`) + `ImageTransform(train=True)`: RandomResizedCrop drawn from it,
  bicubic resize, normalise (what `ExampleBuilder` runs per sample);
* collate: `Collator` on a batch of training examples (stacking pixels, tokenising texts), per image.

Rows are interleaved within each repeat; medians over repeats of the per-image time.

    OMP_NUM_THREADS=1 python benchmarks/bench_data_transform.py --images 256 --repeats 7 --image_size 224
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq
    from PIL import Image

    from alip_hf import data
    from alip_hf.resources import DEMO_DATA
    from modeling_alip import ALIPProcessor

    table = pq.read_table(sorted(DEMO_DATA.glob("train-*.parquet"))[0], columns=["image", "alt_text"])
    rows = table.slice(0, args.images).to_pylist()
    images = [Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB") for r in rows]
    texts = [r["alt_text"] for r in rows]
    train = data.ImageTransform(args.image_size, train=True)
    evaluate = data.ImageTransform(args.image_size, train=False)
    collate = data.Collator(ALIPProcessor.default(args.image_size), max_length=77)  # CLIP's BPE and text cleaning

    def run_eval():
        for image in images:
            evaluate(image)

    def run_train():
        for i, image in enumerate(images):
            train(image, data.sample_rng(0, 0, i))

    examples = [{"pixel_values": train(im, data.sample_rng(0, 0, i)), "text": t, "caption": None, "stats": {}}
                for i, (im, t) in enumerate(zip(images, texts))]

    def run_collate():
        for start in range(0, len(examples), args.batch):
            collate(examples[start : start + args.batch])

    timings = {"eval transform": [], "train transform": [], "collate": []}
    for _ in range(args.repeats):
        for name, fn in (("eval transform", run_eval), ("train transform", run_train), ("collate", run_collate)):
            started = time.perf_counter()
            fn()
            timings[name].append((time.perf_counter() - started) / len(images) * 1e3)
    medians = {k: statistics.median(v) for k, v in timings.items()}
    ref = medians["eval transform"]
    rows_out = [{"step": k, "ms_per_image": v, "ratio": v / ref} for k, v in medians.items()]
    rows_out.append({"step": "train transform + collate", "ms_per_image": medians["train transform"] + medians["collate"],
                     "ratio": (medians["train transform"] + medians["collate"]) / (ref + medians["collate"])})
    print(f"{args.images} demo images -> {args.image_size} px, batch {args.batch}, {args.repeats} repeats (medians)")
    print("| step | ms / image | vs eval transform |")
    print("|---|---:|---:|")
    for row in rows_out:
        note = " (vs eval transform + collate)" if row["step"].endswith("collate") and "+" in row["step"] else ""
        print(f"| {row['step']} | {row['ms_per_image']:.3f} | {row['ratio']:.2f}x{note} |")
    return rows_out


if __name__ == "__main__":
    main()
