"""Tests of cmr_utils.tables with known answers: the report's tables from small synthetic stage-04 frames whose means,
ranges and paired differences are computed by hand."""
from __future__ import annotations

import pandas as pd
import pytest

from cmr_utils import tables

PATIENTS = ("p1", "p2", "p3", "p4")
STRUCTURE_DICE = {"RV": 0.6, "MYO": 0.7, "LV": 0.8}  # mean 0.7


def per_volume(shift: dict[tuple[str, str], float], seeds=(0, 1)) -> pd.DataFrame:
    """Every (init, budget) run scores ``STRUCTURE_DICE`` + its shift on every patient, phase and structure;
    HD95 is 2 mm at ED and 4 mm at ES."""
    return pd.DataFrame([{"run": f"{i}-{b}-s{s}", "init": i, "budget": b, "seed": s, "patient": p, "phase": ph,
                          "structure": st, "dice": d + shift[(i, b)], "hd95": 2.0 if ph == "ED" else 4.0,
                          "hd95_unit": "mm"}
                         for (i, b) in shift for s in seeds for p in PATIENTS for ph in ("ED", "ES")
                         for st, d in STRUCTURE_DICE.items()])


def results(iou: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    """One row per run: the study's test IoU per seed (``iou[(init, budget)][seed]``)."""
    return pd.DataFrame([{"name": f"{i}-{b}-s{s}", "init": i, "budget": b, "seed": s,
                          "n_labelled": 100 if b == "all" else int(b), "frozen_encoder": b != "all",
                          "best_train_iou": v + 0.1, "best_val_iou": v + 0.05, "test_iou_model_grid": v}
                         for (i, b), values in iou.items() for s, v in enumerate(values)])


def per_slice(iou: dict[tuple[str, str], float], seeds=(0, 1)) -> pd.DataFrame:
    return pd.DataFrame([{"run": f"{i}-{b}-s{s}", "init": i, "budget": b, "seed": s, "patient": p, "iou": v}
                         for (i, b), v in iou.items() for s in seeds for p in PATIENTS for _ in range(3)])


def test_volume_dice_is_the_mean_over_structures():
    vd = tables.volume_dice(per_volume({("random", "all"): 0.0, ("simsiam", "all"): 0.1}))
    assert list(vd.columns) == ["init", "budget", "seed", "patient", "phase", "dice"]
    assert len(vd) == 2 * 2 * 4 * 2
    assert vd.groupby("init")["dice"].mean().to_dict() == pytest.approx({"random": 0.7, "simsiam": 0.8})


def test_over_seeds_gives_mean_and_range():
    runs = results({("random", "all"): [0.5, 0.6, 0.7]})
    row = tables.over_seeds(runs, "test_iou_model_grid").loc["random"]
    assert (row["mean"], row["seed_min"], row["seed_max"]) == pytest.approx((0.6, 0.5, 0.7))


def test_the_studys_table_at_the_reference_budget():
    shift = {("random", "all"): 0.0, ("simsiam", "all"): 0.1, ("random", "60"): -0.3, ("simsiam", "60"): -0.2}
    runs = results({("random", "all"): [0.5, 0.7], ("simsiam", "all"): [0.6, 0.8],
                    ("random", "60"): [0.1, 0.1], ("simsiam", "60"): [0.2, 0.2]})
    slices = per_slice({("random", "all"): 0.55, ("simsiam", "all"): 0.65, ("random", "60"): 0.0,
                        ("simsiam", "60"): 0.0})
    table = tables.iou_by_init(runs, slices, per_volume(shift), "all")
    assert list(table.index) == ["random", "simsiam"]
    assert list(dict.fromkeys(table.columns.get_level_values(0))) == [
        "best_train_iou", "best_val_iou", "test_iou_model_grid", "test_slice_iou", "test_dice"]
    assert table.loc["random", ("test_iou_model_grid", "mean")] == pytest.approx(0.6)
    assert table.loc["simsiam", ("best_train_iou", "seed_max")] == pytest.approx(0.9)
    assert table.loc["simsiam", ("test_slice_iou", "mean")] == pytest.approx(0.65)  # the 60-slice runs left out
    # every patient has the same Dice: the interval collapses onto the mean
    dice = table.loc["simsiam", "test_dice"]
    assert (dice["mean"], dice["ci_low"], dice["ci_high"]) == pytest.approx((0.8, 0.8, 0.8))
    assert (dice["n_patients"], dice["n_seeds"]) == (4, 2)


def test_iou_by_budget_puts_the_labelled_slices_third():
    runs = results({("random", "all"): [0.5, 0.7], ("random", "60"): [0.2, 0.3]})
    table = tables.iou_by_budget(runs, per_slice({("random", "all"): 0.6, ("random", "60"): 0.25}))
    assert list(table.columns[:4]) == ["init", "budget", "n_labelled", "mean"]
    by_budget = table.set_index("budget")
    assert by_budget.loc["60", "n_labelled"] == 60 and bool(by_budget.loc["60", "frozen_encoder"])
    assert by_budget.loc["60", "mean"] == pytest.approx(0.25)
    assert by_budget.loc["all", "split_iou_seed_mean"] == pytest.approx(0.6)


def test_paired_comparisons_per_budget():
    table = tables.paired_comparisons(per_volume({("random", "all"): 0.0, ("simsiam", "all"): 0.1,
                                                  ("random", "60"): 0.0}))
    assert len(table) == 1  # budget 60 has one initialisation: nothing to compare
    row = table.iloc[0]
    assert (row["a"], row["b"], row["budget"], row["n_patients"]) == ("random", "simsiam", "all", 4)
    assert (row["mean_diff"], row["ci_low"], row["ci_high"]) == pytest.approx((0.1, 0.1, 0.1))
    empty = tables.paired_comparisons(per_volume({("random", "all"): 0.0}))
    assert empty.empty and {"mean_diff", "wilcoxon_p_holm", "budget"} <= set(empty.columns)


def test_acdc_metrics_mean_sd_and_count_per_structure_and_phase():
    pv = per_volume({("random", "all"): 0.0, ("random", "60"): 0.5})
    pv.loc[(pv["structure"] == "LV") & (pv["patient"] == "p1"), "dice"] = 0.4  # LV: 0.4 on p1, 0.8 elsewhere
    table = tables.acdc_metrics(pv, "all").set_index(["init", "phase", "structure"])
    assert len(table) == 6  # 1 init x 2 phases x 3 structures; budget 60 left out
    lv = table.loc[("random", "ED", "LV")]
    values = pd.Series([0.4, 0.4, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8])  # 4 patients x 2 seeds
    assert (lv["dice"], lv["dice_sd"], lv["volumes"]) == pytest.approx((values.mean(), values.std(), 8))
    assert table.loc[("random", "ES", "RV"), "hd95"] == 4.0 and lv["hd95_unit"] == "mm"


def test_headline_has_a_row_per_init_and_budget_all_labels_first():
    shift = {("random", "60"): -0.2, ("simsiam", "60"): -0.1, ("random", "all"): 0.0, ("simsiam", "all"): 0.1}
    runs = results({("random", "60"): [0.2, 0.4], ("simsiam", "60"): [0.3, 0.3],
                    ("random", "all"): [0.6, 0.8], ("simsiam", "all"): [0.7, 0.7]})
    table = tables.headline(runs, per_volume(shift))
    assert list(zip(table["init"], table["budget"])) == [("random", "all"), ("simsiam", "all"), ("random", "60"),
                                                         ("simsiam", "60")]
    assert list(table.columns) == ["init", "budget", "labelled_slices", "seeds", "iou", "dice", "dice_ci_low",
                                   "dice_ci_high"]
    assert table["iou"].tolist() == pytest.approx([0.7, 0.7, 0.3, 0.3])
    assert table["dice"].tolist() == pytest.approx([0.7, 0.8, 0.5, 0.6])
    assert table["labelled_slices"].tolist() == [100, 100, 60, 60] and set(table["seeds"]) == {2}
    view = tables.headline_view(table)
    assert len(view.columns) == 5  # fits the page
    assert view.iloc[1].tolist() == ["simsiam", "all", 100, "0.700", "0.800 [0.800, 0.800]"]


def test_budgets_sort_patients_below_slices_and_trained_after_frozen():
    budgets = ["p1", "150", "150-trained", "all", "p3"]
    runs = results({("random", b): [0.5] for b in ["all", "150"]}).iloc[:0]
    runs = pd.concat([runs, pd.DataFrame([{"name": f"random-{b}-s0", "init": "random", "budget": b, "seed": 0,
                                           "n_labelled": 1, "test_iou_model_grid": 0.5} for b in budgets])])
    table = tables.headline(runs, per_volume({("random", b): 0.0 for b in budgets}, seeds=(0,)))
    assert table["budget"].tolist() == ["all", "150", "150-trained", "p3", "p1"]


def test_validation_histories_are_the_mean_over_seeds_per_epoch(tmp_path):
    for seed, loss in ((0, [1.0, 0.5]), (1, [0.8, 0.3])):
        (tmp_path / f"random-all-s{seed}").mkdir()
        pd.DataFrame({"epoch": [0, 1], "val_loss": loss, "val_iou": [0.1 * seed, 0.5]}).to_csv(
            tmp_path / f"random-all-s{seed}" / "history.csv", index=False)
    runs = pd.DataFrame({"name": ["random-all-s0", "random-all-s1"], "init": ["random", "random"]})
    history = tables.validation_histories(runs, lambda name: tmp_path / name)["random"]
    assert history["val_loss"].tolist() == pytest.approx([0.9, 0.4])
    assert history["val_iou"].tolist() == pytest.approx([0.05, 0.5])
