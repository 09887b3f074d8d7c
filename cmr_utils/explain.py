"""Seg-Grad-CAM explanations of the segmentation models and the numbers that judge them.

Seg-Grad-CAM (Vinogradova et al. 2020) is Grad-CAM with a segmentation target: the sum of one class's
logits over a region of pixels. It is computed here with pytorch-grad-cam (``GradCAM`` +
``SemanticSegmentationTarget``); the region is the model's own predicted mask of the class by default,
or any given mask (for instance the ground truth).

What this module holds:

- model plumbing: :class:`LogitsWrapper`, :func:`resolve_layer`, :func:`predict`;
- the CAMs: :func:`seg_grad_cam`;
- numbers for explanations (pure numpy, one value per slice): :func:`energy_inside`,
  :func:`energy_in_ring`, :func:`pointing_hit`, :func:`cam_rank_correlation`;
- faithfulness and sanity checks that re-run the model: :func:`deletion_insertion`,
  :func:`randomised_copy`, :func:`sanity_check_randomised`;
- choosing and drawing slices: :func:`select_slices`, :func:`overlay`, :class:`ExplanationRow`,
  :func:`build_rows`, :func:`plot_explanations`, :func:`plot_initialisations`.

Array conventions: images (N, H, W) float32 in [0, 1]; label maps uint8 (0 background, 1 RV, 2 MYO,
3 LV); CAMs (N, H, W) float32 in [0, 1]. Functions that take one slice (H, W) also take a stack
(N, H, W) and then return one value per slice.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import ndimage
from scipy.stats import rankdata
from torch import nn

from .metrics import STRUCTURES  # noqa: E402  (1 RV, 2 MYO, 3 LV)
DEFAULT_LAYER = "encoder.layer4"
# Label-map colours: background black, RV red, MYO green, LV blue.


# --------------------------------------------------------------------------------------------- plumbing


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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, LogitsWrapper) else model


def _wrap(model: nn.Module) -> LogitsWrapper:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model if isinstance(model, LogitsWrapper) else LogitsWrapper(model)


def resolve_layer(model: nn.Module, name: str = DEFAULT_LAYER) -> nn.Module:
    """The sub-module of ``model`` called ``name`` (dotted path, e.g. ``"encoder.layer4"``).

    A :class:`LogitsWrapper` is looked through. An unknown name raises ``ValueError`` listing the
    valid names two levels deep (``encoder.layer3``, ``decoder.p5``, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"layer name must be a non-empty string, got {name!r}")
    inner = _unwrap(model)
    try:
        return inner.get_submodule(name)
    except AttributeError:
        candidates = []
        for top_name, top in inner.named_children():
            candidates.append(top_name)
            candidates.extend(f"{top_name}.{child}" for child, _ in top.named_children())
        raise ValueError(
            f"unknown layer {name!r}; valid layers include: {', '.join(candidates)}"
        ) from None


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _as_input_tensor(images, name: str = "images") -> torch.Tensor:
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


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def predict(model: nn.Module, images, batch_size: int = 32, return_logits: bool = False):
    """Label maps (N, H, W) uint8 = argmax of the logits, and the logits (N, C, H, W) float32 if asked.

    Returns ``(labels, logits)``; ``logits`` is ``None`` unless ``return_logits``. Runs under
    ``torch.no_grad`` on the model's device; the model's train/eval mode is left as it was (put it in
    eval mode yourself).
    """
    _check_batch_size(batch_size)
    x = _as_input_tensor(images)
    wrapped = _wrap(model)
    device = _model_device(model)
    labels, logits = [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            out = wrapped(x[start:start + batch_size].to(device)).float().cpu()
            labels.append(out.argmax(dim=1).to(torch.uint8).numpy())
            if return_logits:
                logits.append(out.numpy())
    return np.concatenate(labels), (np.concatenate(logits) if return_logits else None)


# --------------------------------------------------------------------------------------------- CAMs


class _GradientCut:
    """Make ``layer``'s output a fresh leaf that requires grad, for the duration of a ``with`` block.

    Grad-CAM needs only d(target)/d(activations of the layer). Cutting the graph at the layer skips the
    backward pass through the earlier layers, and lets the CAM be computed whatever the parameters'
    ``requires_grad`` are (a frozen encoder included). Registered before GradCAM's own hooks so that
    those see the leaf.
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.handle = None

    def __enter__(self):
        def cut(module, inputs, output):
            return output.detach().requires_grad_(True)

        self.handle = self.layer.register_forward_hook(cut)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def seg_grad_cam(
    model: nn.Module,
    images,
    category: int,
    masks: np.ndarray | None = None,
    layer: str = DEFAULT_LAYER,
    batch_size: int = 16,
) -> np.ndarray:
    """Seg-Grad-CAM of class ``category`` for each slice: (N, H, W) float32 in [0, 1].

    Parameters
    ----------
    model : segmentation model returning logits (B, C, H, W) (dict/tuple outputs are unwrapped).
    images : (N, H, W) numpy array or (N, 1, H, W) tensor, float in [0, 1].
    category : class whose logits are explained (1 RV, 2 MYO, 3 LV; 0 background is allowed).
    masks : (N, H, W) region per slice (bool or 0/1), e.g. the ground truth of ``category``. ``None``
        (default) uses the model's predicted mask of ``category`` (argmax of its logits).
    layer : dotted name of the layer whose activations are weighted (see :func:`resolve_layer`).

    The target of slice i is the sum of class-``category`` logits over its region. A slice whose region
    is empty has no target, so its CAM is all zeros (a documented value, not an error). Otherwise each
    CAM is min-max scaled to [0, 1] by pytorch-grad-cam, after a ReLU; so a CAM is also all zeros when
    no location has a positive weighted activation, or when the layer's map is constant (a layer at
    1x1 resolution, e.g. ``encoder.layer4`` of a 32 px input, always gives zeros: use >= 64 px).

    The model is run in eval mode throughout (as pytorch-grad-cam does), so the result is deterministic.
    Gradients are switched on whatever the caller's context (``no_grad`` or ``inference_mode``); every
    module's train/eval mode and the parameters' ``requires_grad`` and ``.grad`` are restored on exit.
    """
    wrapped = _wrap(model)
    if not isinstance(category, (int, np.integer)) or isinstance(category, bool) or category < 0:
        raise ValueError(f"category must be a non-negative integer class index, got {category!r}")
    _check_batch_size(batch_size)
    x = _as_input_tensor(images)
    target_layer = resolve_layer(wrapped, layer)
    if any(p.is_inference() for p in wrapped.parameters()):
        raise ValueError(
            "the model's parameters are inference tensors (created under torch.inference_mode); "
            "build or load the model outside inference mode to compute gradients"
        )

    # pytorch-grad-cam puts the model in eval mode; do it for the whole computation (the predicted
    # region included) and give every module its own mode back afterwards.
    saved_modes = [(module, module.training) for module in wrapped.modules()]
    wrapped.eval()
    try:
        n_classes = _probe(wrapped, x, target_layer, layer)
        if category >= n_classes:
            raise ValueError(f"category must be < the model's {n_classes} classes, got {category}")
        regions = _target_regions(wrapped, x, category, masks, batch_size)
        cams = _grad_cam(wrapped, x, category, regions, target_layer, batch_size)
    finally:
        for module, training in saved_modes:
            module.training = training
    if not np.isfinite(cams).all():
        raise RuntimeError("Grad-CAM produced non-finite values; check the model's outputs and gradients")
    return np.clip(cams, 0.0, 1.0)


def _target_regions(wrapped: nn.Module, x: torch.Tensor, category: int, masks, batch_size: int) -> np.ndarray:
    """The (N, H, W) boolean region of each slice: the given masks, or the predicted mask of ``category``."""
    n_slices, height, width = x.shape[0], x.shape[2], x.shape[3]
    if masks is None:
        predicted, _ = predict(wrapped, x, batch_size=batch_size)
        return predicted == category
    regions = np.asarray(masks)
    if regions.shape != (n_slices, height, width):
        raise ValueError(f"masks must have shape {(n_slices, height, width)}, got {regions.shape}")
    if not np.isin(regions, (0, 1)).all():
        raise ValueError("masks must be binary (bool or 0/1)")
    return regions.astype(bool)


def _grad_cam(wrapped: nn.Module, x: torch.Tensor, category: int, regions: np.ndarray,
              target_layer: nn.Module, batch_size: int) -> np.ndarray:
    """pytorch-grad-cam's GradCAM over the slices with a non-empty region; zeros for the others."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    n_slices = x.shape[0]
    cams = np.zeros((n_slices, x.shape[2], x.shape[3]), dtype=np.float32)
    to_explain = np.flatnonzero(regions.reshape(n_slices, -1).any(axis=1))
    if to_explain.size == 0:
        return cams

    parameters = list(wrapped.parameters())
    saved_requires_grad = [p.requires_grad for p in parameters]
    saved_grads = [p.grad for p in parameters]  # GradCAM calls model.zero_grad(), which drops them
    with torch.inference_mode(False), torch.enable_grad():
        try:
            # No weight gradients are needed: only those of the layer's activations (see _GradientCut).
            for p in parameters:
                p.requires_grad_(False)
            with _GradientCut(target_layer):
                cam = GradCAM(model=wrapped, target_layers=[target_layer])
                try:
                    for start in range(0, to_explain.size, batch_size):
                        batch = to_explain[start:start + batch_size]
                        targets = [
                            SemanticSegmentationTarget(category, regions[i].astype(np.float32))
                            for i in batch
                        ]
                        cams[batch] = cam(input_tensor=x[batch], targets=targets)
                finally:
                    cam.activations_and_grads.release()
        finally:
            for p, requires_grad, grad in zip(parameters, saved_requires_grad, saved_grads):
                p.requires_grad_(requires_grad)
                p.grad = grad
    return cams


