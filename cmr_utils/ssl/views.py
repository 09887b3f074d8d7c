"""Grayscale augmentations of one MRI slice and the methods' view transforms.

Tensors (1, H, W) float in [0, 1]; pure-Python torchvision ops only. ``make_simsiam_transform`` gives two
views, ``make_swav_transform`` lightly's multi-crop (two global views, then local ones); the dense methods take
views at the slice's own pixel size (``make_native_views``: one crop and flip shared by every view, so that pixel
(i, j) of one view is pixel (i, j) of the others, then each view its own intensity changes).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from lightly.transforms.multi_crop_transform import MultiCropTranform
from lightly.transforms.multi_view_transform import MultiViewTransform
from torch import Tensor, nn
from torchvision.transforms import v2

from .checks import require_float, require_int, require_range

_OVERSHOOT = 0.05


class _CheckSlice:
    """First step of every augmentation: rejects anything but a float (1, H, W) tensor in [0, 1]."""

    def __call__(self, image: Tensor) -> Tensor:
        if not isinstance(image, Tensor):
            raise TypeError(f"image must be a torch.Tensor (1, H, W), got {type(image).__name__}")
        if not image.is_floating_point():
            raise TypeError(f"image must be a float tensor in [0, 1], got dtype {image.dtype}")
        if image.ndim != 3 or image.shape[0] != 1:
            raise ValueError(f"image must have shape (1, H, W) (one channel), got {tuple(image.shape)}")
        low, high = float(image.min()), float(image.max())
        # a resized crop placed before this step (SwAV's multi-crop) may overshoot [0, 1] by interpolation
        if low < -_OVERSHOOT or high > 1.0 + _OVERSHOOT:
            raise ValueError(f"image values must lie in [0, 1], got [{low:.4g}, {high:.4g}]")
        return image.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RandomGamma(nn.Module):
    """x -> x ** gamma, gamma log-uniform in ``gamma_range`` (MRI intensity non-linearity)."""

    def __init__(self, gamma_range: tuple[float, float] = (0.7, 1.5)):
        super().__init__()
        lo, hi = require_range("gamma_range", gamma_range, 1e-3, 1e3)
        self.log_range = (math.log(lo), math.log(hi))

    def forward(self, image: Tensor) -> Tensor:
        # torch's RNG (not Python's) so that seeding and fixed-seed validation views cover it
        log_gamma = torch.empty(1).uniform_(*self.log_range).item()
        return image.clamp(0.0, 1.0).pow(math.exp(log_gamma))


class _ClampUnit:
    """Last step: interpolation and blur can step a hair outside [0, 1]."""

    def __call__(self, image: Tensor) -> Tensor:
        return image.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _blur_kernel_size(image_size: int) -> int:
    # about 10% of the image, odd, at least 3 (lightly's rule for GaussianBlur)
    size = max(3, int(0.1 * image_size))
    return size if size % 2 == 1 else size + 1


def make_grayscale_augmentation(
    image_size: int | None,
    *,
    crop_scale: tuple[float, float] = (0.4, 1.0),
    rotation_degrees: float = 15.0,
    brightness: float = 0.4,
    contrast: float = 0.4,
    jitter_prob: float = 0.8,
    gamma_range: tuple[float, float] = (0.7, 1.5),
    gamma_prob: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    blur_prob: float = 0.5,
    blur_kernel_size: int | None = None,
) -> v2.Compose:
    """Augmentation of one grayscale MRI slice tensor (1, H, W) in [0, 1] -> (1, size, size) in [0, 1].

    ``image_size=None`` leaves out the random resized crop (multi-crop adds its own) and then
    ``blur_kernel_size`` is required. No hue/saturation jitter, no ImageNet normalisation: one channel.
    The default crop keeps at least 40% of the slice, milder than lightly's 20%, because the heart is a
    small central part of a cardiac MRI field of view.
    """
    if image_size is not None:
        image_size = require_int("image_size", image_size, 8)
    crop_scale = require_range("crop_scale", crop_scale, 1e-3, 1.0)
    rotation_degrees = require_float("rotation_degrees", rotation_degrees, 0.0, strict=False)
    brightness = require_float("brightness", brightness, 0.0, strict=False)
    contrast = require_float("contrast", contrast, 0.0, strict=False)
    blur_sigma = require_range("blur_sigma", blur_sigma, 1e-3, 100.0)
    for name, prob in (("jitter_prob", jitter_prob), ("gamma_prob", gamma_prob), ("blur_prob", blur_prob)):
        if not 0.0 <= require_float(name, prob, 0.0, strict=False) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {prob}")
    if blur_kernel_size is None:
        if image_size is None:
            raise ValueError("blur_kernel_size is required when image_size is None (no crop)")
        blur_kernel_size = _blur_kernel_size(image_size)
    blur_kernel_size = require_int("blur_kernel_size", blur_kernel_size, 1)
    if blur_kernel_size % 2 == 0:
        raise ValueError(f"blur_kernel_size must be odd, got {blur_kernel_size}")

    steps: list[Callable[[Tensor], Tensor]] = [_CheckSlice()]
    if image_size is not None:
        steps.append(v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True))
    steps += [
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomVerticalFlip(p=0.5),
        v2.RandomRotation(rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR, fill=0.0),
        v2.RandomApply([v2.ColorJitter(brightness=brightness, contrast=contrast)], p=jitter_prob),
        v2.RandomApply([RandomGamma(gamma_range)], p=gamma_prob),
        v2.RandomApply([v2.GaussianBlur(blur_kernel_size, sigma=blur_sigma)], p=blur_prob),
        _ClampUnit(),
    ]
    return v2.Compose(steps)


def make_simsiam_transform(image_size: int, **augmentation_kwargs: Any) -> MultiViewTransform:
    """SimSiam views: slice (1, H, W) -> [view0, view1], each (1, image_size, image_size)."""
    augmentation = make_grayscale_augmentation(image_size, **augmentation_kwargs)
    return MultiViewTransform([augmentation, augmentation])


def make_swav_transform(
    image_size: int,
    *,
    n_local: int = 6,
    local_size: int | None = None,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.1, 0.4),
    **augmentation_kwargs: Any,
) -> MultiCropTranform:
    """SwAV multi-crop views: slice -> 2 global views (image_size) then ``n_local`` local views.

    Built on lightly's ``MultiCropTranform``: each view is a random resized crop followed by the
    grayscale augmentation without its own crop. ``local_size`` defaults to ``image_size // 2``.
    """
    image_size = require_int("image_size", image_size, 8)
    n_local = require_int("n_local", n_local, 0)
    local_size = image_size // 2 if local_size is None else local_size
    local_size = require_int("local_size", local_size, 4)
    global_scale = require_range("global_scale", global_scale, 1e-3, 1.0)
    local_scale = require_range("local_scale", local_scale, 1e-3, 1.0)
    if "crop_scale" in augmentation_kwargs:
        raise ValueError("crop_scale does not apply to SwAV: use global_scale and local_scale")
    augmentation_kwargs.setdefault("blur_kernel_size", _blur_kernel_size(image_size))
    augmentation = make_grayscale_augmentation(None, **augmentation_kwargs)
    return MultiCropTranform(
        crop_sizes=(image_size, local_size),
        crop_counts=(2, n_local),
        crop_min_scales=(global_scale[0], local_scale[0]),
        crop_max_scales=(global_scale[1], local_scale[1]),
        transforms=augmentation,
    )


def make_intensity_augmentation(*, brightness: float = 0.3, contrast: float = 0.3, jitter_prob: float = 0.8,
                                gamma_range: tuple[float, float] = (0.7, 1.5), gamma_prob: float = 0.5,
                                blur_sigma: tuple[float, float] = (0.1, 1.0), blur_prob: float = 0.3,
                                blur_kernel_size: int = 5) -> v2.Compose:
    """Intensity changes only (no geometry): brightness and contrast, gamma, blur; (1, H, W) in [0, 1]."""
    blur_sigma = require_range("blur_sigma", blur_sigma, 1e-3, 100.0)
    for name, prob in (("jitter_prob", jitter_prob), ("gamma_prob", gamma_prob), ("blur_prob", blur_prob)):
        if not 0.0 <= require_float(name, prob, 0.0, strict=False) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {prob}")
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(brightness=require_float("brightness", brightness, 0.0, strict=False),
                                       contrast=require_float("contrast", contrast, 0.0, strict=False))],
                       p=jitter_prob),
        v2.RandomApply([RandomGamma(gamma_range)], p=gamma_prob),
        v2.RandomApply([v2.GaussianBlur(require_int("blur_kernel_size", blur_kernel_size, 1), sigma=blur_sigma)],
                       p=blur_prob),
        _ClampUnit(),
    ])


class NativeViews:
    """``n_views`` views of one slice at its own pixel size: one random ``image_size`` crop (zero-padded where the
    slice is smaller) and one random flip pair shared by every view, then an independent intensity augmentation per
    view (none with ``intensity=False``)."""

    def __init__(self, image_size: int, n_views: int, intensity: bool = True, **intensity_kwargs: Any):
        self.image_size = require_int("image_size", image_size, 8)
        self.n_views = require_int("n_views", n_views, 1)
        self.geometry = v2.Compose([
            _CheckSlice(),
            v2.RandomCrop(self.image_size, pad_if_needed=True, fill=0.0),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomVerticalFlip(p=0.5),
        ])
        self.intensity = make_intensity_augmentation(**intensity_kwargs) if intensity else _ClampUnit()

    def __call__(self, image: Tensor) -> list[Tensor]:
        shared = self.geometry(image)
        return [self.intensity(shared) for _ in range(self.n_views)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, n_views={self.n_views})"


def make_native_views(image_size: int, n_views: int = 1, **kwargs: Any) -> NativeViews:
    """Views for the dense methods (masked image modelling: one; global + local contrastive: two)."""
    return NativeViews(image_size, n_views, **kwargs)
