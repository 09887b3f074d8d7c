"""Statistics across seeds and patients: means with t confidence intervals, group summaries, and paired
comparisons between initialisations (Wilcoxon signed-rank and paired t-test, Holm-adjusted).

Missing values: ``mean_ci`` and ``summarise`` use the finite values only; paired functions drop a pair
when either member is not finite. ``n`` always counts what was used.
"""
from __future__ import annotations

import itertools
import math
from numbers import Real

import numpy as np
import pandas as pd
from scipy import stats as st

PAIRED_COLUMNS = ["a", "b", "n", "mean_a", "mean_b", "mean_diff", "ci_low", "ci_high", "wilcoxon_p", "ttest_p"]


def _as_float_vector(values, name: str) -> np.ndarray:
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers") from None
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _check_confidence(confidence) -> float:
    if isinstance(confidence, bool) or not isinstance(confidence, Real) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number strictly between 0 and 1, got {confidence!r}")
    return float(confidence)


def _mean_ci_finite(values: np.ndarray, confidence: float) -> tuple[float, float, float, float]:
    """(mean, sd, low, high) of already-finite values."""
    n = values.size
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan
    mean = float(values.mean())
    if n == 1:
        return mean, math.nan, math.nan, math.nan
    sd = float(values.std(ddof=1))
    half_width = st.t.ppf((1 + confidence) / 2, df=n - 1) * sd / math.sqrt(n)
    return mean, sd, mean - half_width, mean + half_width


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): mean of the finite values and its two-sided t interval,
    ``mean -/+ t_{(1+confidence)/2, n-1} * sd / sqrt(n)`` (sd with ddof=1).
    One finite value -> (value, nan, nan); none -> (nan, nan, nan)."""
    values = _as_float_vector(values, "values")
    mean, _, low, high = _mean_ci_finite(values[np.isfinite(values)], _check_confidence(confidence))
    return mean, low, high


def _as_column_list(columns, name: str, df: pd.DataFrame) -> list[str]:
    columns = [columns] if isinstance(columns, str) else list(columns)
    if not columns:
        raise ValueError(f"{name} must name at least one column")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name} columns {missing} not in the DataFrame (columns: {list(df.columns)})")
    return columns


def _check_value_column(df: pd.DataFrame, value: str) -> None:
    if not isinstance(value, str) or value not in df.columns:
        raise ValueError(f"value must name a column of the DataFrame, got {value!r} (columns: {list(df.columns)})")
    if not pd.api.types.is_numeric_dtype(df[value]) or pd.api.types.is_bool_dtype(df[value]):
        raise TypeError(f"value column {value!r} must be numeric, got dtype {df[value].dtype}")


def summarise(df: pd.DataFrame, by, value: str, confidence: float = 0.95) -> pd.DataFrame:
    """One row per group of ``by`` (column name or list): n (finite values), mean, sd (ddof=1),
    ci_low, ci_high (t interval, as ``mean_ci``). Groups sorted by their keys."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    by = _as_column_list(by, "by", df)
    _check_value_column(df, value)
    confidence = _check_confidence(confidence)
    rows = []
    for keys, group in df.groupby(by, sort=True, dropna=False):
        values = group[value].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        mean, sd, low, high = _mean_ci_finite(values, confidence)
        rows.append([*keys, values.size, mean, sd, low, high])
    return pd.DataFrame(rows, columns=[*by, "n", "mean", "sd", "ci_low", "ci_high"])


def _all_equal(values: np.ndarray) -> bool:
    """True when the values are equal up to floating rounding (a zero-variance sample)."""
    return float(np.ptp(values)) <= 1e-12 * max(1.0, float(np.abs(values).max()))


