"""Statistics over test patients: patient-level (cluster) bootstrap intervals of means, paired comparisons
between initialisations (bootstrap over patients and Wilcoxon signed-rank on per-patient mean differences),
Holm-adjusted.

Why patients: the rows of a results table (patient x phase x seed x structure, or one row per slice) are not
independent; the test patients are. A t interval over 2 seeds has 1 degree of freedom and is useless, and a
test over patient x seed rows counts every patient several times. So every interval here resamples *patients*
(clusters) with replacement, taking all rows of a drawn patient along (its seeds, phases, slices and
structures stay together), and every test treats a patient as one observation.

Missing values: rows whose ``value`` is not finite are dropped before anything is computed; paired functions
drop a pair when either member is not finite. The counts (``n_rows``, ``n_pairs``, ``n_patients``) always
count what was used.

Small samples: the percentile bootstrap is too narrow with few clusters (with n patients there are only
``C(2n-1, n)`` distinct resamples), so its intervals and p values are optimistic below roughly ten patients;
read the Wilcoxon p value there. With fewer than two patients there is no interval (NaN).
"""
from __future__ import annotations

import itertools
import math
from numbers import Integral, Real

import numpy as np
import pandas as pd
from scipy import stats as st

MIN_BOOT = 100
PAIRED_COLUMNS = ["a", "b", "n_patients", "n_pairs", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high",
                  "boot_p", "wilcoxon_p"]


# --------------------------------------------------------------------------------------------------
# input checks


def _as_float_vector(values, name: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _check_frame(df) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    if df.empty:
        raise ValueError("df must not be empty")


def _check_confidence(confidence) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, Real) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number strictly between 0 and 1, got {confidence!r}")
    return float(confidence)


def _check_n_boot(n_boot) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, Integral) or n_boot < MIN_BOOT:
        raise ValueError(f"n_boot must be an integer >= {MIN_BOOT}, got {n_boot!r}")
    return int(n_boot)


def _check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return seed


def _as_column_list(columns, name: str, df: pd.DataFrame) -> list[str]:
    columns = [columns] if isinstance(columns, str) else list(columns)
    if not columns:
        raise ValueError(f"{name} must name at least one column")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name} columns {missing} not in the DataFrame (columns: {list(df.columns)})")
    return columns


def _check_column(df: pd.DataFrame, column, name: str) -> str:
    if not isinstance(column, str) or column not in df.columns:
        raise ValueError(f"{name} must name a column of the DataFrame, got {column!r} (columns: {list(df.columns)})")
    if df[column].isna().any():
        raise ValueError(f"{name} column {column!r} must not contain missing values")
    return column


def _check_value_column(df: pd.DataFrame, value) -> None:
    if not isinstance(value, str) or value not in df.columns:
        raise ValueError(f"value must name a column of the DataFrame, got {value!r} (columns: {list(df.columns)})")
    if not pd.api.types.is_numeric_dtype(df[value]) or pd.api.types.is_bool_dtype(df[value]):
        raise TypeError(f"value column {value!r} must be numeric, got dtype {df[value].dtype}")


# --------------------------------------------------------------------------------------------------
# the bootstrap


