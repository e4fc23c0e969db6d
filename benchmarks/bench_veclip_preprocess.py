"""Image preprocessing throughput: VeCLIPImageProcessor (TensorFlow-exact, no antialias) vs CLIPImageProcessor.

Both turn the same batch of seeded random uint8 images (mixed sizes around 640x480) into `(B, 3, S, S)` pixels;
the table gives the median of `--repeats` timed runs after one warm-up, and the ratio to CLIPImageProcessor.

    OMP_NUM_THREADS=1 python benchmarks/bench_veclip_preprocess.py --crop 224 --batch 32 --repeats 7
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from transformers import CLIPImageProcessor  # noqa: E402

from modeling_alip.image_processing_veclip import VeCLIPImageProcessor  # noqa: E402


def make_images(batch: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [(480, 640), (640, 480), (500, 500), (375, 500), (427, 640), (612, 612)]
    return [rng.integers(0, 256, size=(*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(batch)]


def time_runs(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crop", type=int, default=224, help="output side S")
    parser.add_argument("--batch", type=int, default=32, help="images per call")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per processor")
    args = parser.parse_args(argv)
    images = make_images(args.batch)
    processors = {
        "CLIPImageProcessor (bicubic, antialias)": CLIPImageProcessor(
            size={"shortest_edge": args.crop}, crop_size={"height": args.crop, "width": args.crop}
        ),
        "VeCLIPImageProcessor (centre crop)": VeCLIPImageProcessor(crop_size=args.crop),
        "VeCLIPImageProcessor (resize_only)": VeCLIPImageProcessor(crop_size=args.crop, resize_only=True),
    }
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, crop {args.crop}, "
          f"repeats {args.repeats}")
    print("| processor | median s / batch | images/s | time vs CLIPImageProcessor |")
    print("|---|---|---|---|")
    baseline = None
    for name, processor in processors.items():
        median = statistics.median(time_runs(lambda: processor(images, return_tensors="pt"), args.repeats))
        baseline = baseline or median
        print(f"| {name} | {median:.4f} | {args.batch / median:.0f} | {median / baseline:.2f}x |")


if __name__ == "__main__":
    main()
