"""Numbers that judge one CAM against a structure's mask (pure numpy, one value per slice).

Localisation: :func:`energy_inside`, :func:`energy_in_ring` (with :func:`ring_around`), :func:`pointing_hit`;
agreement of two CAMs: :func:`cam_rank_correlation`. Functions that take one slice (H, W) also take a stack
(N, H, W) and then return one value per slice.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata


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
