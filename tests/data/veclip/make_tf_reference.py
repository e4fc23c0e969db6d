"""Writes `tf_reference.npz`: VeCLIP's TensorFlow preprocessing applied to seeded random images.

The released VeCLIP models were trained and evaluated with a TensorFlow preprocessing function (bilinear
`tf.image.resize` without antialiasing, short side to the crop size, centre crop of fraction 1, whitening
with CLIP's mean and std on the 0-255 scale). This script runs that pipeline through TensorFlow itself so
that the tests can check `VeCLIPImageProcessor` against it without TensorFlow installed.

Run once, in a separate environment (TensorFlow is not a dependency of this project):

    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu numpy pillow
    /tmp/tfenv/bin/python tests/data/veclip/make_tf_reference.py

Output keys, for case `i`: `image_i` (H, W, 3) uint8 input, `crop_size_i` () int, `center_crop_i` and
`resize_only_i` (crop, crop, 3) float32 TensorFlow outputs; `tf_version` the TensorFlow that made them.
"""

import os

import numpy as np
import tensorflow as tf

SEED = 20231011
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# (height, width, crop): up- and down-scaling, identity, odd sizes, portrait / landscape / square, extreme
# aspect ratios, and (49, 46, 23) whose long side lands on x.5 (scale 0.5 * 49 = 24.5: round half to even).
CASES = [
    (7, 11, 23),
    (23, 23, 23),
    (40, 40, 23),
    (97, 31, 23),
    (31, 97, 23),
    (15, 60, 16),
    (61, 45, 16),
    (120, 90, 16),
    (5, 8, 16),
    (33, 29, 23),
    (49, 46, 23),
    (200, 9, 16),
]


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth gradient plus noise, so that interpolation errors show on edges and on flat areas alike."""
    ys, xs = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    smooth = np.stack([ys, xs, (ys + xs) / 2], axis=-1) * 255
    noise = rng.integers(-60, 61, size=(height, width, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def whiten(image: tf.Tensor) -> tf.Tensor:
    mean = tf.constant([m * 255 for m in CLIP_MEAN], shape=[1, 1, 3], dtype=tf.float32)
    std = tf.constant([s * 255 for s in CLIP_STD], shape=[1, 1, 3], dtype=tf.float32)
    return (tf.cast(image, tf.float32) - mean) / std


def center_crop_path(image: np.ndarray, crop: int) -> np.ndarray:
    """Short side to `crop` (the long side bounded by a huge number), then a centre square of the short side."""
    height, width = image.shape[:2]
    target = (100000, crop) if height > width else (crop, 100000)
    resized = tf.image.resize(image, target, method="bilinear", preserve_aspect_ratio=True, antialias=False)
    size = tf.cast(tf.shape(resized)[:2], tf.float32)
    side = tf.math.minimum(size[0], size[1])
    offset = tf.cast((size - side) / 2.0, tf.int32)
    side = tf.cast(side, tf.int32)
    cropped = resized[offset[0] : offset[0] + side, offset[1] : offset[1] + side, :]
    return whiten(cropped).numpy()


def resize_only_path(image: np.ndarray, crop: int) -> np.ndarray:
    resized = tf.image.resize(image, (crop, crop), method="bilinear", preserve_aspect_ratio=False, antialias=False)
    return whiten(resized).numpy()


def main():
    rng = np.random.default_rng(SEED)
    arrays = {"tf_version": np.array(tf.__version__)}
    for i, (height, width, crop) in enumerate(CASES):
        image = random_image(rng, height, width)
        arrays[f"image_{i}"] = image
        arrays[f"crop_size_{i}"] = np.array(crop)
        arrays[f"center_crop_{i}"] = center_crop_path(image, crop).astype(np.float32)
        arrays[f"resize_only_{i}"] = resize_only_path(image, crop).astype(np.float32)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf_reference.npz")
    tmp = out + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, out)
    print(f"wrote {len(CASES)} cases to {out} ({os.path.getsize(out) / 1024:.0f} KiB) with TensorFlow {tf.__version__}")


if __name__ == "__main__":
    main()
