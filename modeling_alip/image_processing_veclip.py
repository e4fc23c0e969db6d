"""VeCLIP's image preprocessing in PyTorch, without TensorFlow.

The released VeCLIP checkpoints (github.com/apple/ml-veclip, trained with axlearn) expect pixels made by a
TensorFlow function shipped beside them; transformers' `CLIPImageProcessor` (bicubic, antialiased resize,
rescale to [0, 1]) gives different inputs, and the official notebook warns against it. This module reproduces
the TensorFlow path:

1. resize, keeping the aspect ratio, so that the short side equals `crop_size`: bilinear, half-pixel centres,
   *no antialiasing* (`tf.image.resize(..., method="bilinear", antialias=False)`); the other side is
   `round_half_to_even(float32(crop / short) * long)`, computed in float32 as TensorFlow does;
2. centre crop of fraction 1: a square of the short side, offset `int((size - side) / 2)`;
3. whitening on the 0-255 scale: `(x - 255 * mean) / (255 * std)` with CLIP's mean and std.

`resize_only=True` is the official variant that skips step 2 and squashes the image to `crop_size` x
`crop_size` (aspect ratio not kept).

The module is flat (torch, numpy, PIL and transformers only) so that it ships to the Hub as remote code.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    infer_channel_dimension_format,
    is_valid_image,
)
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging

logger = logging.get_logger(__name__)


class VeCLIPImageProcessorKwargs(ImagesKwargs, total=False):
    """`ImagesKwargs` plus `resize_only` (squash to a square instead of resize + centre crop)."""

    resize_only: bool | None


def veclip_resize_shape(height: int, width: int, crop_size: int) -> tuple[int, int]:
    """Output `(height, width)` of the aspect-preserving resize whose short side is `crop_size`.

    TensorFlow's `preserve_aspect_ratio=True` with a target of `(100000, crop)` (portrait) or `(crop, 100000)`
    (landscape, square) takes `scale = min(target_h / h, target_w / w)` in float32 and rounds
    `scale * side` half to even; the 100000 bound never wins for real images, so the scale is `crop / short`.
    """
    scale = np.float32(crop_size) / np.float32(min(height, width))
    new_height = int(np.round(scale * np.float32(height)))
    new_width = int(np.round(scale * np.float32(width)))
    return new_height, new_width


def resize_bilinear(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`(C, H, W)` float32 -> `(C, height, width)`: bilinear, half-pixel centres, no antialiasing.

    Same sampling grid as TensorFlow 2's `tf.image.resize(method="bilinear", antialias=False)`: source
    coordinate `(i + 0.5) * in / out - 0.5`, clamped at the borders (measured equal to TensorFlow within 1e-4
    after whitening, tests/test_veclip_image_processor.py).
    """
    if image.shape[-2:] == (height, width):
        return image  # TensorFlow's half-pixel grid maps every pixel onto itself
    return F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False, antialias=False)[0]


def center_crop_square(image: torch.Tensor) -> torch.Tensor:
    """`(C, H, W)` -> `(C, S, S)` with `S = min(H, W)`, offset `int((size - S) / 2)` as in VeCLIP's crop."""
    height, width = image.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[:, top : top + side, left : left + side]


def to_channels_first_rgb(image, input_data_format: ChannelDimension | str | None = None) -> torch.Tensor:
    """A PIL image, `(H, W)`, `(H, W, C)` or `(C, H, W)` array/tensor -> `(3, H, W)` float32 on the 0-255 scale.

    PIL images of any mode are converted to RGB; arrays with one channel are repeated to three and a fourth
    (alpha) channel is dropped. Values are used as they are: VeCLIP works on 0-255 pixels, so float arrays
    in [0, 1] would be whitened wrongly (a warning says so).
    """
    if hasattr(image, "convert") and hasattr(image, "mode"):  # PIL, imported lazily by transformers
        image = np.asarray(image.convert("RGB"))
        input_data_format = ChannelDimension.LAST
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
        input_data_format = ChannelDimension.LAST
    if array.ndim != 3:
        raise ValueError(f"images: expected a 2-D or 3-D image, got an array of shape {array.shape}")
    if input_data_format is None:
        try:
            input_data_format = infer_channel_dimension_format(array, num_channels=(1, 3, 4))
        except ValueError as error:
            raise ValueError(
                f"images: expected 1, 3 or 4 channels first or last, got an image of shape {array.shape} "
                "(pass input_data_format if the channel axis is ambiguous)"
            ) from error
    if ChannelDimension(input_data_format) == ChannelDimension.LAST:
        array = np.moveaxis(array, -1, 0)
    if array.shape[0] == 1:
        array = np.repeat(array, 3, axis=0)
    elif array.shape[0] == 4:
        array = array[:3]
    elif array.shape[0] != 3:
        raise ValueError(f"images: expected 1, 3 or 4 channels, got an image of shape {image.shape}")
    if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
        logger.warning_once(
            "VeCLIPImageProcessor: a float image with values in [0, 1] was given; VeCLIP whitens 0-255 pixels, "
            "so pass uint8 images (or multiply by 255)."
        )
    # One copy to float32 that keeps the memory layout: an `(H, W, C)` image stays channels-last, which torch's
    # bilinear kernel handles faster than a transposed copy.
    return torch.from_numpy(array.astype(np.float32))


