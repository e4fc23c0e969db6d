"""Prints how far VeCLIPImageProcessor is from the TensorFlow reference, per case and overall.

    OMP_NUM_THREADS=1 python tests/data/veclip/measure_parity.py
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from transformers import CLIPImageProcessor  # noqa: E402

from modeling_alip.image_processing_veclip import VeCLIPImageProcessor  # noqa: E402


def main():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf_reference.npz")
    with np.load(path) as arrays:
        data = dict(arrays)
    cases = sorted(int(k.split("_")[1]) for k in data if k.startswith("image_"))
    print(f"reference: TensorFlow {data['tf_version']}, {len(cases)} images")
    print("| case | input (H, W) | crop | VeCLIP, centre crop | VeCLIP, resize_only | CLIPImageProcessor |")
    print("|---|---|---|---|---|---|")
    worst = {"center_crop": 0.0, "resize_only": 0.0}
    worst_clip = 0.0
    for i in cases:
        image, crop = data[f"image_{i}"], int(data[f"crop_size_{i}"])
        row = []
        for mode in worst:
            processor = VeCLIPImageProcessor(crop_size=crop, resize_only=mode == "resize_only")
            ours = processor(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
            diff = float(np.abs(ours - data[f"{mode}_{i}"]).max())
            worst[mode] = max(worst[mode], diff)
            row.append(f"{diff:.1e}")
        # transformers' CLIP preprocessing (bicubic, antialiased) at the same size, for comparison.
        clip = CLIPImageProcessor(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
        theirs = clip(image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        diff = float(np.abs(theirs - data[f"center_crop_{i}"]).max())
        worst_clip = max(worst_clip, diff)
        print(f"| {i} | {image.shape[:2]} | {crop} | {row[0]} | {row[1]} | {diff:.1e} |")
    print(f"overall max abs diff: VeCLIPImageProcessor centre crop {worst['center_crop']:.1e}, resize_only "
          f"{worst['resize_only']:.1e}; CLIPImageProcessor {worst_clip:.1e}")


if __name__ == "__main__":
    main()
