"""Tests of cmr_utils.stats with known answers: patient-level bootstrap intervals, paired comparisons over
patients, Holm adjustment."""
import math

import numpy as np
import pandas as pd
import pytest

from cmr_utils import stats


# --------------------------------------------------------------------------------------------------
# bootstrap_mean_ci


def long_table(values_by_patient, seeds=(0, 1), phases=("ED", "ES")):
    """Rows patient x seed x phase x k, one per value given for the patient."""
    rows = [{"patient": patient, "seed": seed, "phase": phase, "value": v}
            for patient, values in values_by_patient.items()
            for seed in seeds for phase in phases for v in values]
    return pd.DataFrame(rows)


def test_bootstrap_ci_collapses_when_every_patient_has_the_same_value():
    df = long_table({f"p{k}": [0.8, 0.8, 0.8] for k in range(6)})
    row = stats.bootstrap_mean_ci(df, "value").iloc[0]
    assert list(row.index) == ["mean", "ci_low", "ci_high", "n_patients", "n_rows", "n_seeds"]
    assert row["mean"] == pytest.approx(0.8)
    assert row["ci_low"] == pytest.approx(0.8) and row["ci_high"] == pytest.approx(0.8)
    assert (row["n_patients"], row["n_rows"], row["n_seeds"]) == (6, 6 * 2 * 2 * 3, 2)


def test_bootstrap_resamples_patients_not_rows():
    # patient A: 1 row of 0; patient B: 3 rows of 1. Resampling the two patients gives (A, A) -> 0 with
    # probability 1/4, (A, B) -> 3/4 with 1/2, (B, B) -> 1 with 1/4: the 2.5% and 97.5% quantiles are exactly
    # 0 and 1. Resampling the 4 rows would make an all-zero resample rare ((1/4)**4 < 2.5%), so ci_low > 0.
    df = pd.DataFrame({"patient": ["A", "B", "B", "B"], "value": [0.0, 1.0, 1.0, 1.0]})
    row = stats.bootstrap_mean_ci(df, "value", n_boot=4000).iloc[0]
    assert row["mean"] == pytest.approx(0.75)  # the mean over rows: patients weigh by their row counts
    assert row["ci_low"] == 0.0 and row["ci_high"] == 1.0
    assert (row["n_patients"], row["n_rows"]) == (2, 4)
    assert "n_seeds" not in row.index  # no seed column


def test_bootstrap_duplicated_rows_change_rows_not_patients():
    rng = np.random.default_rng(3)
    df = long_table({f"p{k}": list(rng.normal(0.7, 0.1, size=4)) for k in range(10)})
    once = stats.bootstrap_mean_ci(df, "value").iloc[0]
    twice = stats.bootstrap_mean_ci(pd.concat([df, df], ignore_index=True), "value").iloc[0]
    assert twice["n_patients"] == once["n_patients"] == 10 and twice["n_rows"] == 2 * once["n_rows"]
    # every patient's sums and counts double: same statistic, same resamples, same interval
    assert twice[["mean", "ci_low", "ci_high"]].to_numpy() == pytest.approx(once[["mean", "ci_low", "ci_high"]])


def test_bootstrap_large_sample_has_the_analytic_width():
    # 400 patients, 4 rows each: the statistic is the mean of the patient means, whose standard error is
    # sd(patient means) / sqrt(400); the 95% interval should be about 2 * 1.96 of that wide.
    rng = np.random.default_rng(7)
    n = 400
    patient_effect = rng.normal(0.7, 0.1, size=n)
    df = pd.DataFrame({"patient": np.repeat(np.arange(n), 4),
                       "value": np.repeat(patient_effect, 4) + rng.normal(0, 0.05, size=4 * n)})
    row = stats.bootstrap_mean_ci(df, "value", seed=11).iloc[0]
    se = df.groupby("patient")["value"].mean().std(ddof=1) / math.sqrt(n)
    assert row["ci_low"] < row["mean"] < row["ci_high"] and abs(row["mean"] - 0.7) < 3 * se
    assert row["ci_high"] - row["ci_low"] == pytest.approx(2 * 1.959964 * se, rel=0.2)