def _probe(wrapped: nn.Module, x: torch.Tensor, target_layer: nn.Module, layer: str) -> int:
    """Run one slice to check that ``layer`` is called and yields a (B, K, h, w) tensor; return the
    number of output classes (to validate ``category`` before explaining)."""
    seen = []
    handle = target_layer.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        with torch.no_grad():
            n_classes = int(wrapped(x[:1].to(_model_device(wrapped))).shape[1])
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"layer {layer!r} is not called in the model's forward pass; pick another layer")
    if not isinstance(seen[-1], torch.Tensor) or seen[-1].ndim != 4:
        raise ValueError(f"layer {layer!r} must output a (B, K, h, w) tensor to be explained by Grad-CAM")
    return n_classes


# --------------------------------------------------------------------------------------------- numbers


def _cam_and_mask(cam, mask) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validate a CAM and a mask of the same shape; return them as (N, H, W) and whether it was 2-D."""
    cam = np.asarray(cam, dtype=np.float64)
    mask = np.asarray(mask)
    if cam.ndim not in (2, 3):
        raise ValueError(f"cam must have shape (H, W) or (N, H, W), got {cam.shape}")
    if mask.shape != cam.shape:
        raise ValueError(f"mask must have the cam's shape {cam.shape}, got {mask.shape}")
    if not np.isfinite(cam).all() or (cam < 0).any():
        raise ValueError("cam must be finite and non-negative")
    if mask.dtype != bool:
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("mask must be binary (bool or 0/1)")
        mask = mask.astype(bool)
    single = cam.ndim == 2
    return (cam[None], mask[None], single) if single else (cam, mask, single)


def _per_slice(values: np.ndarray, single: bool):
    return float(values[0]) if single else values


def _energy_fraction(cam: np.ndarray, region: np.ndarray, mask: np.ndarray) -> np.ndarray:
    total = cam.sum(axis=(1, 2))
    inside = (cam * region).sum(axis=(1, 2))
    undefined = (total == 0) | ~mask.any(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(undefined, np.nan, inside / np.where(total == 0, 1.0, total))


def energy_inside(cam, mask):
    """Fraction of the CAM's energy (its sum) that lies inside ``mask``.

    1 means all relevance is on the structure, 0 none. NaN when the CAM sums to 0 or the mask is empty.
    (H, W) inputs give a float; (N, H, W) give an array (N,).
    """
    cam, mask, single = _cam_and_mask(cam, mask)
    return _per_slice(_energy_fraction(cam, mask, mask), single)


def ring_around(mask, width: int = 3) -> np.ndarray:
    """Pixels within ``width`` px of ``mask`` (8-connected dilation, i.e. a square neighbourhood) but
    outside it; slices of an (N, H, W) stack are dilated separately."""
    if not isinstance(width, (int, np.integer)) or isinstance(width, bool) or width < 1:
        raise ValueError(f"width must be a positive integer number of pixels, got {width!r}")
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must have shape (H, W) or (N, H, W), got {mask.shape}")
    structure = np.ones((3, 3), dtype=bool)
    if mask.ndim == 3:
        # no growth across slices
        structure = np.stack([np.zeros((3, 3), bool), structure, np.zeros((3, 3), bool)])
    dilated = ndimage.binary_dilation(mask, structure=structure, iterations=width)
    return dilated & ~mask


def energy_in_ring(cam, mask, width: int = 3):
    """Fraction of the CAM's energy in a ring of ``width`` px around ``mask`` (see :func:`ring_around`).

    A CAM that explains a structure by its border (the context a segmentation network relies on) has
    a large ring fraction. NaN when the CAM sums to 0 or the mask is empty; 0 when the ring is empty
    (the mask fills the image).
    """
    cam, mask, single = _cam_and_mask(cam, mask)
    return _per_slice(_energy_fraction(cam, ring_around(mask, width), mask), single)


def pointing_hit(cam, mask):
    """Pointing game: is the CAM's maximum inside ``mask``?

    Ties count as a hit if any maximal pixel is inside. For one slice returns ``True``/``False``, or
    ``nan`` when the CAM is all zero or the mask empty; for a stack returns floats (1.0, 0.0, nan) so
    that ``np.nanmean`` gives the hit rate.
    """
    cam, mask, single = _cam_and_mask(cam, mask)
    peak = cam.max(axis=(1, 2), keepdims=True)
    hit = ((cam == peak) & mask).any(axis=(1, 2))
    undefined = (peak[:, 0, 0] == 0) | ~mask.any(axis=(1, 2))
    values = np.where(undefined, np.nan, hit.astype(float))
    if single:
        return float("nan") if undefined[0] else bool(hit[0])
    return values


def cam_rank_correlation(cam_a, cam_b):
    """Spearman rank correlation between two CAMs over their pixels, per slice.

    Computed as the Pearson correlation of average ranks, which is what ``scipy.stats.spearmanr``
    does, vectorised over slices. NaN for a slice where either CAM is constant (no ranking).
    (H, W) inputs give a float; (N, H, W) give an array (N,).
    """
    a = np.asarray(cam_a, dtype=np.float64)
    b = np.asarray(cam_b, dtype=np.float64)
    if a.ndim not in (2, 3) or a.shape != b.shape:
        raise ValueError(f"cam_a and cam_b must share a shape (H, W) or (N, H, W), got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("cams must be finite")
    single = a.ndim == 2
    a = a.reshape(1 if single else a.shape[0], -1)
    b = b.reshape(a.shape)
    rank_a = rankdata(a, axis=1)
    rank_b = rankdata(b, axis=1)
    rank_a -= rank_a.mean(axis=1, keepdims=True)
    rank_b -= rank_b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((rank_a**2).sum(axis=1) * (rank_b**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(denominator == 0, np.nan, (rank_a * rank_b).sum(axis=1) / denominator)
    return _per_slice(np.clip(rho, -1.0, 1.0), single)


# --------------------------------------------------------------------------------------------- faithfulness


def _baseline_image(image: np.ndarray, baseline: str, blur_sigma: float) -> np.ndarray:
    if baseline == "blur":
        return ndimage.gaussian_filter(image, sigma=blur_sigma, mode="reflect").astype(np.float32)
    if baseline == "mean":
        return np.full_like(image, image.mean(), dtype=np.float32)
    raise ValueError(f"baseline must be 'blur' or 'mean', got {baseline!r}")


def _auc(fractions: np.ndarray, curve: np.ndarray) -> float:
    return float(np.trapezoid(curve, fractions))


def deletion_insertion(
    model: nn.Module,
    image: np.ndarray,
    category: int,
    cam: np.ndarray,
    region_mask: np.ndarray,
    steps: int = 10,
    baseline: str = "blur",
    blur_sigma: float = 5.0,
    seed: int = 0,
) -> dict:
    """Deletion and insertion curves of one slice's CAM (Petsiuk et al. 2018, for segmentation).

    Pixels are ordered by CAM value, most relevant first (ties by pixel index, stable). For each of
    ``steps + 1`` fractions f = 0, 1/steps, ..., 1 of the pixels:

    - deletion: the first f of the pixels are replaced by the baseline image;
    - insertion: the image starts as the baseline and the first f of the pixels are restored;

    and the score is the sum of the class-``category`` logits inside ``region_mask`` (the region is
    fixed, e.g. the unperturbed prediction or the ground truth). The same curves in a random pixel order
    (``numpy.random.default_rng(seed)``) are the reference: a faithful CAM makes the deletion score drop
    faster than random (lower AUC) and the insertion score rise faster (higher AUC).

    Baselines: ``"blur"`` a Gaussian blur of the image (``blur_sigma`` px), ``"mean"`` its mean value.

    Normalisation: curves are divided by ``|score_unperturbed|`` so a positive score starts at 1 (at
    -1 for a negative one; dividing by a positive number keeps the order of the curves, so AUC
    comparisons stay valid). AUC = trapezoidal area over f in [0, 1]. If the unperturbed score is 0
    (e.g. an empty ``region_mask``) the normalised curves and AUCs are NaN; raw scores are returned
    too.

    Returns a dict: ``fractions``; raw scores ``deletion``, ``insertion``, ``random_deletion``,
    ``random_insertion``; the normalised ``*_curve``; ``deletion_auc``, ``insertion_auc``,
    ``random_deletion_auc``, ``random_insertion_auc``; ``score_unperturbed``, ``score_baseline``.
    """
    image = np.asarray(image, dtype=np.float32)
    cam = np.asarray(cam, dtype=np.float64)
    region_mask = np.asarray(region_mask)
    if image.ndim != 2:
        raise ValueError(f"image must be one slice (H, W), got shape {image.shape}")
    if cam.shape != image.shape or region_mask.shape != image.shape:
        raise ValueError(
            f"cam and region_mask must have the image's shape {image.shape}, got {cam.shape} and {region_mask.shape}"
        )
    if not np.isfinite(cam).all():
        raise ValueError("cam must be finite")
    if not np.isin(region_mask, (0, 1)).all():
        raise ValueError("region_mask must be binary (bool or 0/1)")
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(category, (int, np.integer)) or isinstance(category, bool) or category < 0:
        raise ValueError(f"category must be a non-negative integer class index, got {category!r}")
    base = _baseline_image(image, baseline, blur_sigma)
    region = torch.from_numpy(region_mask.astype(np.float32))

    n_pixels = image.size
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.rint(fractions * n_pixels).astype(int)
    # most relevant first; a stable sort on -cam breaks ties by pixel index
    cam_order = np.argsort(-cam.ravel(), kind="stable")
    random_order = np.random.default_rng(seed).permutation(n_pixels)

    def perturbed(order: np.ndarray, start: np.ndarray, fill: np.ndarray) -> np.ndarray:
        stack = np.repeat(start.ravel()[None], len(counts), axis=0)
        for row, count in enumerate(counts):
            chosen = order[:count]
            stack[row, chosen] = fill.ravel()[chosen]
        return stack.reshape(len(counts), *image.shape)

    stacks = [
        perturbed(cam_order, image, base),  # deletion
        perturbed(cam_order, base, image),  # insertion
        perturbed(random_order, image, base),  # random deletion
        perturbed(random_order, base, image),  # random insertion
    ]
    _, logits = predict(model, np.concatenate(stacks), return_logits=True)
    if category >= logits.shape[1]:
        raise ValueError(f"category must be < the model's {logits.shape[1]} classes, got {category}")
    scores = (torch.from_numpy(logits[:, category]) * region).sum(dim=(1, 2)).double().numpy()
    deletion, insertion, random_deletion, random_insertion = np.split(scores, 4)

    score_unperturbed = float(deletion[0])
    score_baseline = float(insertion[0])
    scale = abs(score_unperturbed)
    result = {
        "fractions": fractions,
        "deletion": deletion,
        "insertion": insertion,
        "random_deletion": random_deletion,
        "random_insertion": random_insertion,
        "score_unperturbed": score_unperturbed,
        "score_baseline": score_baseline,
    }
    for name in ("deletion", "insertion", "random_deletion", "random_insertion"):
        curve = result[name] / scale if scale > 0 else np.full_like(result[name], np.nan)
        result[f"{name}_curve"] = curve
        result[f"{name}_auc"] = _auc(fractions, curve) if scale > 0 else float("nan")
    return result


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` with every weight re-initialised at random (same architecture).

    Each sub-module's own ``reset_parameters`` is called (batch-norm running statistics are reset
    too), under ``torch.manual_seed(seed)`` in a forked RNG so the global RNG is left untouched. The
    copy keeps the original's train/eval modes and device.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # outside inference mode, or the copy's parameters would be inference tensors (no gradients)
    with torch.inference_mode(False):
        clone = copy.deepcopy(model)
    devices = [d for d in {p.device for p in clone.parameters()} if d.type == "cuda"]
    with torch.inference_mode(False), torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        reset = 0
        for module in clone.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
                reset += 1
    if reset == 0:
        raise ValueError("model has no module with reset_parameters(); cannot randomise it")
    return clone


def sanity_check_randomised(
    model: nn.Module,
    images,
    category: int,
    layer: str = DEFAULT_LAYER,
    seed: int = 0,
    masks: np.ndarray | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Model-randomisation sanity check (Adebayo et al. 2018): per-slice Spearman correlation between
    the CAMs of ``model`` and of :func:`randomised_copy` ``(model, seed)``.

    Both CAMs explain the same region, so only the weights differ: ``masks`` if given, else ``model``'s
    predicted mask of ``category``. A CAM that depends on what the model learned correlates weakly with
    the random model's; one that merely reflects the image correlates highly. Returns (N,) floats in
    [-1, 1], NaN where a CAM is constant (e.g. an empty region).
    """
    x = _as_input_tensor(images)
    if masks is None:
        predicted, _ = predict(model, x, batch_size=batch_size)
        masks = predicted == category
    trained = seg_grad_cam(model, x, category, masks=masks, layer=layer, batch_size=batch_size)
    random_model = randomised_copy(model, seed=seed)
    randomised = seg_grad_cam(random_model, x, category, masks=masks, layer=layer, batch_size=batch_size)
    return np.atleast_1d(cam_rank_correlation(trained, randomised))


