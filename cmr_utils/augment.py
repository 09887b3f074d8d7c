"""Joint image + label augmentation of whole batches, on whatever device the batch lives on.

Applied to a batch ``(image (B, 1, H, W) float in [0, 1], label (B, H, W) int)`` after it reaches the
device, so that a GPU run augments on the GPU and a CPU run pays one vectorised call per batch instead of
per-sample Python work. What cardiac MRI segmentation usually uses, each switched off by its zero:

- ``flips``: random horizontal and vertical flips (the study's only augmentation);
- ``rotation_deg``: a rotation drawn uniformly in [-r, r] degrees;
- ``scale``: an isotropic zoom drawn uniformly in [1 - s, 1 + s];
- ``gamma``: an intensity gamma drawn log-uniformly in [1 - g, 1 / (1 - g)] (1 - g below one brightens);
- ``crop``: a ``crop`` x ``crop`` window at the slice's pixel size, placed uniformly at random within the
  slice (nnU-Net-style patches; the network is fully convolutional, so inference still sees whole slices).
  A 96 px window of a 128 px slice is 56 % of its pixels and of a training step's arithmetic.

The geometric transforms move image and label together (bilinear for the image, nearest for the label), in one
resampling; pixels that come from outside the slice are background (image 0, label 0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment_batch(image: torch.Tensor, label: torch.Tensor, *, flips: bool = False, rotation_deg: float = 0.0,
                  scale: float = 0.0, gamma: float = 0.0, crop: int = 0, generator: torch.Generator | None = None):
    """The augmented ``(image, label)``; a new pair of tensors, the inputs are left as they are."""
    if image.ndim != 4 or image.shape[1] != 1 or label.shape != (image.shape[0], *image.shape[2:]):
        raise ValueError(f"augment_batch: expected image (B, 1, H, W) and label (B, H, W), got "
                         f"{tuple(image.shape)} and {tuple(label.shape)}")
    b, device = image.shape[0], image.device

    def uniform(low, high):
        return low + (high - low) * torch.rand(b, generator=generator, device="cpu").to(device)

    if flips:
        flip_x, flip_y = uniform(0, 1) < 0.5, uniform(0, 1) < 0.5
        image = torch.where(flip_x[:, None, None, None], image.flip(-1), image)
        label = torch.where(flip_x[:, None, None], label.flip(-1), label)
        image = torch.where(flip_y[:, None, None, None], image.flip(-2), image)
        label = torch.where(flip_y[:, None, None], label.flip(-2), label)
    if rotation_deg > 0 or scale > 0 or crop:
        angle = uniform(-rotation_deg, rotation_deg) * (math.pi / 180)
        zoom = uniform(1 - scale, 1 + scale)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # output -> input coordinates
        theta = torch.zeros(b, 2, 3, device=device, dtype=torch.float32)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        shape = list(image.shape)
        if crop:
            h, w = shape[2:]
            if isinstance(crop, bool) or not isinstance(crop, int) or not 0 < crop <= min(h, w):
                raise ValueError(f"augment_batch: crop must be a whole number of pixels up to the slices' {h} x {w}, "
                                 f"got {crop!r}")
            theta[:, 0, :2] *= crop / w  # the window's pixels are the slice's: output -> input scaled by crop / size
            theta[:, 1, :2] *= crop / h
            theta[:, 0, 2] = uniform(-(1 - crop / w), 1 - crop / w)
            theta[:, 1, 2] = uniform(-(1 - crop / h), 1 - crop / h)
            shape[2:] = [crop, crop]
        grid = F.affine_grid(theta, shape, align_corners=False)
        image = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        label = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)[:, 0].to(label.dtype)
    if gamma > 0:
        if not gamma < 1:
            raise ValueError(f"augment_batch: gamma must be in [0, 1), got {gamma}")
        log_g = uniform(math.log(1 - gamma), -math.log(1 - gamma))
        image = image.clamp(0, 1) ** torch.exp(log_g)[:, None, None, None]
    return image, label