def _resample_counts(n_clusters: int, n_boot: int, seed) -> np.ndarray:
    """(n_boot, n_clusters) integer matrix: how often each cluster is drawn in each resample of n_clusters
    draws with replacement (one multinomial row per resample)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot)


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    low, high = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(low), float(high)


def _cluster_bootstrap(sums: np.ndarray, counts: np.ndarray, n_boot: int, seed) -> np.ndarray:
    """Resampled means ``sum(w * sums) / sum(w * counts)`` for cluster draw counts ``w``: the mean over all
    rows of the drawn clusters, a cluster drawn k times counting k times."""
    weights = _resample_counts(sums.size, n_boot, seed)
    return (weights @ sums) / (weights @ counts)


def bootstrap_mean_ci(df: pd.DataFrame, value: str, cluster: str = "patient", by=None, n_boot: int = 2000,
                      confidence: float = 0.95, seed: int | None = 0) -> pd.DataFrame:
    """Mean of ``value`` over all rows with a patient-level (cluster) percentile bootstrap interval.

    The statistic is the plain mean over the (finite) rows of a group, e.g. over patient x phase x seed x
    structure. Each of ``n_boot`` resamples draws as many ``cluster`` levels (patients) as the group has, with
    replacement; all rows of a drawn patient come along, so a patient with more rows weighs more, exactly as
    in the statistic. The interval is the ``(1 -/+ confidence) / 2`` quantiles of the resampled means.
    Computed from per-patient sums and row counts and a multinomial matrix of draw counts (no loop over
    resamples). Every group uses a generator seeded with ``seed``, so a group's interval does not depend on
    which other groups exist.

    ``by``: None (one row for the whole frame), a column name or a list of them. Returns one row per group
    (sorted by the group keys): the ``by`` columns, ``mean``, ``ci_low``, ``ci_high``, ``n_patients``
    (clusters with a finite value), ``n_rows`` (finite rows) and, when ``df`` has a ``seed`` column,
    ``n_seeds``. A group with fewer than two patients gets NaN bounds; one without finite values NaN
    throughout.
    """
    _check_frame(df)
    _check_value_column(df, value)
    cluster = _check_column(df, cluster, "cluster")
    by = [] if by is None else _as_column_list(by, "by", df)
    if cluster in by:
        raise ValueError(f"by must not contain the cluster column {cluster!r}")
    n_boot, confidence, seed = _check_n_boot(n_boot), _check_confidence(confidence), _check_seed(seed)
    with_seeds = "seed" in df.columns and "seed" not in by

    groups = df.groupby(by, sort=True, dropna=False) if by else [((), df)]
    rows = []
    for keys, group in groups:
        keys = keys if isinstance(keys, tuple) else (keys,)
        finite = group[np.isfinite(group[value].to_numpy(dtype=np.float64))]
        per_cluster = finite.groupby(cluster, sort=True)[value].agg(["sum", "count"])
        sums = per_cluster["sum"].to_numpy(dtype=np.float64)
        counts = per_cluster["count"].to_numpy(dtype=np.float64)
        mean = low = high = math.nan
        if counts.sum() > 0:
            mean = float(sums.sum() / counts.sum())
        if sums.size >= 2:
            low, high = _percentile_interval(_cluster_bootstrap(sums, counts, n_boot, seed), confidence)
        row = [*keys, mean, low, high, int(sums.size), int(counts.sum())]
        if with_seeds:
            row.append(int(finite["seed"].nunique()))
        rows.append(row)
    columns = [*by, "mean", "ci_low", "ci_high", "n_patients", "n_rows"] + (["n_seeds"] if with_seeds else [])
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------------------------------------------------
# paired comparisons


def _bootstrap_p(samples: np.ndarray) -> float:
    """Two-sided bootstrap p value of "the mean is 0": twice the share of resampled means on the far side of
    0 from the bulk, as ``(count + 1) / (n_boot + 1)`` so that it is never exactly 0; clipped to 1. It is
    the smallest ``1 - confidence`` at which the percentile interval excludes 0."""
    n = samples.size
    below, above = int(np.sum(samples <= 0)), int(np.sum(samples >= 0))
    return min(1.0, 2.0 * (min(below, above) + 1) / (n + 1))


def _wilcoxon_p(differences: np.ndarray) -> float:
    """``scipy.stats.wilcoxon`` two-sided p (scipy's defaults: zero differences discarded, exact null for
    small samples). NaN when there are fewer than 2 differences or all are zero (scipy would say p = 1,
    which reads as evidence rather than as "no test")."""
    if differences.size < 2 or not np.any(differences != 0):
        return math.nan
    return float(st.wilcoxon(differences).pvalue)


def _paired_keys(df: pd.DataFrame, method_col, pair_cols, value, cluster) -> tuple[str, list[str]]:
    """Checks shared by the paired functions; returns (method_col, pair_cols)."""
    _check_frame(df)
    method_col = _check_column(df, method_col, "method_col")
    pair_cols = _as_column_list(pair_cols, "pair_cols", df)
    if method_col in pair_cols:
        raise ValueError(f"method_col {method_col!r} cannot also be a pair_cols column")
    if not isinstance(cluster, str) or cluster not in pair_cols:
        raise ValueError(f"cluster must be one of pair_cols {pair_cols} (pairs are matched within a patient), "
                         f"got {cluster!r}")
    _check_value_column(df, value)
    keys = [method_col, *pair_cols]
    if df[keys].isna().any().any():
        raise ValueError(f"pair_cols and method_col columns {keys} must not contain missing values")
    duplicated = df.duplicated(subset=keys, keep=False)
    if duplicated.any():
        example = df.loc[duplicated, keys].iloc[0].to_dict()
        raise ValueError(f"rows are not unique on {keys} (e.g. {example}); aggregate them or add the "
                         f"distinguishing column to pair_cols")
    return method_col, pair_cols


def _paired_difference(df, method_col, pair_cols, value, a, b, cluster, n_boot, confidence, seed) -> dict:
    levels = set(df[method_col].unique())
    for name, level in (("a", a), ("b", b)):
        if level not in levels:
            raise ValueError(f"{name} = {level!r} is not a level of {method_col!r}: {_sorted_levels(df[method_col])}")
    if a == b:
        raise ValueError(f"a and b must be different levels of {method_col!r}, got {a!r} twice")
    both = df[df[method_col].isin([a, b])]
    wide = both.pivot(index=pair_cols, columns=method_col, values=value)
    wide = wide[np.isfinite(wide[a].to_numpy(dtype=np.float64)) & np.isfinite(wide[b].to_numpy(dtype=np.float64))]
    per_patient = pd.DataFrame({"a": wide[a], "b": wide[b], "diff": wide[b] - wide[a]}).groupby(cluster).mean()
    diff = per_patient["diff"].to_numpy(dtype=np.float64)
    n = diff.size
    low = high = math.nan
    boot_p = math.nan
    if n >= 2:
        samples = _cluster_bootstrap(diff, np.ones(n), n_boot, seed)
        low, high = _percentile_interval(samples, confidence)
        boot_p = _bootstrap_p(samples)
    return {
        "a": a, "b": b, "n_patients": int(n), "n_pairs": int(len(wide)),
        "mean_a": float(per_patient["a"].mean()) if n else math.nan,
        "mean_b": float(per_patient["b"].mean()) if n else math.nan,
        "mean_diff": float(diff.mean()) if n else math.nan,
        "ci_low": low, "ci_high": high, "boot_p": boot_p, "wilcoxon_p": _wilcoxon_p(diff),
    }


def bootstrap_paired_difference(df: pd.DataFrame, method_col: str, pair_cols, value: str, a, b,
                                cluster: str = "patient", n_boot: int = 2000, confidence: float = 0.95,
                                seed: int | None = 0) -> dict:
    """Paired difference ``b - a`` of ``value`` between two levels of ``method_col``, patients as the units.

    Rows of ``a`` and ``b`` are paired on ``pair_cols`` (e.g. ``["seed", "patient", "phase"]``; it must
    contain ``cluster`` and each (method, pair_cols) combination must occur at most once); a pair with a
    missing or non-finite member is dropped. The differences are averaged per patient first; then

    - ``mean_diff``: the mean over patients of the per-patient mean differences (``mean_a``, ``mean_b``
      likewise for the two methods);
    - ``ci_low, ci_high``: its percentile interval from ``n_boot`` resamples of the patients;
    - ``boot_p``: two-sided bootstrap p value, ``2 (k + 1) / (n_boot + 1)`` clipped to 1, where k counts the
      resampled means on the other side of 0 (never exactly 0; 1 when every difference is 0);
    - ``wilcoxon_p``: Wilcoxon signed-rank test of the per-patient mean differences (NaN with fewer than
      two patients or when every difference is 0).

    Also ``a, b`` (the levels), ``n_patients`` and ``n_pairs`` (pairs used). With fewer than two patients the
    interval and p values are NaN.
    """
    method_col, pair_cols = _paired_keys(df, method_col, pair_cols, value, cluster)
    n_boot, confidence, seed = _check_n_boot(n_boot), _check_confidence(confidence), _check_seed(seed)
    return _paired_difference(df, method_col, pair_cols, value, a, b, cluster, n_boot, confidence, seed)


def holm_adjust(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p values (same order as given). With the m finite p values sorted
    ascending, ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``. NaN stays NaN and is not counted in m."""
    p = _as_float_vector(p_values, "p_values")
    finite = np.isfinite(p)
    if np.any((p[finite] < 0) | (p[finite] > 1)):
        raise ValueError("p_values must lie in [0, 1]")
    adjusted = np.full_like(p, np.nan)
    index = np.flatnonzero(finite)
    order = index[np.argsort(p[index], kind="stable")]
    m = order.size
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted


