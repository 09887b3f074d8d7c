"""Evaluation metrics: the study's IoU (as segmentation-models-pytorch computes it), and ACDC's standard
metrics per structure (Dice, IoU, HD95), volumes and ejection fraction with its agreement statistics.

Label convention: 0 background, 1 RV, 2 MYO, 3 LV (``STRUCTURES``, defined in ``cmr_utils.structures``). Label
maps are integer arrays, numpy or torch; results are numpy arrays or Python floats.

Definitions (quoted by the report):

- **IoU and Dice from counts** (``overlap_scores``): ``TP / (TP + FP + FN)`` and ``2 TP / (2 TP + FP + FN)``, in
  float64; every IoU and Dice below, and fine-tuning's validation scores, are computed by it. Where nothing is
  to be found and nothing is found (``TP + FP + FN = 0``) each caller states its value.
- **Study IoU** (``study_iou``): the confusion counts of every slice and every foreground class
  (RV, MYO, LV; background excluded) are pooled, then ``IoU = TP / (TP + FP + FN)``. This is
  ``smp.metrics.iou_score(tp, fp, fn, tn, reduction="micro")`` on the foreground columns (up to smp's float32
  rounding). When the pooled union is empty (no foreground in ground truth nor prediction anywhere) it is NaN.
- **Per-slice study IoU** (``study_iou_per_slice``): the same pooling, within one slice (smp's
  "micro-imagewise" before its mean over slices). A slice with an empty union is NaN here, so that
  per-slice summaries exclude it; smp's default (``zero_division=1.0``) would count it as a perfect 1.
- **Dice / IoU per structure**: ``2|P∩T| / (|P|+|T|)`` and ``|P∩T| / |P∪T|``. Both empty: 1.0 in
  ``structure_scores`` (ACDC convention: nothing to find, nothing found), NaN in the per-slice
  functions (so empty slices do not enter rankings); exactly one empty: 0.0.
- **HD95**: the 95th percentile (numpy linear interpolation) of the symmetric surface distances,
  both directions pooled, as medpy's ``hd95`` does. Surface voxels: the mask minus its binary erosion
  (face connectivity, image border counts as background). Distances: Euclidean distance transform with
  ``sampling=spacing``. NaN when either mask is empty. Unit "mm" when ``spacing`` (z, y, x) is given,
  "px" (voxel steps, isotropic unit sampling) when it is not.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
import torch
from scipy import ndimage

from .structures import N_CLASSES, STRUCTURES, structure_label

# segmentation_models_pytorch is imported inside the functions that use it: it takes seconds to import,
# and the volume metrics (Dice, HD95, EF) do not need it.

# ----------------------------------------------------------------------------------------------------
# input checks


def _as_label_array(labels, name: str, ndims: tuple[int, ...]) -> np.ndarray:
    """Numpy integer view of a label map (numpy or torch), with a clear error otherwise."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(labels).__name__}")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{name} must be an integer label map, got dtype {labels.dtype}")
    if labels.ndim not in ndims:
        shapes = " or ".join({2: "(H, W)", 3: "(N, H, W)"}.get(n, f"{n}-D") for n in ndims)
        raise ValueError(f"{name} must have shape {shapes}, got shape {labels.shape}")
    if labels.size == 0:
        raise ValueError(f"{name} is empty (shape {labels.shape})")
    return labels