def test_bootstrap_covers_the_true_mean_about_95_percent_of_the_time():
    # 200 studies of 30 patients with 2 to 5 rows each (row noise shared within a patient's rows partly):
    # the 95% interval should contain the true mean 0.7 in roughly 95% of them (the percentile bootstrap
    # runs a little narrow at 30 clusters; binomial SD of the coverage ~1.6 points).
    rng = np.random.default_rng(2024)
    covered = 0
    for study in range(200):
        rows = rng.integers(2, 6, size=30)
        effect = np.repeat(rng.normal(0.7, 0.1, size=30), rows)
        df = pd.DataFrame({"patient": np.repeat(np.arange(30), rows),
                           "value": effect + rng.normal(0, 0.05, size=rows.sum())})
        row = stats.bootstrap_mean_ci(df, "value", n_boot=1000, seed=study).iloc[0]
        covered += row["ci_low"] <= 0.7 <= row["ci_high"]
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_groups_nan_and_reproducibility():
    rng = np.random.default_rng(0)
    df = long_table({f"p{k}": list(rng.random(3)) for k in range(8)})
    df = pd.concat([df.assign(init="random", budget="all"), df.assign(init="swav", budget="all", value=df["value"] + 1),
                    df.assign(init="swav", budget=60)], ignore_index=True)
    df.loc[0, "value"] = np.nan  # dropped, and not counted
    table = stats.bootstrap_mean_ci(df, "value", by=["init", "budget"])
    assert list(table.columns) == ["init", "budget", "mean", "ci_low", "ci_high", "n_patients", "n_rows", "n_seeds"]
    assert len(table) == 3 and set(table["n_patients"]) == {8}
    random_row = table[table["init"] == "random"].iloc[0]
    assert random_row["n_rows"] == 8 * 12 - 1
    assert random_row["mean"] == pytest.approx(df.loc[df["init"] == "random", "value"].mean())  # pandas skips NaN
    swav = table[(table["init"] == "swav") & (table["budget"] == "all")].iloc[0]
    swav60 = table[(table["init"] == "swav") & (table["budget"] == 60)].iloc[0]
    # one generator per group, seeded alike: a shift by 1 shifts the interval by 1
    assert swav["ci_low"] - swav60["ci_low"] == pytest.approx(1.0)
    assert swav["ci_high"] - swav60["ci_high"] == pytest.approx(1.0)
    # same seed, same answer; a group's answer does not depend on the other groups
    pd.testing.assert_frame_equal(stats.bootstrap_mean_ci(df, "value", by=["init", "budget"]), table)
    alone = stats.bootstrap_mean_ci(df[df["init"] == "swav"], "value", by=["init", "budget"])
    pd.testing.assert_frame_equal(alone, table[table["init"] == "swav"].reset_index(drop=True))
    # a wider confidence gives a wider interval
    wide = stats.bootstrap_mean_ci(df, "value", by="init", confidence=0.99)
    narrow = stats.bootstrap_mean_ci(df, "value", by="init", confidence=0.80)
    assert np.all(wide["ci_low"] < narrow["ci_low"]) and np.all(wide["ci_high"] > narrow["ci_high"])


def test_bootstrap_one_patient_or_no_finite_value_has_no_interval():
    df = pd.DataFrame({"patient": ["A", "A", "B"], "g": [1, 1, 2], "value": [0.2, 0.4, np.nan]})
    table = stats.bootstrap_mean_ci(df, "value", by="g")
    one, none = table.iloc[0], table.iloc[1]
    assert one["mean"] == pytest.approx(0.3) and one["n_patients"] == 1
    assert math.isnan(one["ci_low"]) and math.isnan(one["ci_high"])
    assert math.isnan(none["mean"]) and none["n_patients"] == 0 and none["n_rows"] == 0


