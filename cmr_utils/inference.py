"""Prediction with a segmentation model: the one place that turns images into label maps and probabilities.

- :class:`LogitsWrapper` makes any segmentation model return its raw logits (B, C, H, W) as one tensor;
- :func:`predict`: label maps (N, H, W) uint8, and the logits if asked, in batches on the model's device;
- :func:`predict_probabilities`: softmax probabilities (N, C, H, W) float32, through the same batching, optionally
  averaged over the four flips of each image (test-time augmentation, each flip undone on its output);
- :func:`predict_field` / :func:`predict_volume`: the same for a volume's field larger than the training window,
  the heart located first;
- the input checks every model-running function shares: :func:`as_input_tensor`,
  :func:`check_batch_size`, :func:`model_device`, :func:`as_logits_model`.

Array conventions: images (N, H, W) float32 in [0, 1] (or (N, 1, H, W), numpy or tensor); label maps
uint8 (0 background, 1 RV, 2 MYO, 3 LV).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn


class LogitsWrapper(nn.Module):
    """Make any segmentation model return its raw logits (B, C, H, W) as one tensor.

    pytorch-grad-cam calls the model and hands the output to the target, so the output must be the
    logits tensor. Models that return a dict take the value under ``key`` (default ``"out"``, the
    torchvision convention) or, if the dict has a single entry, that entry; models that return a
    tuple/list take its first element.
    """

    def __init__(self, model: nn.Module, key: str = "out"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.model(x)
        if isinstance(output, Mapping):
            if self.key in output:
                output = output[self.key]
            elif len(output) == 1:
                output = next(iter(output.values()))
            else:
                raise ValueError(
                    f"model returned a dict without key {self.key!r} and with several entries "
                    f"({sorted(map(str, output))}); pass key= naming the logits"
                )
        elif isinstance(output, (tuple, list)):
            if len(output) == 0:
                raise ValueError("model returned an empty tuple/list; expected logits first")
            output = output[0]
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"model output must be logits of shape (B, C, H, W), got {shape}")
        return output


def as_logits_model(model: nn.Module) -> LogitsWrapper:
    """``model`` wrapped in a :class:`LogitsWrapper` (unless it already is one)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model if isinstance(model, LogitsWrapper) else LogitsWrapper(model)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def as_input_tensor(images, name: str = "images") -> torch.Tensor:
    """(N, H, W) or (N, 1, H, W), numpy or tensor -> a fresh float32 CPU tensor (N, 1, H, W).

    Made outside inference mode: an inference tensor cannot take part in autograd (a clone can)."""
    if isinstance(images, torch.Tensor):
        with torch.inference_mode(False):
            array = images.detach().to("cpu", torch.float32).clone()
    elif isinstance(images, np.ndarray):
        with torch.inference_mode(False):
            array = torch.from_numpy(np.array(images, dtype=np.float32))  # a copy: memmaps are read-only
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(images).__name__}")
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or array.shape[1] != 1:
        raise ValueError(f"{name} must have shape (N, H, W) or (N, 1, H, W), got {tuple(array.shape)}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    if not torch.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def check_batch_size(batch_size: int) -> None:
    """Raise ``ValueError`` unless ``batch_size`` is a positive integer."""
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _logits_batches(model: nn.Module, images, batch_size: int, per_batch: Callable[[torch.Tensor], object],
                    bf16: bool = False) -> list:
    """``per_batch(logits)`` for each batch of ``images``, in order: the one batching loop of this module.

    ``logits``: the model's raw output for the batch, (B, C, H, W) float32 on the CPU, computed under
    ``torch.no_grad`` on the model's device; with ``bf16``, under bf16 autocast (the precision a model trained in
    bf16 mixed precision ran in; ``cmr_utils.training.predicts_in_bf16`` says when)."""
    check_batch_size(batch_size)
    x = as_input_tensor(images)
    wrapped = as_logits_model(model)
    device = model_device(model)
    results = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(bf16)):
        for start in range(0, x.shape[0], batch_size):
            results.append(per_batch(wrapped(x[start:start + batch_size].to(device)).float().cpu()))
    return results


def predict(model: nn.Module, images, batch_size: int = 32, return_logits: bool = False, bf16: bool = False):
    """Label maps (N, H, W) uint8 = argmax of the logits, and the logits (N, C, H, W) float32 if asked.

    Returns ``(labels, logits)``; ``logits`` is ``None`` unless ``return_logits``. Runs under
    ``torch.no_grad`` on the model's device; the model's train/eval mode is left as it was (put it in
    eval mode yourself). ``bf16``: under bf16 autocast (``_logits_batches``).
    """
    batches = _logits_batches(model, images, batch_size,
                              lambda out: (out.argmax(dim=1).to(torch.uint8).numpy(),
                                           out.numpy() if return_logits else None), bf16)
    labels = np.concatenate([b[0] for b in batches])
    return labels, (np.concatenate([b[1] for b in batches]) if return_logits else None)


FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, left-right, up-down, both: the flips the CPU profiles train with