# --------------------------------------------------------------------------------------------- choosing slices


def select_slices(scores, n_best: int = 5, n_worst: int = 5, n_median: int = 3) -> dict[str, np.ndarray]:
    """Indices of the best, median and worst slices by ``scores`` (e.g. per-slice Dice), NaNs ignored.

    - ``"best"``: highest scores, in descending order;
    - ``"worst"``: lowest scores, in ascending order;
    - ``"median"``: the slices whose rank is closest to the median rank, in ascending score order.

    Ties are broken by index (lower first). With fewer valid slices than requested, slices are dealt to
    the groups in turn (best, worst, median, best, ...) so that no slice appears in two groups and each
    group gets a share. Raises ``ValueError`` when no score is valid.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"scores must be one-dimensional, got shape {values.shape}")
    for name, count in (("n_best", n_best), ("n_worst", n_worst), ("n_median", n_median)):
        if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {count!r}")
    valid = np.flatnonzero(~np.isnan(values))
    if valid.size == 0:
        raise ValueError("scores has no valid (non-NaN) value to select from")

    # lexsort sorts by the last key first; index as the secondary key breaks ties by index
    ascending = valid[np.lexsort((valid, values[valid]))]
    descending = valid[np.lexsort((valid, -values[valid]))]
    positions = np.arange(valid.size)
    median_position = (valid.size - 1) / 2
    by_closeness = ascending[np.lexsort((positions, np.abs(positions - median_position)))]

    wanted = {"best": n_best, "worst": n_worst, "median": n_median}
    quota = dict.fromkeys(wanted, 0)
    available = valid.size
    while available > 0 and any(quota[g] < wanted[g] for g in wanted):
        for group in ("best", "worst", "median"):
            if available > 0 and quota[group] < wanted[group]:
                quota[group] += 1
                available -= 1

    taken: set[int] = set()

    def take(candidates: np.ndarray, count: int) -> list[int]:
        chosen = [int(i) for i in candidates if int(i) not in taken][:count]
        taken.update(chosen)
        return chosen

    best = take(descending, quota["best"])
    worst = take(ascending, quota["worst"])
    median = take(by_closeness, quota["median"])
    rank_of = {int(i): r for r, i in enumerate(ascending)}
    median.sort(key=rank_of.__getitem__)
    as_array = lambda idx: np.asarray(idx, dtype=np.int64)  # noqa: E731
    return {"best": as_array(best), "median": as_array(median), "worst": as_array(worst)}


# --------------------------------------------------------------------------------------------- drawing


def overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """The CAM as a jet heat map over the grey image: (H, W, 3) float32 RGB in [0, 1].

    Uses ``pytorch_grad_cam.utils.image.show_cam_on_image`` (which wants a float RGB image in [0, 1]
    and returns uint8; converted back to float here).
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    image = np.asarray(image, dtype=np.float32)
    cam = np.asarray(cam, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"image must be one grey slice (H, W), got shape {image.shape}")
    if cam.shape != image.shape:
        raise ValueError(f"cam must have the image's shape {image.shape}, got {cam.shape}")
    for name, array in (("image", image), ("cam", cam)):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{name} must be finite with values in [0, 1]")
    rgb = np.repeat(image[..., None], 3, axis=2)
    return show_cam_on_image(rgb, cam, use_rgb=True, image_weight=image_weight).astype(np.float32) / 255.0


