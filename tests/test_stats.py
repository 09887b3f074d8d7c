"""Tests of cmr_utils.stats with hand-computed answers (t quantiles taken from scipy)."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from cmr_utils import stats


# --------------------------------------------------------------------------------------------------
# mean_ci and summarise


def test_mean_ci_hand_value():
    # mean 3, sd sqrt(2.5), half width t_{0.975,4} * sqrt(2.5) / sqrt(5) = 2.7764451 * 0.7071068
    mean, low, high = stats.mean_ci([1, 2, 3, 4, 5])
    half = st.t.ppf(0.975, 4) * math.sqrt(2.5) / math.sqrt(5)
    assert half == pytest.approx(1.963243, abs=1e-6)
    assert (mean, low, high) == pytest.approx((3.0, 3.0 - half, 3.0 + half))
    # non-finite values are ignored
    assert stats.mean_ci([1, 2, np.nan, 3, 4, np.inf, 5]) == pytest.approx((mean, low, high))
    # a wider confidence gives a wider interval
    _, low90, high90 = stats.mean_ci([1, 2, 3, 4, 5], confidence=0.90)
    assert low < low90 < high90 < high


def test_mean_ci_small_samples():
    mean, low, high = stats.mean_ci([4.0])
    assert mean == 4.0 and math.isnan(low) and math.isnan(high)
    assert all(math.isnan(v) for v in stats.mean_ci([np.nan]))
    assert all(math.isnan(v) for v in stats.mean_ci([]))
    assert stats.mean_ci([2.0, 2.0, 2.0]) == (2.0, 2.0, 2.0)


def test_mean_ci_bad_inputs():
    with pytest.raises(ValueError, match="confidence"):
        stats.mean_ci([1, 2], confidence=95)
    with pytest.raises(ValueError, match="one-dimensional"):
        stats.mean_ci([[1, 2], [3, 4]])
    with pytest.raises(TypeError, match="numbers"):
        stats.mean_ci(["a", "b"])


def test_summarise():
    df = pd.DataFrame({
        "init": ["random", "random", "random", "random", "swav"],
        "budget": [10, 10, 10, 10, 10],
        "iou": [1.0, 2.0, 3.0, np.nan, 5.0],
    })
    table = stats.summarise(df, ["init", "budget"], "iou")
    assert list(table.columns) == ["init", "budget", "n", "mean", "sd", "ci_low", "ci_high"]
    assert list(table["init"]) == ["random", "swav"]
    random_row, swav_row = table.iloc[0], table.iloc[1]
    half = st.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # values 1, 2, 3: sd 1
    assert random_row["n"] == 3 and random_row["mean"] == pytest.approx(2.0)
    assert random_row["sd"] == pytest.approx(1.0)
    assert random_row["ci_low"] == pytest.approx(2.0 - half)
    assert random_row["ci_high"] == pytest.approx(2.0 + half)
    assert swav_row["n"] == 1 and swav_row["mean"] == 5.0
    assert math.isnan(swav_row["sd"]) and math.isnan(swav_row["ci_low"])
    single = stats.summarise(df, "init", "iou")  # a single column name works too
    assert list(single.columns) == ["init", "n", "mean", "sd", "ci_low", "ci_high"]
    with pytest.raises(ValueError, match="seed"):
        stats.summarise(df, "seed", "iou")
    with pytest.raises(TypeError, match="numeric"):
        stats.summarise(df, "budget", "init")


# --------------------------------------------------------------------------------------------------
# paired_comparison


def test_paired_comparison_constant_difference():
    b = np.array([0.3, 0.9, 0.1, 0.5, 0.7])
    a = b + 0.5
    result = stats.paired_comparison(a, b, labels=("swav", "random"))
    assert result["a"] == "swav" and result["b"] == "random" and result["n"] == 5
    assert result["mean_diff"] == pytest.approx(0.5)
    assert result["ci_low"] == pytest.approx(0.5) and result["ci_high"] == pytest.approx(0.5)
    # all five differences positive: exact two-sided p = 2 / 2**5
    assert result["wilcoxon_p"] == pytest.approx(2 / 32)
    assert math.isnan(result["ttest_p"])  # zero variance: no t test


def test_paired_comparison_known_differences():
    b = np.array([10.0, 20.0, 30.0, 40.0])
    a = b + np.array([1.0, 2.0, 3.0, 4.0])
    result = stats.paired_comparison(a, b)
    # differences 1..4: mean 2.5, sd sqrt(5/3); t = 2.5 / (sd / 2)
    sd = math.sqrt(5 / 3)
    half = st.t.ppf(0.975, 3) * sd / 2
    assert result["mean_a"] == pytest.approx(27.5) and result["mean_b"] == pytest.approx(25.0)
    assert result["mean_diff"] == pytest.approx(2.5)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((2.5 - half, 2.5 + half))
    assert result["ttest_p"] == pytest.approx(2 * st.t.sf(2.5 / (sd / 2), 3))
    assert result["wilcoxon_p"] == pytest.approx(2 / 16)  # all 4 positive


def test_paired_comparison_wilcoxon_mixed_signs():
    # differences 1, -2, 3, 4, 5 (distinct ranks 1..5): W- = 2, subsets of {1..5} summing to <= 2 are
    # {}, {1}, {2}: p = 2 * 3 / 32
    b = np.zeros(5)
    a = np.array([1.0, -2.0, 3.0, 4.0, 5.0])
    assert stats.paired_comparison(a, b)["wilcoxon_p"] == pytest.approx(6 / 32)


def test_paired_comparison_edge_cases():
    same = stats.paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["mean_diff"] == 0.0 and math.isnan(same["wilcoxon_p"]) and math.isnan(same["ttest_p"])
    one = stats.paired_comparison([1.0], [0.0])
    assert one["n"] == 1 and one["mean_diff"] == 1.0
    assert math.isnan(one["wilcoxon_p"]) and math.isnan(one["ttest_p"]) and math.isnan(one["ci_low"])
    # NaN pairs are dropped: only the pairs (2, 1) (4, 1) (6, 2) remain
    dropped = stats.paired_comparison([np.nan, 2.0, 4.0, 6.0, 8.0], [0.0, 1.0, 1.0, 2.0, np.nan])
    assert dropped["n"] == 3 and dropped["mean_diff"] == pytest.approx((1 + 3 + 4) / 3)
    none = stats.paired_comparison([np.nan], [1.0])
    assert none["n"] == 0 and math.isnan(none["mean_diff"]) and math.isnan(none["mean_a"])
    with pytest.raises(ValueError, match="same length"):
        stats.paired_comparison([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="labels"):
        stats.paired_comparison([1.0], [1.0], labels="ab")


# --------------------------------------------------------------------------------------------------
# holm_adjust and pairwise_comparisons


def test_holm_adjust_hand_values():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01 = 0.03, 2*0.03 = 0.06, max(0.06, 1*0.04) = 0.06
    np.testing.assert_allclose(stats.holm_adjust([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(stats.holm_adjust([0.02, np.nan, 0.5]), [0.04, np.nan, 0.5])
    np.testing.assert_allclose(stats.holm_adjust([0.6, 0.7]), [1.0, 1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.holm_adjust([0.5, 1.5])


def study_table():
    """Long table of 3 initialisations x 2 seeds x 3 patients. The patient/seed effect (base) is large,
    so only a correct pairing recovers the differences:
    imagenet - random = 1, 2, 3, 4, 5, 6; simsiam - random = 2, -1, 3, 4, 5, 7 (in key order)."""
    keys = [(seed, patient) for seed in (0, 1) for patient in (0, 1, 2)]
    base = {key: 10.0 * key[1] + 3.0 * key[0] for key in keys}
    offsets = {"random": [0, 0, 0, 0, 0, 0], "imagenet": [1, 2, 3, 4, 5, 6], "simsiam": [2, -1, 3, 4, 5, 7]}
    rows = [
        {"init": init, "seed": seed, "patient": patient, "iou": base[(seed, patient)] + offsets[init][i]}
        for init in offsets
        for i, (seed, patient) in enumerate(keys)
    ]
    return pd.DataFrame(rows)


def test_pairwise_comparisons_vs_baseline():
    table = stats.pairwise_comparisons(study_table(), "init", ["seed", "patient"], "iou", baseline="random")
    assert list(table[["a", "b"]].itertuples(index=False, name=None)) == [("imagenet", "random"),
                                                                         ("simsiam", "random")]
    imagenet, simsiam = table.iloc[0], table.iloc[1]
    assert imagenet["n"] == 6 and imagenet["mean_diff"] == pytest.approx(3.5)
    assert simsiam["mean_diff"] == pytest.approx(20 / 6)
    # differences 1..6: sd sqrt(3.5), t = 3.5 / (sd / sqrt(6)); all positive -> wilcoxon 2 / 64
    t_value = 3.5 / (math.sqrt(3.5) / math.sqrt(6))
    assert imagenet["ttest_p"] == pytest.approx(2 * st.t.sf(t_value, 5))
    assert imagenet["wilcoxon_p"] == pytest.approx(2 / 64)
    # 2, -1, 3, 4, 5, 7: W- = 1, subsets of {1..6} summing to <= 1: {}, {1} -> 2 * 2 / 64
    assert simsiam["wilcoxon_p"] == pytest.approx(4 / 64)
    # Holm over the two rows: 2 * 0.03125 = 0.0625, max(0.0625, 1 * 0.0625) = 0.0625
    np.testing.assert_allclose(table["wilcoxon_p_holm"], [0.0625, 0.0625])
    np.testing.assert_allclose(table["ttest_p_holm"], stats.holm_adjust(table["ttest_p"]))


def test_pairwise_comparisons_all_pairs_and_shuffle_invariance():
    df = study_table()
    table = stats.pairwise_comparisons(df, "init", ["seed", "patient"], "iou")
    assert list(table[["a", "b"]].itertuples(index=False, name=None)) == [
        ("imagenet", "random"), ("imagenet", "simsiam"), ("random", "simsiam")]
    assert table.iloc[2]["mean_diff"] == pytest.approx(-20 / 6)
    assert table.iloc[1]["mean_diff"] == pytest.approx(3.5 - 20 / 6)
    shuffled = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    assert not shuffled["init"].equals(df["init"])  # the order really changed
    pd.testing.assert_frame_equal(stats.pairwise_comparisons(shuffled, "init", ["seed", "patient"], "iou"), table)
    without_holm = stats.pairwise_comparisons(df, "init", ["seed", "patient"], "iou", holm=False)
    assert list(without_holm.columns) == stats.PAIRED_COLUMNS


def test_pairwise_comparisons_missing_pair_is_dropped():
    df = study_table()
    df = df[~((df["init"] == "simsiam") & (df["seed"] == 1) & (df["patient"] == 2))]  # difference 7 gone
    table = stats.pairwise_comparisons(df, "init", ["seed", "patient"], "iou", baseline="random")
    assert list(table["n"]) == [6, 5]
    assert table.iloc[1]["mean_diff"] == pytest.approx(13 / 5)


def test_pairwise_comparisons_bad_inputs():
    df = study_table()
    with pytest.raises(ValueError, match="not unique"):
        stats.pairwise_comparisons(df, "init", ["seed"], "iou")  # patients collapse onto one key
    with pytest.raises(ValueError, match="baseline"):
        stats.pairwise_comparisons(df, "init", ["seed", "patient"], "iou", baseline="swav")
    with pytest.raises(ValueError, match="group"):
        stats.pairwise_comparisons(df, "method", ["seed", "patient"], "iou")
    with pytest.raises(ValueError, match="pair_on"):
        stats.pairwise_comparisons(df, "init", ["seed", "phase"], "iou")
    with pytest.raises(ValueError, match="two levels"):
        stats.pairwise_comparisons(df[df["init"] == "random"], "init", ["seed", "patient"], "iou")
    with pytest.raises(TypeError, match="DataFrame"):
        stats.pairwise_comparisons(df.to_dict(), "init", ["seed", "patient"], "iou")