def predict_probabilities(model: nn.Module, images, batch_size: int = 16, flips: bool = False,
                          bf16: bool = False) -> np.ndarray:
    """Softmax probabilities (N, C, H, W) float32 of images (N, H, W) in [0, 1], in batches, under
    ``torch.no_grad`` on the model's device (put the model in eval mode yourself). The model maps
    (B, 1, H, W) to logits (B, C, H, W).

    ``flips``: the mean of the softmax over the image and its three flips (``FLIPS``), each flipped back
    first: test-time augmentation for a model trained with flips (4x the inference cost). ``bf16``: under bf16
    autocast (``_logits_batches``); the softmax is taken in float32 either way."""
    check_batch_size(batch_size)
    if np.ndim(images) != 3 or len(images) == 0:
        raise ValueError(f"images must have shape (N, H, W) with N >= 1, got {np.shape(images)}")
    if not flips:
        return np.concatenate(_logits_batches(model, images, batch_size,
                                              lambda out: torch.softmax(out, dim=1).numpy(), bf16))
    x = as_input_tensor(images)
    total = None
    for dims in FLIPS:
        flipped = torch.flip(x, dims) if dims else x
        probs = np.concatenate(_logits_batches(
            model, flipped, batch_size, lambda out, d=dims: torch.softmax(torch.flip(out, d) if d else out, dim=1).numpy(),
            bf16))
        total = probs if total is None else total + probs
    return total / len(FLIPS)


def pad_to_multiple(images: np.ndarray, multiple: int = 32) -> tuple[np.ndarray, tuple[slice, slice]]:
    """(N, H, W) zero-padded (centred) to the next multiple of ``multiple`` each way (the FPN's strides), and the
    (rows, cols) of the original pixels in it."""
    n, h, w = images.shape
    big_h, big_w = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    y, x = (big_h - h) // 2, (big_w - w) // 2
    padded = np.zeros((n, big_h, big_w), np.float32)
    padded[:, y:y + h, x:x + w] = images
    return padded, (slice(y, y + h), slice(x, x + w))


def heart_window(foreground: np.ndarray, window: int) -> tuple[int, int]:
    """Top-left (y, x) of the ``window`` x ``window`` square to predict in a field (Z, H, W) at least that large:
    the field's centre (where training windows sit), moved only as far as it takes to hold the bounding box of the
    heart (centred on the box where the box is larger than the window), and kept inside the field. Without
    foreground, the centre.

    The heart: the 3D connected component of ``foreground`` with the most voxels inside the centred window (the
    largest where none reaches into it). Outside the window it trained on, a model sees chest wall it never saw and
    can call it myocardium in blobs larger than the heart; inside it, it is on familiar ground (the choice and its
    measurements: ``docs/geometry.md``)."""
    from scipy import ndimage

    _, h, w = foreground.shape
    y, x = (h - window) // 2, (w - window) // 2
    components, n = ndimage.label(foreground)
    if n:
        sizes = np.bincount(components.ravel(), minlength=n + 1)[1:]
        inside = np.bincount(components[:, y:y + window, x:x + window].ravel(), minlength=n + 1)[1:]
        heart = 1 + int(inside.argmax() if inside.max() > 0 else sizes.argmax())
        _, ys, xs = np.nonzero(components == heart)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        y = (y0 + y1 - window) // 2 if y1 - y0 > window else min(max(y, y1 - window), y0)
        x = (x0 + x1 - window) // 2 if x1 - x0 > window else min(max(x, x1 - window), x0)
    return int(np.clip(y, 0, h - window)), int(np.clip(x, 0, w - window))


def predict_field(model: nn.Module, images, window: int, batch_size: int = 16, flips: bool = False,
                  bf16: bool = False) -> np.ndarray:
    """Softmax probabilities (N, C, H, W) of the slices (N, H, W) of one volume whose field is at least ``window``
    pixels each way, the heart located first: the whole field in one pass (fully convolutional, no flips) finds
    the heart, the centred ``window`` x ``window`` square is moved as far as it takes to hold it
    (``heart_window``) and predicted as in training (with ``flips`` where asked); outside it, background. A field
    of exactly ``window`` pixels is that square.

    Why not a sliding window: on the ACDC validation split, the whole field tiled with Gaussian-weighted windows
    (nnU-Net's) scored 0.854 on the original scans and 0.822 padded to twice their field, this 0.861 and 0.857
    (``docs/geometry.md``): tiles that cut the heart at their edge see it unlike training. Why not the window
    centred on the heart: a weak model's whole-field pass misplaces it (a frozen random encoder at 150 slices:
    0.508 against 0.613 with this)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or len(images) == 0 or min(images.shape[1:]) < window:
        raise ValueError(f"images must have shape (N, H, W) with N >= 1 and H, W >= {window}, got {images.shape}")
    n, h, w = images.shape
    if (h, w) == (window, window):
        return predict_probabilities(model, images, batch_size, flips, bf16)
    padded, (rows, cols) = pad_to_multiple(images)
    coarse = predict_probabilities(model, padded, batch_size, False, bf16)[:, :, rows, cols]
    y, x = heart_window(coarse.argmax(axis=1) > 0, window)
    probs = predict_probabilities(model, images[:, y:y + window, x:x + window], batch_size, flips, bf16)
    out = np.zeros((n, probs.shape[1], h, w), np.float32)
    out[:, 0] = 1.0
    out[:, :, y:y + window, x:x + window] = probs
    return out


def predict_volume(model: nn.Module, image: np.ndarray, geometry, batch_size: int = 16, flips: bool = False,
                   bf16: bool = False) -> np.ndarray:
    """Probabilities (Z, C, *geometry.canvas_shape) of a normalised volume (Z, h, w) in [0, 1] on its
    inference canvas (``geometry.to_canvas``: with physical geometry the whole field at the training spacing,
    padded to at least the training window), the heart located first where the field is larger
    (``predict_field``); ``geometry.to_native`` maps them to the volume's grid."""
    return predict_field(model, geometry.to_canvas(image), geometry.size, batch_size, flips, bf16)