def _sorted_levels(series: pd.Series) -> list:
    levels = list(pd.unique(series.dropna()))
    try:
        return sorted(levels)
    except TypeError:  # mixed, unorderable types: keep order of appearance
        return levels


def pairwise_comparisons(df: pd.DataFrame, method_col: str, pair_cols, value: str, baseline=None,
                         cluster: str = "patient", n_boot: int = 2000, confidence: float = 0.95,
                         seed: int | None = 0, holm: bool = True) -> pd.DataFrame:
    """``bootstrap_paired_difference`` between levels of ``method_col``: every level against ``baseline``
    (a = baseline, b = the level, so ``mean_diff`` = level - baseline), or every pair of levels when
    ``baseline`` is None (levels sorted; a = first, b = second; ``mean_diff`` = b - a).

    Columns: ``a, b, n_patients, n_pairs, mean_a, mean_b, mean_diff, ci_low, ci_high, boot_p, wilcoxon_p``
    and, with ``holm=True``, ``boot_p_holm, wilcoxon_p_holm`` (Holm over the rows of this table).
    """
    method_col, pair_cols = _paired_keys(df, method_col, pair_cols, value, cluster)
    n_boot, confidence, seed = _check_n_boot(n_boot), _check_confidence(confidence), _check_seed(seed)
    levels = _sorted_levels(df[method_col])
    if baseline is None:
        pairs = list(itertools.combinations(levels, 2))
    else:
        if baseline not in levels:
            raise ValueError(f"baseline {baseline!r} is not a level of {method_col!r}: {levels}")
        pairs = [(baseline, level) for level in levels if level != baseline]
    if not pairs:
        raise ValueError(f"method_col {method_col!r} needs at least two levels to compare, got {levels}")
    rows = [_paired_difference(df, method_col, pair_cols, value, x, y, cluster, n_boot, confidence, seed)
            for x, y in pairs]
    table = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    if holm:
        table["boot_p_holm"] = holm_adjust(table["boot_p"].to_numpy())
        table["wilcoxon_p_holm"] = holm_adjust(table["wilcoxon_p"].to_numpy())
    return table