def _check_pair(pred, target, ndims: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    pred = _as_label_array(pred, "pred", ndims)
    target = _as_label_array(target, "target", ndims)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {pred.shape} and {target.shape}")
    return pred, target


def _check_spacing(spacing, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise TypeError(f"spacing must be a sequence of {ndim} numbers (mm), got {spacing!r}") from None
    if len(values) != ndim:
        raise ValueError(f"spacing must have {ndim} values (one per axis), got {len(values)}: {spacing!r}")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing values must be positive and finite, got {spacing!r}")
    return values


def _check_stats(tp, fp, fn, tn) -> list[np.ndarray]:
    arrays = []
    for name, counts in (("tp", tp), ("fp", fp), ("fn", fn), ("tn", tn)):
        if isinstance(counts, torch.Tensor):
            counts = counts.detach().cpu().numpy()
        counts = np.asarray(counts)
        if counts.dtype == bool or not np.issubdtype(counts.dtype, np.integer):
            raise TypeError(f"{name} must hold integer counts, got dtype {counts.dtype}")
        if counts.ndim != 2 or counts.shape[1] < 2:
            raise ValueError(f"{name} must have shape (N, C) with C >= 2 (background first), got {counts.shape}")
        if (counts < 0).any():
            raise ValueError(f"{name} must hold non-negative counts")
        arrays.append(counts.astype(np.int64, copy=False))
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"tp, fp, fn, tn must have the same shape, got {[a.shape for a in arrays]}")
    return arrays


# ----------------------------------------------------------------------------------------------------
# IoU and Dice from confusion counts


def overlap_scores(tp, fp, fn, *, empty: float):
    """IoU ``TP / (TP + FP + FN)`` and Dice ``2 TP / (2 TP + FP + FN)`` from confusion counts, elementwise.

    ``tp``, ``fp``, ``fn``: numbers or numpy arrays (results: float64 numpy arrays of their shape), or torch
    tensors (results: float64 tensors on their device, for training). ``empty`` is both scores where
    ``TP + FP + FN = 0`` (the structure neither present nor predicted): the caller's convention, 1.0 (ACDC's
    per-structure scores, fine-tuning's validation Dice) or NaN (left out of per-slice summaries).
    """
    if isinstance(empty, bool) or not isinstance(empty, Real):
        raise TypeError(f"empty must be a number (or NaN), got {empty!r}")
    if isinstance(tp, torch.Tensor):
        tp, fp, fn = (torch.as_tensor(c, device=tp.device).double() for c in (tp, fp, fn))
        shapes, negative = {c.shape for c in (tp, fp, fn)}, any(bool((c < 0).any()) for c in (tp, fp, fn))
        where, full = torch.where, torch.full_like
    else:
        tp, fp, fn = (np.asarray(c, dtype=np.float64) for c in (tp, fp, fn))
        shapes, negative = {c.shape for c in (tp, fp, fn)}, any((c < 0).any() for c in (tp, fp, fn))
        where, full = np.where, np.full_like
    if len(shapes) != 1:
        raise ValueError(f"tp, fp and fn must have the same shape, got {[tuple(s) for s in shapes]}")
    if negative:
        raise ValueError("tp, fp and fn must be non-negative counts")
    union = tp + fp + fn
    found = union > 0
    with np.errstate(invalid="ignore", divide="ignore"):  # the 0 / 0 of an empty union is replaced by ``empty``
        iou = where(found, tp / union, full(union, empty))
        dice = where(found, 2 * tp / (union + tp), full(union, empty))
    return iou, dice


# ----------------------------------------------------------------------------------------------------
# the study's statistic (smp)


def slice_stats(pred, target, n_classes: int = N_CLASSES) -> tuple[np.ndarray, ...]:
    """Per-slice, per-class confusion counts ``(tp, fp, fn, tn)``, each int64 of shape (N, n_classes).

    Computed by ``smp.metrics.get_stats(mode="multiclass", num_classes=n_classes)`` on label maps
    ``pred`` and ``target`` of shape (N, H, W) with values in 0..n_classes-1.
    """
    import segmentation_models_pytorch as smp

    if isinstance(n_classes, bool) or not isinstance(n_classes, Integral) or n_classes < 2:
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    pred, target = _check_pair(pred, target, ndims=(3,))
    for name, labels in (("pred", pred), ("target", target)):
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= n_classes:
            raise ValueError(f"{name} values must lie in 0..{n_classes - 1}, got range {low}..{high}")
    tp, fp, fn, tn = smp.metrics.get_stats(
        torch.from_numpy(pred.astype(np.int64)),
        torch.from_numpy(target.astype(np.int64)),
        mode="multiclass",
        num_classes=int(n_classes),
    )
    return tuple(t.numpy().astype(np.int64) for t in (tp, fp, fn, tn))


def study_iou(tp, fp, fn, tn) -> float:
    """The study's IoU of a split: ``sum TP / (sum TP + sum FP + sum FN)``, the sums running over all
    slices and the foreground classes (columns 1.., i.e. RV, MYO, LV; column 0 is background).

    Equals ``smp.metrics.iou_score(tp[:, 1:], fp[:, 1:], fn[:, 1:], tn[:, 1:], reduction="micro")`` (which
    divides in float32; this in float64). NaN when the pooled union is empty (smp's "micro" reduction applies no
    zero_division rule).
    """
    tp, fp, fn, _ = (a[:, 1:].sum() for a in _check_stats(tp, fp, fn, tn))
    return float(overlap_scores(tp, fp, fn, empty=math.nan)[0])


def study_iou_per_slice(tp, fp, fn, tn, zero_division: float = math.nan) -> np.ndarray:
    """Per-slice study IoU, shape (N,): within each slice ``TP / (TP + FP + FN)`` with the counts summed
    over the foreground classes (columns 1..) — smp's "micro-imagewise" reduction before its mean.

    A slice with an empty union (no foreground in ground truth nor prediction) gets ``zero_division``:
    NaN by default, so that per-slice summaries exclude it. smp's default is 1.0: with
    ``zero_division=1.0`` the mean of this array equals
    ``smp.metrics.iou_score(..., reduction="micro-imagewise")`` (up to its float32 rounding).
    """
    if isinstance(zero_division, bool) or not isinstance(zero_division, Real):
        raise TypeError(f"zero_division must be a number (or NaN), got {zero_division!r}")
    tp, fp, fn, _ = (a[:, 1:].sum(axis=1) for a in _check_stats(tp, fp, fn, tn))
    return overlap_scores(tp, fp, fn, empty=float(zero_division))[0]


# ----------------------------------------------------------------------------------------------------
# per-slice Dice (ranking slices)


def _dice_columns(pred: np.ndarray, target: np.ndarray, labels) -> np.ndarray:
    """Dice per slice (rows) and label (columns); NaN where both masks are empty."""
    axes = tuple(range(1, pred.ndim))
    columns = []
    for label in labels:
        in_pred, in_target = pred == label, target == label
        tp = np.count_nonzero(in_pred & in_target, axis=axes)
        fp, fn = np.count_nonzero(in_pred, axis=axes) - tp, np.count_nonzero(in_target, axis=axes) - tp
        columns.append(overlap_scores(tp, fp, fn, empty=math.nan)[1])
    return np.stack(columns, axis=1)


def dice_per_slice(pred, target, structure) -> np.ndarray:
    """Dice of one structure (label or name) for each of the N slices of (N, H, W) label maps;
    NaN for a slice where the structure is absent from both."""
    pred, target = _check_pair(pred, target, ndims=(3,))
    return _dice_columns(pred, target, [structure_label(structure)])[:, 0]


def mean_foreground_dice_per_slice(pred, target) -> np.ndarray:
    """Per slice, the mean Dice over the structures (RV, MYO, LV) present in the prediction or the
    ground truth; NaN for a slice with no foreground in either. Shape (N,)."""
    pred, target = _check_pair(pred, target, ndims=(3,))
    dice = _dice_columns(pred, target, sorted(STRUCTURES))
    present = np.isfinite(dice)
    n_present = present.sum(axis=1)
    total = np.where(present, dice, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_present > 0, total / n_present, np.nan)


# ----------------------------------------------------------------------------------------------------
# ACDC's standard metrics on a volume


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: the mask minus its erosion (face connectivity; outside the image is background)."""
    footprint = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=footprint, iterations=1)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The slices of the smallest box that holds every True voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def hd95(pred_mask, target_mask, spacing=None) -> float:
    """95th percentile of the symmetric surface distances between two boolean masks (2D or 3D),
    both directions pooled (as medpy's ``hd95``); in mm with ``spacing`` (one value per axis, z first),
    in voxel steps without. NaN when either mask is empty."""
    for name, mask in (("pred_mask", pred_mask), ("target_mask", target_mask)):
        if not isinstance(mask, np.ndarray) or mask.dtype != bool:
            found = f"dtype {mask.dtype}" if isinstance(mask, np.ndarray) else type(mask).__name__
            raise TypeError(f"{name} must be a boolean numpy array, got {found}")
        if mask.ndim not in (2, 3):
            raise ValueError(f"{name} must be 2D or 3D, got shape {mask.shape}")
    if pred_mask.shape != target_mask.shape:
        raise ValueError(f"pred_mask and target_mask shapes differ: {pred_mask.shape} vs {target_mask.shape}")
    spacing = _check_spacing(spacing, pred_mask.ndim)
    if not pred_mask.any() or not target_mask.any():
        return math.nan
    # within the masks' common bounding box: outside it both are background, as outside the volume is to the
    # erosion, and every surface voxel lies inside it, so the answer is exactly the whole volume's at a fraction of
    # the cost (a heart structure fills a few per cent of a short-axis volume)
    box = _bounding_box(pred_mask | target_mask)
    pred_mask, target_mask = pred_mask[box], target_mask[box]
    pred_surface, target_surface = _surface(pred_mask), _surface(target_mask)
    # distance of every voxel to the nearest surface voxel of the other mask
    to_target = ndimage.distance_transform_edt(~target_surface, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    distances = np.concatenate([to_target[pred_surface], to_pred[target_surface]])
    return float(np.percentile(distances, 95))


def structure_scores(pred, target, spacing=None) -> dict[str, dict]:
    """Dice, IoU and HD95 of each structure for one patient and phase.

    ``pred`` and ``target`` are label maps of shape (Z, H, W) (a single slice (H, W) also works);
    ``spacing`` is (z, y, x) in mm, or None for distances in voxel steps. Returns
    ``{"RV": {"dice", "iou", "hd95", "hd95_unit"}, "MYO": ..., "LV": ...}``.

    Empty structures: both empty -> dice = iou = 1.0, hd95 = NaN; exactly one empty -> dice = iou = 0.0,
    hd95 = NaN (a distance to nothing is undefined).
    """
    pred, target = _check_pair(pred, target, ndims=(2, 3))
    spacing = _check_spacing(spacing, pred.ndim)
    unit = "px" if spacing is None else "mm"
    scores = {}
    for label, name in STRUCTURES.items():
        in_pred, in_target = pred == label, target == label
        tp = np.count_nonzero(in_pred & in_target)
        iou, dice = overlap_scores(tp, np.count_nonzero(in_pred) - tp, np.count_nonzero(in_target) - tp, empty=1.0)
        scores[name] = {"dice": float(dice), "iou": float(iou), "hd95": hd95(in_pred, in_target, spacing),
                        "hd95_unit": unit}
    return scores


def structure_volume(mask_or_labelmap, structure=None, spacing=None) -> float:
    """Volume of a structure: ml when ``spacing`` (mm per axis) is given (voxels * prod(spacing) / 1000),
    the voxel count otherwise.

    Pass a label map with ``structure`` (label or name), or a boolean mask with ``structure=None``.
    """
    volume = mask_or_labelmap
    if isinstance(volume, torch.Tensor):
        volume = volume.detach().cpu().numpy()
    if not isinstance(volume, np.ndarray):
        raise TypeError(f"mask_or_labelmap must be a numpy array or torch tensor, got {type(volume).__name__}")
    if structure is None:
        if volume.dtype != bool:
            raise TypeError("with structure=None, mask_or_labelmap must be a boolean mask, "
                            f"got dtype {volume.dtype}; pass structure= for a label map")
        voxels = int(np.count_nonzero(volume))
    else:
        if volume.dtype == bool or not np.issubdtype(volume.dtype, np.integer):
            raise TypeError(f"with a structure, mask_or_labelmap must be an integer label map, got dtype {volume.dtype}")
        voxels = int(np.count_nonzero(volume == structure_label(structure)))
    spacing = _check_spacing(spacing, volume.ndim)
    if spacing is None:
        return float(voxels)
    return voxels * math.prod(spacing) / 1000.0


# ----------------------------------------------------------------------------------------------------
# ejection fraction


def _check_volume(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite, non-negative volume, got {value}")
    return value


def ejection_fraction(edv, esv) -> float:
    """Ejection fraction in percent, ``100 * (edv - esv) / edv``.

    A ratio, so volumes in ml and voxel counts give the same EF (spacing unknown is fine). Negative when
    esv > edv (possible for a poor prediction; reported, not hidden).
    """
    edv, esv = _check_volume(edv, "edv"), _check_volume(esv, "esv")
    if edv <= 0:
        raise ValueError(f"edv must be positive to compute an ejection fraction, got {edv}")
    return 100.0 * (edv - esv) / edv


def ef_agreement(true_ef, pred_ef) -> dict[str, float]:
    """Agreement between reference and predicted EF (Bland-Altman): n, bias (mean of pred - true),
    sd of the differences (ddof=1; NaN when n < 2), limits of agreement bias -/+ 1.96 sd,
    Pearson r (NaN when n < 3 or either has zero variance), mean absolute error.

    Keys: ``n, bias, sd_diff, loa_low, loa_high, pearson_r, mae``.
    """
    true_ef = np.asarray(true_ef, dtype=np.float64)
    pred_ef = np.asarray(pred_ef, dtype=np.float64)
    if true_ef.ndim != 1 or pred_ef.shape != true_ef.shape:
        raise ValueError(f"true_ef and pred_ef must be 1D of equal length, got {true_ef.shape} and {pred_ef.shape}")
    if true_ef.size == 0:
        raise ValueError("true_ef and pred_ef are empty")
    if not (np.isfinite(true_ef).all() and np.isfinite(pred_ef).all()):
        raise ValueError("true_ef and pred_ef must be finite (drop missing patients before calling)")
    n = int(true_ef.size)
    diff = pred_ef - true_ef
    bias = float(diff.mean())
    sd = float(diff.std(ddof=1)) if n >= 2 else math.nan
    if n >= 3 and true_ef.std() > 0 and pred_ef.std() > 0:
        pearson_r = float(np.corrcoef(true_ef, pred_ef)[0, 1])
    else:
        pearson_r = math.nan
    return {
        "n": n,
        "bias": bias,
        "sd_diff": sd,
        "loa_low": bias - 1.96 * sd,
        "loa_high": bias + 1.96 * sd,
        "pearson_r": pearson_r,
        "mae": float(np.abs(diff).mean()),
    }
