"""The collapse monitor (SimSiam paper, section 4.1): the spread of l2-normalised embeddings.

A healthy embedding spreads over the sphere, ``std * sqrt(d)`` about 1; a collapsed one gives the same
vector for every input, about 0.
"""
from __future__ import annotations

import math

from torch import Tensor
from torch.nn import functional as F

from .checks import require_float, require_int

COLLAPSE_THRESHOLD = 0.1  # embedding_std_ratio below this: collapsed (healthy is about 1)


def embedding_std(z: Tensor) -> float:
    """Std over the batch of the l2-normalised embeddings z (N, d), averaged over the d dimensions.

    About 1/sqrt(d) for embeddings spread over the sphere, 0 when every input maps to one vector.
    """
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor (N, d), got {type(z).__name__}")
    if z.ndim != 2 or z.shape[0] < 2 or z.shape[1] < 1:
        raise ValueError(f"z must have shape (N, d) with N >= 2, got {tuple(z.shape)}")
    normalised = F.normalize(z.detach().float(), dim=1)
    return float(normalised.std(dim=0).mean())


def is_collapsed(std: float, dim: int, threshold: float = COLLAPSE_THRESHOLD) -> bool:
    """Collapsed when std * sqrt(dim) < threshold (healthy: about 1)."""
    std = require_float("std", std, 0.0, strict=False)
    dim = require_int("dim", dim, 1)
    threshold = require_float("threshold", threshold, 0.0, strict=True)
    return std * math.sqrt(dim) < threshold