def test_bootstrap_bad_inputs():
    df = long_table({"p0": [0.1], "p1": [0.2]})
    with pytest.raises(ValueError, match="value"):
        stats.bootstrap_mean_ci(df, "dice")
    with pytest.raises(ValueError, match="cluster"):
        stats.bootstrap_mean_ci(df, "value", cluster="subject")
    with pytest.raises(ValueError, match="by"):
        stats.bootstrap_mean_ci(df, "value", by=["init"])
    with pytest.raises(ValueError, match="n_boot"):
        stats.bootstrap_mean_ci(df, "value", n_boot=99)
    with pytest.raises(ValueError, match="n_boot"):
        stats.bootstrap_mean_ci(df, "value", n_boot=200.0)
    for confidence in (0, 1, 95, -0.5):
        with pytest.raises(ValueError, match="confidence"):
            stats.bootstrap_mean_ci(df, "value", confidence=confidence)
    with pytest.raises(ValueError, match="seed"):
        stats.bootstrap_mean_ci(df, "value", seed=-1)
    with pytest.raises(ValueError, match="df"):
        stats.bootstrap_mean_ci(df.iloc[:0], "value")
    with pytest.raises(TypeError, match="DataFrame"):
        stats.bootstrap_mean_ci(df.to_dict(), "value")
    with pytest.raises(TypeError, match="numeric"):
        stats.bootstrap_mean_ci(df, "phase")
    with pytest.raises(ValueError, match="cluster"):
        stats.bootstrap_mean_ci(df.assign(patient=[None] + list(df["patient"][1:])), "value")


# --------------------------------------------------------------------------------------------------
# bootstrap_paired_difference


def paired_table(offsets, patients=6, seeds=(0, 1), phases=("ED", "ES")):
    """Long table init x seed x patient x phase. A large patient/seed/phase effect (base) is shared by all
    methods, so only a correct pairing recovers the differences; ``offsets[init][p]`` is the difference of
    patient p from the first method, equal for all of that patient's seeds and phases."""
    rows = []
    for init, offset in offsets.items():
        for seed in seeds:
            for p in range(patients):
                for j, phase in enumerate(phases):
                    base = 10.0 * p + 3.0 * seed + 0.5 * j
                    rows.append({"init": init, "seed": seed, "patient": f"p{p}", "phase": phase,
                                 "dice": base + offset[p]})
    return pd.DataFrame(rows)


def test_paired_difference_of_identical_methods_is_zero_with_p_one():
    df = paired_table({"random": [0] * 6, "swav": [0] * 6})
    result = stats.bootstrap_paired_difference(df, "init", ["seed", "patient", "phase"], "dice", "random", "swav")
    assert (result["a"], result["b"], result["n_patients"], result["n_pairs"]) == ("random", "swav", 6, 24)
    assert result["mean_diff"] == 0.0 and result["ci_low"] == 0.0 and result["ci_high"] == 0.0
    assert result["boot_p"] == 1.0
    assert math.isnan(result["wilcoxon_p"])  # every difference 0: no test


def test_paired_difference_clear_shift():
    rng = np.random.default_rng(5)
    shift = 0.1 + rng.uniform(0, 0.02, size=12)
    df = paired_table({"random": [0] * 12, "swav": list(shift)}, patients=12)
    result = stats.bootstrap_paired_difference(df, "init", ["seed", "patient", "phase"], "dice", "random", "swav")
    assert result["mean_diff"] == pytest.approx(shift.mean())  # b - a
    assert result["ci_low"] > 0.1 and result["ci_high"] < 0.12
    assert result["boot_p"] < 0.01 and result["boot_p"] == pytest.approx(2 / 2001)  # never exactly 0
    assert result["wilcoxon_p"] == pytest.approx(2 / 2 ** 12)  # all 12 patients positive, exact null
    reverse = stats.bootstrap_paired_difference(df, "init", ["seed", "patient", "phase"], "dice", "swav", "random")
    assert reverse["mean_diff"] == pytest.approx(-shift.mean()) and reverse["boot_p"] == result["boot_p"]


