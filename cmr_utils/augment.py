"""Joint image + label augmentation of whole batches, on whatever device the batch lives on.

Applied to a batch ``(image (B, 1, H, W) float in [0, 1], label (B, H, W) int)`` after it reaches the
device, so that a GPU run augments on the GPU and a CPU run pays one vectorised call per batch instead of
per-sample Python work. What cardiac MRI segmentation usually uses, each switched off by its zero:

- ``flips``: random horizontal and vertical flips (the study's only augmentation);
- ``rotation_deg``: a rotation drawn uniformly in [-r, r] degrees;
- ``scale``: an isotropic zoom drawn uniformly in [1 - s, 1 + s], or for a pair ``[low, high]`` log-uniformly in
  [low, high] (a zoom above one enlarges the heart; a wide range such as [0.7, 1.4] covers other centres' fields
  of view);
- ``gamma``: an intensity gamma drawn log-uniformly in [1 - g, 1 / (1 - g)] (1 - g below one brightens);
- ``crop``: a ``crop`` x ``crop`` window at the slice's pixel size, placed uniformly at random within the
  slice (nnU-Net-style patches; the network is fully convolutional, so inference still sees the whole window).
  A 96 px window of a 128 px slice is 56 % of its pixels and of a training step's arithmetic.
- ``contrast``: each image's contrast about its mean scaled by a factor drawn in [1 - c, 1 + c] (other scanners and
  sequences, nnU-Net-style);
- ``brightness``: an offset drawn in [-b, b] added to each image (other centres' intensity normalisation);
- ``noise``: additive Gaussian noise with a standard deviation drawn in [0, n] per image (lower-SNR scanners);
- ``blur``: a Gaussian blur with a standard deviation drawn in [0, s] pixels per image, on the image only (coarser
  acquisitions and interpolation: other centres' resolution).

Order: flips, the geometric transforms, gamma, then contrast, brightness, noise and blur; the image is clamped to
[0, 1] after the last four when any of them is on. Their random numbers are drawn after the others' and only when they
are on, so with all four off (and a number ``scale``) a seed gives the same augmentation as before they existed.

The geometric transforms move image and label together (bilinear for the image, nearest for the label), in one
resampling; pixels that come from outside the slice are background (image 0, label 0).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _zoom_range(scale):
    """``scale`` as ``(on, low, high, log)``: a number s is a uniform zoom in [1 - s, 1 + s], a pair a log-uniform
    one (``low`` and ``high`` then their logarithms)."""
    def real(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
    if real(scale):
        if scale < 0:
            raise ValueError(f"augment_batch: scale must be a number s >= 0 (zoom in [1 - s, 1 + s]) or a pair "
                             f"[low, high] with 0 < low <= high, got {scale!r}")
        return scale > 0, 1 - scale, 1 + scale, False
    if isinstance(scale, (list, tuple)) and len(scale) == 2 and all(real(x) for x in scale) \
            and 0 < scale[0] <= scale[1]:
        return tuple(scale) != (1, 1), math.log(scale[0]), math.log(scale[1]), True
    raise ValueError(f"augment_batch: scale must be a number s >= 0 (zoom in [1 - s, 1 + s]) or a pair [low, high] "
                     f"with 0 < low <= high (zoom log-uniform in [low, high]), got {scale!r}")


def _gaussian_blur(image: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Each image of ``(B, 1, H, W)`` blurred by its own ``sigma`` (B,) pixels: two 1-D convolutions, kernel radius
    3 x ``max_sigma``, edges replicated; a sigma of (nearly) zero is the identity."""
    b, _, h, w = image.shape
    radius = max(1, math.ceil(3 * max_sigma))
    x = torch.arange(-radius, radius + 1, device=image.device, dtype=torch.float32)
    kernel = torch.exp(-x ** 2 / (2 * sigma.float().clamp_min(1e-6)[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).to(image.dtype)  # (B, 2 radius + 1)
    out = F.pad(image.reshape(1, b, h, w), (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel[:, None, None, :], groups=b)  # along the width
    out = F.conv2d(out, kernel[:, None, :, None], groups=b)  # along the height
    return out.reshape(b, 1, h, w)


def augment_batch(image: torch.Tensor, label: torch.Tensor, *, flips: bool = False, rotation_deg: float = 0.0,
                  scale: float | tuple[float, float] = 0.0, gamma: float = 0.0, crop: int = 0,
                  contrast: float = 0.0, brightness: float = 0.0, noise: float = 0.0, blur: float = 0.0,
                  generator: torch.Generator | None = None):
    """The augmented ``(image, label)``; a new pair of tensors, the inputs are left as they are."""
    if image.ndim != 4 or image.shape[1] != 1 or label.shape != (image.shape[0], *image.shape[2:]):
        raise ValueError(f"augment_batch: expected image (B, 1, H, W) and label (B, H, W), got "
                         f"{tuple(image.shape)} and {tuple(label.shape)}")
    b, device = image.shape[0], image.device
    zoom_on, zoom_low, zoom_high, log_zoom = _zoom_range(scale)
    for name, value, high in (("contrast", contrast, 1), ("brightness", brightness, 1), ("noise", noise, 1),
                              ("blur", blur, 10)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
            raise ValueError(f"augment_batch: {name} must be a number in [0, {high}], got {value!r}")

    def uniform(low, high):
        return low + (high - low) * torch.rand(b, generator=generator, device="cpu").to(device)

    if flips:
        flip_x, flip_y = uniform(0, 1) < 0.5, uniform(0, 1) < 0.5
        image = torch.where(flip_x[:, None, None, None], image.flip(-1), image)
        label = torch.where(flip_x[:, None, None], label.flip(-1), label)
        image = torch.where(flip_y[:, None, None, None], image.flip(-2), image)
        label = torch.where(flip_y[:, None, None], label.flip(-2), label)
    if rotation_deg > 0 or zoom_on or crop:
        angle = uniform(-rotation_deg, rotation_deg) * (math.pi / 180)
        zoom = uniform(zoom_low, zoom_high)
        if log_zoom:
            zoom = torch.exp(zoom)
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
    if contrast:
        mean = image.mean(dim=(1, 2, 3), keepdim=True)
        image = mean + (image - mean) * uniform(1 - contrast, 1 + contrast)[:, None, None, None]
    if brightness:
        image = image + uniform(-brightness, brightness)[:, None, None, None]
    if noise:
        sigma = uniform(0, noise)[:, None, None, None]
        image = image + sigma * torch.randn(image.shape, generator=generator, device="cpu").to(device, image.dtype)
    if blur:
        image = _gaussian_blur(image, uniform(0, blur), blur)
    if contrast or brightness or noise or blur:
        image = image.clamp(0, 1)
    return image, label
