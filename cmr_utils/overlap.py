"""Finding the labelled source's test slices in another source: the guard that keeps test patients out of
pretraining when an extra source in ``DATA`` holds them (the same ACDC again, in another layout or folder).

Both sides are compared as stage 01 prepares them (model grid, each volume normalised between its own
percentiles, so a rescaled or retyped copy of a scan looks the same): each slice is reduced to ``SIZE`` x ``SIZE``
block means, and a slice of another source *repeats* a test slice when no block differs by more than
``TOLERANCE`` (intensities in [0, 1]). Nearly uniform slices (padding, a slice outside the body) say nothing and are
never matched.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

SIZE = 16  # block means per side: coarse enough for a cast or a resampling's rounding, fine enough for anatomy
TOLERANCE = 0.02  # largest block difference of a repeat (normalised intensities); ACDC patients: 0.39 apart or more
MIN_STD = 0.05  # slices whose block means vary less than this are not compared


def fingerprints(images: np.ndarray, chunk: int = 1024) -> torch.Tensor:
    """(N, H, W) model-grid slices (a memory map is read ``chunk`` slices at a time) -> (N, SIZE * SIZE) float32
    block means."""
    parts = [F.adaptive_avg_pool2d(torch.tensor(np.asarray(images[i:i + chunk], dtype=np.float32))[:, None], SIZE)
             for i in range(0, len(images), chunk)]
    return torch.cat(parts).flatten(1) if parts else torch.zeros(0, SIZE * SIZE)


def informative(prints: torch.Tensor) -> torch.Tensor:
    """Which fingerprints vary enough to be compared (not padding or empty field)."""
    return prints.std(dim=1, correction=0) >= MIN_STD if len(prints) else torch.zeros(0, dtype=torch.bool)


class ProtectedSlices:
    """The test split's slices, protected from pretraining: looked for in other sources (``find``)."""

    def __init__(self, images: np.ndarray, rows: list[dict]):
        if len(images) != len(rows):
            raise ValueError(f"ProtectedSlices: {len(images)} slices but {len(rows)} rows")
        prints = fingerprints(images)
        keep = informative(prints)
        self.prints = prints[keep]
        self.rows = [row for row, k in zip(rows, keep.tolist()) if k]

    def find(self, images: np.ndarray) -> tuple[int, dict] | None:
        """The first slice of ``images`` (N, H, W) that repeats a test slice, as (its index, that test slice's row:
        patient, phase, slice), or None."""
        if not self.rows or not len(images):
            return None
        prints = fingerprints(images)
        gap = torch.cdist(prints, self.prints, p=float("inf"))  # (N, test slices): the largest block difference
        gap[~informative(prints)] = float("inf")
        best, match = gap.min(dim=1)
        hits = torch.nonzero(best <= TOLERANCE).flatten()
        if not len(hits):
            return None
        k = int(hits[0])
        return k, self.rows[int(match[k])]
