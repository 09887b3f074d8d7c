"""Checks that re-run the model to test whether a CAM says something about it.

- :func:`deletion_insertion`: deletion and insertion curves (Petsiuk et al. 2018) against a random order;
- :func:`randomised_copy` and :func:`sanity_check_randomised`: the model-randomisation sanity check
  (Adebayo et al. 2018).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from ..inference import as_input_tensor, predict
from .cam import DEFAULT_LAYER, seg_grad_cam
from .measures import cam_rank_correlation


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
    bf16: bool = False,
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
    ``bf16``: the model runs under bf16 autocast (``cmr_utils.inference.predict``).

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
    _, logits = predict(model, np.concatenate(stacks), return_logits=True, bf16=bf16)
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
    x = as_input_tensor(images)
    if masks is None:
        predicted, _ = predict(model, x, batch_size=batch_size)
        masks = predicted == category
    trained = seg_grad_cam(model, x, category, masks=masks, layer=layer, batch_size=batch_size)
    random_model = randomised_copy(model, seed=seed)
    randomised = seg_grad_cam(random_model, x, category, masks=masks, layer=layer, batch_size=batch_size)
    return np.atleast_1d(cam_rank_correlation(trained, randomised))
