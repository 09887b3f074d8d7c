"""Choosing the slices to show: the best, median and worst by a per-slice score."""
from __future__ import annotations

import numpy as np


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
