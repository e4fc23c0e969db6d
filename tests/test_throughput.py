"""The faster training pipeline computes what the slower one did: crops with torchvision's distribution from the
sample's numpy generator, the same pixels as torchvision's transforms, and fused AdamW's update."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from alip_hf import data
from alip_hf.training.optim import adamw_implementation


def _crops(draw, n=3000):
    params = np.array([draw(i) for i in range(n)], dtype=float)  # (n, 4): top, left, h, w
    return params[:, 2] * params[:, 3], params[:, 3] / params[:, 2], params


@pytest.mark.parametrize("height, width, scale", [(64, 64, (0.9, 1.0)), (48, 80, (0.3, 1.0))])
def test_crop_parameters_follow_torchvision_random_resized_crop(height, width, scale):
    ratio = (3 / 4, 4 / 3)
    ours_area, ours_aspect, ours = _crops(
        lambda i: data.random_resized_crop_params(height, width, scale, ratio, data.sample_rng(0, 0, i)))
    torch.manual_seed(0)
    image = Image.new("RGB", (width, height))
    ref_area, ref_aspect, ref = _crops(lambda i: RandomResizedCrop.get_params(image, list(scale), list(ratio)))
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all() and (ours >= 0).all()
    for a, b in ((ours_area, ref_area), (ours_aspect, ref_aspect), (ours[:, 0], ref[:, 0]), (ours[:, 1], ref[:, 1])):
        assert abs(a.mean() - b.mean()) < 0.05 * b.std() + 0.02 * abs(b.mean()), (a.mean(), b.mean())
        assert abs(a.std() - b.std()) < 0.1 * b.std() + 1e-9


def test_crop_parameters_fall_back_to_a_centre_crop_for_extreme_shapes():
    top, left, h, w = data.random_resized_crop_params(4, 400, (0.9, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    assert (h, w) == (4, 5) and (top, left) == (0, 197)


def test_crops_do_not_touch_torch_global_generator():
    torch.manual_seed(1)
    before = torch.random.get_rng_state()
    data.ImageTransform(16, train=True)(Image.new("RGB", (30, 20), "red"), data.sample_rng(0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), before)


def _textured(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return Image.open(buffer).convert("RGB")


@pytest.mark.parametrize("train", [True, False])
def test_transform_pixels_equal_torchvision_transforms(train):
    transform = data.ImageTransform(24, train=train)
    for i in range(5):
        image = _textured(i)
        if train:
            top, left, h, w = data.random_resized_crop_params(37, 45, transform.crop_scale, data.CROP_RATIO,
                                                              data.sample_rng(0, 0, i))
            reference = TF.resized_crop(image, top, left, h, w, [24, 24], InterpolationMode.BICUBIC, antialias=True)
        else:
            reference = TF.center_crop(TF.resize(image, 24, InterpolationMode.BICUBIC, antialias=True), [24, 24])
        expected = TF.normalize(TF.to_tensor(reference), transform.mean, transform.std)
        assert torch.equal(transform(image, data.sample_rng(0, 0, i)), expected)


def test_fused_adamw_update_equals_the_per_parameter_loop():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
    assert adamw_implementation(params) == {"fused": True}
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fast = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.2, **adamw_implementation(params))
    slow = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.2, foreach=False)
    for step in range(5):
        for group in (params, copies):
            torch.manual_seed(step)
            for p in group:
                p.grad = torch.randn_like(p)
        fast.step()
        slow.step()
    for a, b in zip(params, copies):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
