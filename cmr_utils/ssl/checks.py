"""Argument checks shared by the SSL modules: a clear error naming the argument and what was expected."""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def require_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def require_float(name: str, value: Any, minimum: float, *, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    too_small = value <= minimum if strict else value < minimum
    if not math.isfinite(value) or too_small:
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {relation} {minimum}, got {value}")
    return value


def require_range(name: str, value: Any, low: float, high: float) -> tuple[float, float]:
    """A (lo, hi) pair with low <= lo <= hi <= high."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a (low, high) pair, got {value!r}")
    lo, hi = (float(v) for v in value)
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name} must satisfy {low} <= low <= high <= {high}, got {value!r}")
    return lo, hi