def test_paired_difference_averages_per_patient_first():
    # per-patient differences 1, -2, 3, 4, 5, 6, but patient p1's is split as -1 (ED) and -3 (ES): the
    # per-patient means are still 1, -2, 3, 4, 5, 6 and the Wilcoxon test sees 6 patients, not 24 rows:
    # W- = 2, subsets of {1..6} summing to <= 2: {}, {1}, {2} -> p = 2 * 3 / 64
    df = paired_table({"random": [0] * 6, "imagenet": [1, -2, 3, 4, 5, 6]})
    p1 = (df["init"] == "imagenet") & (df["patient"] == "p1")
    df.loc[p1 & (df["phase"] == "ED"), "dice"] += 1.0
    df.loc[p1 & (df["phase"] == "ES"), "dice"] -= 1.0
    result = stats.bootstrap_paired_difference(df, "init", ["seed", "patient", "phase"], "dice", "random", "imagenet")
    assert result["n_patients"] == 6 and result["n_pairs"] == 24
    assert result["mean_diff"] == pytest.approx(17 / 6)
    assert result["wilcoxon_p"] == pytest.approx(6 / 64)
    assert result["ci_low"] < 17 / 6 < result["ci_high"]
    assert result["mean_b"] - result["mean_a"] == pytest.approx(result["mean_diff"])


def test_paired_difference_drops_incomplete_pairs():
    df = paired_table({"random": [0] * 6, "swav": [1, 1, 1, 1, 1, 7]})
    df = df[~((df["init"] == "swav") & (df["patient"] == "p5"))]  # patient p5 has no swav rows: gone
    df.loc[(df["init"] == "random") & (df["patient"] == "p0") & (df["seed"] == 0), "dice"] = np.nan
    result = stats.bootstrap_paired_difference(df, "init", ["seed", "patient", "phase"], "dice", "random", "swav")
    assert result["n_patients"] == 5 and result["n_pairs"] == 5 * 4 - 2
    assert result["mean_diff"] == pytest.approx(1.0)


def test_paired_difference_bad_inputs():
    df = paired_table({"random": [0] * 6, "swav": [1] * 6})
    call = stats.bootstrap_paired_difference
    with pytest.raises(ValueError, match="not unique"):
        call(df, "init", ["seed", "patient"], "dice", "random", "swav")  # phases collapse onto one key
    with pytest.raises(ValueError, match="cluster"):
        call(df, "init", ["seed", "phase"], "dice", "random", "swav")
    with pytest.raises(ValueError, match="cluster"):
        call(df, "init", ["seed", "patient", "phase"], "dice", "random", "swav", cluster="subject")
    with pytest.raises(ValueError, match="method_col"):
        call(df, "method", ["seed", "patient", "phase"], "dice", "random", "swav")
    with pytest.raises(ValueError, match="pair_cols"):
        call(df, "init", ["seed", "patient", "slice"], "dice", "random", "swav")
    with pytest.raises(ValueError, match="value"):
        call(df, "init", ["seed", "patient", "phase"], "iou", "random", "swav")
    with pytest.raises(ValueError, match="b = 'simsiam'"):
        call(df, "init", ["seed", "patient", "phase"], "dice", "random", "simsiam")
    with pytest.raises(ValueError, match="different"):
        call(df, "init", ["seed", "patient", "phase"], "dice", "swav", "swav")
    with pytest.raises(ValueError, match="n_boot"):
        call(df, "init", ["seed", "patient", "phase"], "dice", "random", "swav", n_boot=10)
    with pytest.raises(ValueError, match="confidence"):
        call(df, "init", ["seed", "patient", "phase"], "dice", "random", "swav", confidence=1.0)
    with pytest.raises(ValueError, match="df"):
        call(df.iloc[:0], "init", ["seed", "patient", "phase"], "dice", "random", "swav")


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
    return paired_table({"random": [0] * 6, "imagenet": [1, 2, 3, 4, 5, 6], "simsiam": [2, -1, 3, 4, 5, 7]})