def label_colormap():
    """Matplotlib colormap and norm for label maps 0..3 (background, RV, MYO, LV)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    from .plots import LABEL_COLOURS  # one colour per structure across every figure

    colours = [(0.0, 0.0, 0.0)] + [LABEL_COLOURS[k] for k in sorted(STRUCTURES)]
    cmap = ListedColormap(colours)
    return cmap, BoundaryNorm(np.arange(-0.5, len(colours)), cmap.N)


@dataclass
class ExplanationRow:
    """One slice to draw: the image, its ground truth and prediction, and one CAM per structure."""

    image: np.ndarray
    ground_truth: np.ndarray
    prediction: np.ndarray
    cams: dict[int, np.ndarray] = field(default_factory=dict)  # category -> (H, W) CAM
    title: str = ""


def row_title(patient: str, slice_index: int, score: float | None = None, phase: str | None = None) -> str:
    """A row title like ``patient001 ED slice 4 | score 0.912``."""
    parts = [str(patient)] + ([str(phase)] if phase else []) + [f"slice {slice_index}"]
    text = " ".join(parts)
    return text if score is None or np.isnan(score) else f"{text} | score {score:.3f}"


def build_rows(
    model: nn.Module,
    images: np.ndarray,
    ground_truth: np.ndarray,
    indices: Sequence[int],
    titles: Sequence[str] | None = None,
    layer: str = DEFAULT_LAYER,
    categories: Sequence[int] = tuple(STRUCTURES),
    region: str = "prediction",
) -> list[ExplanationRow]:
    """Rows for :func:`plot_explanations`: predictions and CAMs of ``model`` for the slices ``indices``.

    ``region`` is the CAM's target region: ``"prediction"`` (the model's predicted mask) or
    ``"ground_truth"``.
    """
    if region not in ("prediction", "ground_truth"):
        raise ValueError(f"region must be 'prediction' or 'ground_truth', got {region!r}")
    images = np.asarray(images, dtype=np.float32)
    ground_truth = np.asarray(ground_truth)
    if images.ndim != 3 or ground_truth.shape != images.shape:
        raise ValueError(
            f"images and ground_truth must be (N, H, W) of one shape, got {images.shape} and {ground_truth.shape}"
        )
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("indices is empty")
    if min(indices) < 0 or max(indices) >= len(images):
        raise ValueError(f"indices must lie in [0, {len(images)}), got {indices}")
    titles = list(titles) if titles is not None else [f"slice {i}" for i in indices]
    if len(titles) != len(indices):
        raise ValueError(f"titles must have one entry per index ({len(indices)}), got {len(titles)}")
    chosen = images[indices]
    predictions, _ = predict(model, chosen)
    cams = {}
    for category in categories:
        masks = (ground_truth[indices] == category) if region == "ground_truth" else None
        cams[category] = seg_grad_cam(model, chosen, category, masks=masks, layer=layer)
    return [
        ExplanationRow(chosen[k], ground_truth[i], predictions[k], {c: cams[c][k] for c in categories}, titles[k])
        for k, i in enumerate(indices)
    ]


def plot_explanations(rows: Sequence[ExplanationRow], row_labels: Sequence[str] | None = None, panel_size: float = 2.0):
    """Figure with one row per slice: image | ground truth | prediction | CAM overlay per structure.

    The CAM columns follow the categories of the first row's ``cams`` (named RV, MYO, LV). Row titles
    go above the image panel; ``row_labels`` (e.g. initialisation names) label the rows on the left.
    """
    import matplotlib.pyplot as plt

    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    if not all(isinstance(row, ExplanationRow) for row in rows):
        raise TypeError("rows must be ExplanationRow objects")
    categories = list(rows[0].cams)
    if any(list(row.cams) != categories for row in rows):
        raise ValueError("all rows must have CAMs for the same categories")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"row_labels must have one entry per row ({len(rows)}), got {len(row_labels)}")
    cmap, norm = label_colormap()
    n_columns = 3 + len(categories)
    figure, axes = plt.subplots(
        len(rows), n_columns, figsize=(panel_size * n_columns, panel_size * len(rows)), squeeze=False
    )
    headers = ["image", "ground truth", "prediction"] + [f"CAM {STRUCTURES.get(c, c)}" for c in categories]
    for r, row in enumerate(rows):
        axes[r, 0].imshow(row.image, cmap="gray", vmin=0, vmax=1)
        axes[r, 1].imshow(row.ground_truth, cmap=cmap, norm=norm, interpolation="nearest")
        axes[r, 2].imshow(row.prediction, cmap=cmap, norm=norm, interpolation="nearest")
        for k, category in enumerate(categories):
            axes[r, 3 + k].imshow(overlay(row.image, row.cams[category]))
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{row.title}\n{headers[c]}" if c == 0 and row.title else headers[c], fontsize=8)
        if row_labels is not None:
            axes[r, 0].set_ylabel(row_labels[r], fontsize=9)
    figure.tight_layout()
    return figure


def plot_initialisations(
    image: np.ndarray,
    ground_truth: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    cams: Mapping[str, Mapping[int, np.ndarray]],
    title: str = "",
    panel_size: float = 2.0,
):
    """Several initialisations side by side for one shared slice: one row per initialisation
    (``predictions`` and ``cams`` keyed by its name), columns as in :func:`plot_explanations`."""
    if not predictions:
        raise ValueError("predictions is empty: nothing to plot")
    if set(predictions) != set(cams):
        raise ValueError(
            f"predictions and cams must have the same initialisations, got {sorted(predictions)} and {sorted(cams)}"
        )
    names = list(predictions)
    rows = [ExplanationRow(image, ground_truth, predictions[n], dict(cams[n]), title if k == 0 else "")
            for k, n in enumerate(names)]
    return plot_explanations(rows, row_labels=names, panel_size=panel_size)


# --------------------------------------------------------------------------------------------- numbers per run


def explanation_numbers(model: nn.Module, images: np.ndarray, ground_truth: np.ndarray, layer: str = DEFAULT_LAYER,
                        region: str = "prediction", steps: int = 10, ring_width: int = 3, seed: int = 0,
                        faithfulness: bool = True) -> pd.DataFrame:
    """One row per (slice, structure) with the explanation numbers of ``model`` on ``images``.

    Columns: ``slice`` (position in ``images``), ``structure``, ``energy_inside`` and ``energy_ring`` (share of
    CAM energy inside the ground-truth structure and in a ``ring_width``-pixel ring around it),
    ``pointing_hit``, ``sanity_rho`` (Spearman correlation with the CAM of the same architecture with
    randomised weights), and with ``faithfulness`` the deletion / insertion AUCs (most relevant first, and
    the random-order reference). Slices where the structure is absent from the ground truth get NaN
    localisation numbers; where the CAM's region is empty, the CAM is zero and its numbers NaN.
    """
    if region not in ("prediction", "ground_truth"):
        raise ValueError(f"explain.target: expected 'prediction' or 'ground_truth', got {region!r}")
    images = np.asarray(images, dtype=np.float32)
    ground_truth = np.asarray(ground_truth)
    predicted, _ = predict(model, images)
    rows = []
    for category, name in STRUCTURES.items():
        truth = ground_truth == category
        target = truth if region == "ground_truth" else predicted == category
        cams = seg_grad_cam(model, images, category, masks=target, layer=layer)
        inside, ring = energy_inside(cams, truth), energy_in_ring(cams, truth, ring_width)
        hits = pointing_hit(cams, truth)
        rho = sanity_check_randomised(model, images, category, layer=layer, seed=seed, masks=target)
        for k in range(len(images)):
            row = {"slice": k, "structure": name, "energy_inside": inside[k], "energy_ring": ring[k],
                   "pointing_hit": hits[k], "sanity_rho": rho[k]}
            if faithfulness:
                curves = ({} if not target[k].any() or not cams[k].any() else
                          deletion_insertion(model, images[k], category, cams[k], target[k], steps=steps, seed=seed))
                for key in ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc"):
                    row[key] = curves.get(key, np.nan)
            rows.append(row)
    return pd.DataFrame(rows)


XAI_METRICS = ("energy_inside", "energy_ring", "pointing_hit", "deletion_auc", "random_deletion_auc",
               "insertion_auc", "random_insertion_auc", "sanity_rho")


def summarise_numbers(numbers: pd.DataFrame) -> pd.DataFrame:
    """Per initialisation, layer and metric: the mean over slices and structures for each seed, then the mean
    over seeds with the SD over seeds, and the SD over slices (pooled over seeds)."""
    import pandas as pd

    rows = []
    for (init, layer), g in numbers.groupby(["init", "layer"], sort=True):
        for metric in XAI_METRICS:
            if metric not in g or g[metric].isna().all():
                continue
            per_seed = g.groupby("seed")[metric].mean()
            rows.append({"init": init, "layer": layer, "metric": metric, "mean": per_seed.mean(),
                         "sd_seeds": per_seed.std(ddof=1) if len(per_seed) > 1 else np.nan,
                         "sd_slices": g[metric].std(ddof=1), "n": int(g[metric].notna().sum()),
                         "seeds": len(per_seed)})
    return pd.DataFrame(rows, columns=["init", "layer", "metric", "mean", "sd_seeds", "sd_slices", "n", "seeds"])