class VeCLIPImageProcessor(BaseImageProcessor):
    r"""
    Image processor of the released VeCLIP models: TensorFlow-exact bilinear resize without antialiasing,
    centre crop, CLIP whitening on the 0-255 scale (see the module docstring).

    Args:
        crop_size (`int` or `dict`, defaults to 224):
            Output side `S` (`{"height": S, "width": S}`); the model's `vision_config.image_size`.
        resize_only (`bool`, defaults to `False`):
            Squash to `S` x `S` instead of resizing the short side and centre cropping (the official
            `resize_only` variant).
        image_mean, image_std (`list[float]`, default CLIP's):
            On the [0, 1] scale; whitening uses them times 255, as VeCLIP does.

    PIL images of any mode are converted to RGB (the TensorFlow function needs three channels).
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = VeCLIPImageProcessorKwargs

    def __init__(
        self,
        crop_size: int | dict[str, int] = 224,
        resize_only: bool = False,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs,
    ):
        # Keys other image processors write (size, do_resize, ...) are kept as attributes and ignored.
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.crop_size = {"height": self._side(crop_size), "width": self._side(crop_size)}
        self.resize_only = bool(resize_only)
        self.image_mean = list(OPENAI_CLIP_MEAN if image_mean is None else image_mean)
        self.image_std = list(OPENAI_CLIP_STD if image_std is None else image_std)

    @staticmethod
    def _side(crop_size: int | dict[str, int]) -> int:
        if isinstance(crop_size, dict):
            side = crop_size.get("height", crop_size.get("shortest_edge"))
            if side is None or crop_size.get("width", side) != side:
                raise ValueError(f"crop_size: VeCLIP crops a square, got {crop_size}")
            crop_size = side
        if not isinstance(crop_size, (int, np.integer)) or crop_size <= 0:
            raise ValueError(f"crop_size must be a positive int, got {crop_size!r}")
        return int(crop_size)

    def preprocess_one(self, image, crop_size: int, resize_only: bool, input_data_format=None) -> torch.Tensor:
        """One image -> `(3, crop_size, crop_size)` float32 whitened pixels."""
        pixels = to_channels_first_rgb(image, input_data_format)
        height, width = pixels.shape[-2:]
        if resize_only:
            pixels = resize_bilinear(pixels, crop_size, crop_size)
        else:
            pixels = center_crop_square(resize_bilinear(pixels, *veclip_resize_shape(height, width, crop_size)))
        # float32 throughout, the mean and std scaled in float64 first like the official constants.
        mean = torch.tensor([m * 255 for m in self.image_mean], dtype=torch.float32)[:, None, None]
        std = torch.tensor([s * 255 for s in self.image_std], dtype=torch.float32)[:, None, None]
        return (pixels - mean) / std

    def preprocess(
        self,
        images,
        crop_size: int | dict[str, int] | None = None,
        resize_only: bool | None = None,
        return_tensors: str | None = None,
        input_data_format: ChannelDimension | str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Images -> `BatchFeature` with `pixel_values` of shape `(B, 3, S, S)`.

        Args:
            images: a PIL image, array or tensor (`(H, W, C)`, `(C, H, W)` or `(H, W)`, 0-255), or a list of them.
            crop_size, resize_only: override the processor's settings for this call.
            return_tensors: `"pt"`, `"np"` or `None` (a stacked NumPy array).
            input_data_format: channel layout of array inputs when it cannot be inferred.
        """
        ignored = sorted(k for k, v in kwargs.items() if v is not None and k not in ("do_convert_rgb",))
        if ignored:
            logger.warning_once(f"VeCLIPImageProcessor ignores {ignored}: its pipeline is fixed (see its docstring)")
        side = self._side(crop_size if crop_size is not None else self.crop_size)
        resize_only = self.resize_only if resize_only is None else resize_only
        images = self._as_list(images)
        pixels = [self.preprocess_one(image, side, resize_only, input_data_format) for image in images]
        batch = torch.stack(pixels).contiguous() if pixels else torch.empty(0, 3, side, side)
        if return_tensors != "pt":
            batch = batch.numpy()
        return BatchFeature(data={"pixel_values": batch}, tensor_type=return_tensors)

    @staticmethod
    def _as_list(images) -> list:
        if isinstance(images, (list, tuple)):
            flat = [im for item in images for im in (item if isinstance(item, (list, tuple)) else [item])]
        elif isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            flat = list(images)
        else:
            flat = [images]
        for i, image in enumerate(flat):
            if not is_valid_image(image):
                raise ValueError(
                    f"images[{i}]: expected a PIL image, NumPy array or torch tensor, got {type(image).__name__}"
                )
        return flat


__all__ = ["VeCLIPImageProcessor", "veclip_resize_shape"]