def test_pairwise_comparisons_vs_baseline():
    table = stats.pairwise_comparisons(study_table(), "init", ["seed", "patient", "phase"], "dice", baseline="random")
    assert list(table.columns) == stats.PAIRED_COLUMNS + ["boot_p_holm", "wilcoxon_p_holm"]
    assert list(table[["a", "b"]].itertuples(index=False, name=None)) == [("random", "imagenet"),
                                                                         ("random", "simsiam")]
    imagenet, simsiam = table.iloc[0], table.iloc[1]
    assert imagenet["n_patients"] == 6 and imagenet["n_pairs"] == 24
    assert imagenet["mean_diff"] == pytest.approx(3.5) and simsiam["mean_diff"] == pytest.approx(20 / 6)
    # all 6 patients positive -> 2 / 64; 2, -1, 3, 4, 5, 7: W- = 1 -> 2 * 2 / 64
    assert imagenet["wilcoxon_p"] == pytest.approx(2 / 64) and simsiam["wilcoxon_p"] == pytest.approx(4 / 64)
    # Holm over the two rows: 2 * 0.03125 = 0.0625, max(0.0625, 1 * 0.0625) = 0.0625
    np.testing.assert_allclose(table["wilcoxon_p_holm"], [0.0625, 0.0625])
    np.testing.assert_allclose(table["boot_p_holm"], stats.holm_adjust(table["boot_p"]))
    # each row is bootstrap_paired_difference of its pair
    single = stats.bootstrap_paired_difference(study_table(), "init", ["seed", "patient", "phase"], "dice",
                                               "random", "simsiam")
    assert table.iloc[1][stats.PAIRED_COLUMNS].to_dict() == pytest.approx(single)


def test_pairwise_comparisons_all_pairs_and_shuffle_invariance():
    df = study_table()
    keys = ["seed", "patient", "phase"]
    table = stats.pairwise_comparisons(df, "init", keys, "dice")
    assert list(table[["a", "b"]].itertuples(index=False, name=None)) == [
        ("imagenet", "random"), ("imagenet", "simsiam"), ("random", "simsiam")]
    assert table.iloc[0]["mean_diff"] == pytest.approx(-3.5)
    assert table.iloc[1]["mean_diff"] == pytest.approx(20 / 6 - 3.5)
    shuffled = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    assert not shuffled["init"].equals(df["init"])  # the order really changed
    pd.testing.assert_frame_equal(stats.pairwise_comparisons(shuffled, "init", keys, "dice"), table)
    without_holm = stats.pairwise_comparisons(df, "init", keys, "dice", holm=False)
    assert list(without_holm.columns) == stats.PAIRED_COLUMNS


def test_pairwise_comparisons_bad_inputs():
    df = study_table()
    keys = ["seed", "patient", "phase"]
    with pytest.raises(ValueError, match="baseline"):
        stats.pairwise_comparisons(df, "init", keys, "dice", baseline="swav")
    with pytest.raises(ValueError, match="two levels"):
        stats.pairwise_comparisons(df[df["init"] == "random"], "init", keys, "dice")
    with pytest.raises(ValueError, match="not unique"):
        stats.pairwise_comparisons(df, "init", ["seed", "patient"], "dice")
    with pytest.raises(ValueError, match="n_boot"):
        stats.pairwise_comparisons(df, "init", keys, "dice", n_boot=0)
    with pytest.raises(TypeError, match="DataFrame"):
        stats.pairwise_comparisons(df.to_dict(), "init", keys, "dice")
