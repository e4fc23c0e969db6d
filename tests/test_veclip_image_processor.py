"""VeCLIPImageProcessor against VeCLIP's TensorFlow preprocessing (reference arrays made by TensorFlow itself).

`tests/data/veclip/tf_reference.npz` was written by `tests/data/veclip/make_tf_reference.py` (TensorFlow 2.21,
in a separate environment): seeded images of varied sizes through `tf.image.resize(bilinear, antialias=False)`,
the centre crop and the whitening, in both the crop and the `resize_only` variants.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor

import modeling_alip  # noqa: F401  (registers VeCLIPImageProcessor)
from modeling_alip.image_processing_veclip import (
    VeCLIPImageProcessor,
    veclip_resize_shape,
)

REFERENCE = Path(__file__).parent / "data" / "veclip" / "tf_reference.npz"
TOLERANCE = 1e-4  # max abs difference after whitening (measured: ~2e-6)


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as arrays:
        data = dict(arrays)
    cases = sorted(int(k.split("_")[1]) for k in data if k.startswith("image_"))
    return data, cases


def _ours(image, crop, resize_only):
    """`(crop, crop, 3)` like the TensorFlow output."""
    pixels = VeCLIPImageProcessor(crop_size=crop, resize_only=resize_only)(image, return_tensors="np")["pixel_values"]
    return pixels[0].transpose(1, 2, 0)


@pytest.mark.parametrize("mode", ["center_crop", "resize_only"])
def test_pixels_equal_tensorflow_reference_on_every_case(reference, mode):
    data, cases = reference
    assert len(cases) >= 10
    shapes = {data[f"image_{i}"].shape[:2] for i in cases}
    # up- and down-scaling, portrait, landscape, square, odd sizes are all covered by the reference set
    assert any(h > w for h, w in shapes) and any(h < w for h, w in shapes) and any(h == w for h, w in shapes)
    for i in cases:
        image, crop = data[f"image_{i}"], int(data[f"crop_size_{i}"])
        expected = data[f"{mode}_{i}"]
        ours = _ours(image, crop, resize_only=(mode == "resize_only"))
        assert ours.shape == expected.shape == (crop, crop, 3), i
        assert np.abs(ours - expected).max() < TOLERANCE, f"case {i} {image.shape}: {np.abs(ours - expected).max()}"


def test_antialiased_resize_would_break_parity(reference):
    # The reference discriminates: an antialiased downscale (what PIL/torchvision do by default) is far off.
    data, cases = reference
    worst = 0.0
    for i in cases:
        image, crop = data[f"image_{i}"], int(data[f"crop_size_{i}"])
        if min(image.shape[:2]) <= crop:
            continue
        pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None]
        resized = F.interpolate(pixels, size=(crop, crop), mode="bilinear", align_corners=False, antialias=True)[0]
        mean = torch.tensor(VeCLIPImageProcessor().image_mean)[:, None, None] * 255
        std = torch.tensor(VeCLIPImageProcessor().image_std)[:, None, None] * 255
        whitened = ((resized - mean) / std).permute(1, 2, 0).numpy()
        worst = max(worst, np.abs(whitened - data[f"resize_only_{i}"]).max())
    assert worst > 0.1


def test_resize_shape_rounds_half_to_even_like_tensorflow():
    # 23 / 46 = 0.5 exactly, 0.5 * 49 = 24.5 -> 24 (round half to even), not 25; the reference has this case.
    assert veclip_resize_shape(49, 46, 23) == (24, 23)
    assert veclip_resize_shape(46, 49, 23) == (23, 24)
    assert veclip_resize_shape(30, 30, 224) == (224, 224)
    assert veclip_resize_shape(480, 640, 336) == (336, 448)


def test_pil_images_and_channel_layouts_give_the_same_pixels():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(37, 52, 3), dtype=np.uint8)
    processor = VeCLIPImageProcessor(crop_size=20)
    expected = processor(rgb, return_tensors="pt")["pixel_values"]
    as_chw_tensor = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    rgba = Image.fromarray(np.concatenate([rgb, np.full((37, 52, 1), 7, np.uint8)], axis=-1), mode="RGBA")
    for variant in (Image.fromarray(rgb), as_chw_tensor, rgba):
        assert torch.equal(processor(variant, return_tensors="pt")["pixel_values"], expected)
    gray = rng.integers(0, 256, size=(25, 25), dtype=np.uint8)
    from_pil = processor(Image.fromarray(gray, mode="L"), return_tensors="pt")["pixel_values"]
    from_array = processor(np.repeat(gray[..., None], 3, axis=-1), return_tensors="pt")["pixel_values"]
    assert torch.equal(from_pil, from_array)


def test_batch_of_mixed_sizes_is_stacked_to_crop_size():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=s, dtype=np.uint8) for s in [(10, 40, 3), (64, 30, 3), (30, 30, 3)]]
    out = VeCLIPImageProcessor(crop_size=30)(images, return_tensors="pt")["pixel_values"]
    assert out.shape == (3, 3, 30, 30) and out.dtype == torch.float32
    one = VeCLIPImageProcessor(crop_size=30)(images[1], return_tensors="pt")["pixel_values"]
    assert torch.equal(out[1:2], one)


def test_saved_processor_is_restored_by_auto_image_processor(tmp_path):
    processor = VeCLIPImageProcessor(crop_size=33, resize_only=True)
    processor.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is VeCLIPImageProcessor
    assert loaded.crop_size == {"height": 33, "width": 33} and loaded.resize_only is True
    image = np.random.default_rng(3).integers(0, 256, size=(50, 41, 3), dtype=np.uint8)
    expected = processor(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(loaded(image, return_tensors="pt")["pixel_values"], expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(crop_size={"height": 20, "width": 30}), "crop_size"),
        (dict(crop_size=0), "crop_size"),
    ],
)
def test_bad_settings_are_errors_naming_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VeCLIPImageProcessor(**kwargs)


def test_bad_images_are_errors_naming_the_image():
    processor = VeCLIPImageProcessor(crop_size=8)
    with pytest.raises(ValueError, match=r"images\[1\]"):
        processor([np.zeros((9, 9, 3), np.uint8), "not an image"])
    with pytest.raises(ValueError, match="channels"):
        processor(np.zeros((9, 9, 2), np.uint8))