def paired_comparison(a, b, labels=("a", "b")) -> dict:
    """Paired comparison of ``a`` and ``b`` (equal-length sequences; pairs with a non-finite member are
    dropped). Keys: ``a, b`` (the labels), ``n`` (pairs used), ``mean_a, mean_b``, ``mean_diff`` (of a - b)
    with its 95% t interval ``ci_low, ci_high``, and two-sided p values:

    - ``wilcoxon_p``: ``scipy.stats.wilcoxon(a - b)`` with scipy's defaults (zero differences discarded,
      exact or permutation null for small samples). NaN when n < 2 or every difference is zero
      (scipy would report p = 1 there, which reads as evidence rather than as "no test").
    - ``ttest_p``: ``scipy.stats.ttest_rel(a, b)``. NaN when n < 2 or the differences have zero
      variance (scipy would report p = 0 for a constant non-zero difference).
    """
    if not (isinstance(labels, (tuple, list)) and len(labels) == 2):
        raise ValueError(f"labels must be a pair (label_a, label_b), got {labels!r}")
    a, b = _as_float_vector(a, "a"), _as_float_vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same length, got {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    diff = a - b
    n = int(diff.size)
    mean_diff, _, low, high = _mean_ci_finite(diff, 0.95)
    wilcoxon_p = ttest_p = math.nan
    if n >= 2 and np.any(diff != 0):
        wilcoxon_p = float(st.wilcoxon(diff).pvalue)
    if n >= 2 and not _all_equal(diff):
        ttest_p = float(st.ttest_rel(a, b).pvalue)
    return {
        "a": labels[0],
        "b": labels[1],
        "n": n,
        "mean_a": float(a.mean()) if n else math.nan,
        "mean_b": float(b.mean()) if n else math.nan,
        "mean_diff": mean_diff,
        "ci_low": low,
        "ci_high": high,
        "wilcoxon_p": wilcoxon_p,
        "ttest_p": ttest_p,
    }


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


def pairwise_comparisons(
    df: pd.DataFrame, group: str, pair_on, value: str, baseline=None, holm: bool = True
) -> pd.DataFrame:
    """``paired_comparison`` between levels of ``group`` with rows paired on the ``pair_on`` columns
    (e.g. ``["seed", "patient", "phase"]``): each level vs ``baseline`` (difference level - baseline),
    or every pair of levels (sorted; difference first - second) when ``baseline`` is None.

    Each (group, pair_on) combination must occur at most once; a pair key missing in one level drops that
    pair. Columns: ``a, b, n, mean_a, mean_b, mean_diff, ci_low, ci_high, wilcoxon_p, ttest_p``, and
    with ``holm=True`` also ``wilcoxon_p_holm, ttest_p_holm`` (Holm over the rows of this table).
    """
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    if not isinstance(group, str) or group not in df.columns:
        raise ValueError(f"group must name a column of the DataFrame, got {group!r}")
    pair_on = _as_column_list(pair_on, "pair_on", df)
    if group in pair_on:
        raise ValueError(f"group column {group!r} cannot also be a pair_on column")
    _check_value_column(df, value)
    keys = [group, *pair_on]
    duplicated = df.duplicated(subset=keys, keep=False)
    if duplicated.any():
        example = df.loc[duplicated, keys].iloc[0].to_dict()
        raise ValueError(f"rows are not unique on {keys} (e.g. {example}); aggregate them before comparing")
    if df[keys].isna().any().any():
        raise ValueError(f"columns {keys} must not contain missing values")

    wide = df.pivot(index=pair_on, columns=group, values=value)
    levels = _sorted_levels(df[group])
    if baseline is None:
        pairs = list(itertools.combinations(levels, 2))
    else:
        if baseline not in levels:
            raise ValueError(f"baseline {baseline!r} is not a level of {group!r}: {levels}")
        pairs = [(level, baseline) for level in levels if level != baseline]
    if not pairs:
        raise ValueError(f"group {group!r} needs at least two levels to compare, got {levels}")

    rows = [paired_comparison(wide[x].to_numpy(), wide[y].to_numpy(), labels=(x, y)) for x, y in pairs]
    table = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    if holm:
        table["wilcoxon_p_holm"] = holm_adjust(table["wilcoxon_p"].to_numpy())
        table["ttest_p_holm"] = holm_adjust(table["ttest_p"].to_numpy())
    return table
