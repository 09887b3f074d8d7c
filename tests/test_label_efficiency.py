"""Tests of cmr_utils.label_efficiency and evaluate.reference_budget: known answers on synthetic per-volume Dice."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cmr_utils import label_efficiency as le
from cmr_utils.evaluate import reference_budget


def volume_dice(shift: dict[tuple[str, str], float], patients: int = 8, seeds=(0, 1)) -> pd.DataFrame:
    """Random's Dice varies by patient; each (init, budget) adds its ``shift`` on every patient, phase and seed."""
    rng = np.random.default_rng(0)
    base = {f"p{i:02d}": 0.5 + 0.3 * rng.random() for i in range(patients)}
    rows = [{"init": init, "budget": budget, "seed": s, "patient": p, "phase": ph, "dice": base[p] + d}
            for (init, budget), d in shift.items() for s in seeds for p in base for ph in ("ED", "ES")]
    return pd.DataFrame(rows)


def test_budget_order_patients_then_slices_then_all():
    budgets = ["all", "150-trained", "p7", "150", "p1", "20", "p3"]
    assert sorted(budgets, key=le.budget_order) == ["p1", "p3", "p7", "20", "150", "150-trained", "all"]


def test_gains_are_the_paired_differences_and_the_answer_says_where_it_pays():
    df = volume_dice({("random", "p3"): 0.0, ("glcl", "p3"): 0.1, ("mim", "p3"): 0.02,
                      ("random", "150"): 0.0, ("glcl", "150"): -0.03, ("mim", "150"): 0.0})
    gains = le.gains_over_random(df)
    assert list(gains["budget"]) == ["p3", "p3", "150", "150"]
    glcl = gains[(gains["budget"] == "p3") & (gains["init"] == "glcl")].iloc[0]
    assert glcl["mean_diff"] == pytest.approx(0.1) and glcl["ci_low"] == pytest.approx(0.1)
    assert glcl["n_patients"] == 8 and glcl["n_pairs"] == 32
    text = le.answer(gains, {"glcl": "Global + local contrastive"}, freeze_below=1000)
    assert text.startswith("**Pretraining pays** at 3 labelled patients (Global + local contrastive).")
    assert "150 slices with the encoder frozen: best mim +0.000 [+0.000, +0.000]" in text
    assert "— makes no measurable difference" in text and "not another draw of the labelled patients" in text
    none = le.answer(le.gains_over_random(df[df["budget"] == "150"]))
    assert none.startswith("**Pretraining does not pay**")
    # only the methods named count: ImageNet beating random is not self-supervised pretraining paying
    imagenet = le.gains_over_random(volume_dice({("random", "p3"): 0.0, ("imagenet", "p3"): 0.2,
                                                 ("glcl", "p3"): 0.0}))
    assert le.answer(imagenet, methods=["glcl"]).startswith("**Pretraining does not pay**")
    assert le.answer(imagenet).startswith("**Pretraining pays** at 3 labelled patients (imagenet)")


def test_the_answer_needs_the_adjusted_p_not_only_the_interval():
    gains = pd.DataFrame({"budget": ["p3", "p3"], "init": ["glcl", "mim"], "mean_diff": [0.02, 0.01],
                          "ci_low": [0.001, -0.01], "ci_high": [0.04, 0.03], "boot_p": [0.03, 0.4],
                          "boot_p_holm": [0.06, 0.4]})
    assert "— makes no measurable difference" in le.answer(gains)  # interval above 0, adjusted p 0.06
    assert "— pays" in le.answer(gains.drop(columns="boot_p_holm"))  # an older table: unadjusted p 0.03


def test_budget_labels_say_patients_slices_and_the_encoder():
    assert [le.budget_label(b, 1000) for b in ("p1", "p7", "150", "150-trained", "1200", "all")] == [
        "1 labelled patient", "7 labelled patients", "150 slices with the encoder frozen",
        "150 slices with the encoder trained", "1200 slices", "all labels"]


def test_dice_by_budget_has_intervals_and_patient_counts():
    df = volume_dice({("random", "p1"): 0.0, ("random", "p7"): 0.05, ("random", "150"): 0.1})
    table = le.dice_by_budget(df)
    assert list(table["budget"]) == ["p1", "p7", "150"]
    assert list(table["labelled_patients"].fillna(0)) == [1, 7, 0]
    assert (table["ci_low"] <= table["mean"]).all() and (table["mean"] <= table["ci_high"]).all()
    assert table["mean"].diff().dropna().to_numpy() == pytest.approx([0.05, 0.05])


def test_reference_budget_is_all_or_the_largest_trained_budget():
    runs = pd.DataFrame({"budget": ["p1", "p7", "150"], "n_labelled": [20, 140, 150], "status": "ok",
                         "frozen_encoder": [False, False, True]})
    assert reference_budget(runs) == "p7"  # 150 has more slices, but its encoder was frozen
    assert reference_budget(pd.concat([runs, pd.DataFrame({"budget": ["all"], "n_labelled": [1020], "status": "ok",
                                                           "frozen_encoder": [False]})])) == "all"


def test_gains_by_structure_say_which_structure_gains():
    """GLCL adds 0.1 to the RV Dice only and MIM takes 0.05 from the LV only: the per-structure table has exactly
    those paired differences (intervals included) and zeros elsewhere, structures in RV, MYO, LV order, budgets in
    budget order, and each row the two means it subtracts."""
    rows = []
    for structure, (glcl, mim) in {"LV": (0.0, -0.05), "RV": (0.1, 0.0), "MYO": (0.0, 0.0)}.items():
        shifts = {(init, budget): d for budget in ("150", "p3")
                  for init, d in (("random", 0.0), ("glcl", glcl), ("mim", mim))}
        rows.append(volume_dice(shifts).assign(structure=structure))
    table = le.gains_by_structure(pd.concat(rows, ignore_index=True))
    assert list(table["budget"].unique()) == ["p3", "150"]
    assert list(table["structure"].unique()) == ["RV", "MYO", "LV"]
    assert len(table) == 12 and set(table["init"]) == {"glcl", "mim"}
    expected = {("glcl", "RV"): 0.1, ("mim", "LV"): -0.05}
    for row in table.itertuples():
        diff = expected.get((row.init, row.structure), 0.0)
        assert row.mean_diff == pytest.approx(diff) and row.ci_low == pytest.approx(diff)
        assert row.ci_high == pytest.approx(diff) and row.dice - row.dice_random == pytest.approx(diff)
    assert le.gains_by_structure(rows[0][rows[0]["init"] == "glcl"]).empty  # no random to subtract
