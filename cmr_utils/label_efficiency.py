"""Does pretraining pay with few labels? The patient-budget tables, the gain of each method over random
initialisation, and the answer in words (stage 04 writes them, the report shows them).

The unit is the field's: labelled training patients (``p1``, ``p3``, ``p7``: every slice of 1, 3 or 7 patients,
the SSL4MIS semi-supervised ACDC settings) and, beside them, the study's slice budgets. The value is the 3D Dice of
a test patient and phase on the volume's own grid, mean over RV, MYO and LV; intervals are 95 % patient-level
bootstrap intervals (seeds pooled, the test patients the independent units), differences paired on (seed, patient,
phase) with ``cmr_utils.stats``.
"""
from __future__ import annotations

import pandas as pd

from . import stats
from .budgets import budget_label, budget_order, patient_count
from .structures import STRUCTURES

KEYS = ["seed", "patient", "phase"]


def dice_by_budget(volume_dice: pd.DataFrame) -> pd.DataFrame:
    """Mean test Dice and its patient-bootstrap interval per (init, budget), budgets in ``budget_order``.
    ``volume_dice``: init, budget, seed, patient, phase, dice (one row per test volume of one run)."""
    table = stats.bootstrap_mean_ci(volume_dice.assign(budget=volume_dice["budget"].astype(str)), "dice",
                                    by=["init", "budget"])
    table["labelled_patients"] = table["budget"].map(patient_count)
    return table.sort_values(["budget", "init"], key=lambda c: c.map(budget_order) if c.name == "budget" else c,
                             ignore_index=True)


def gains_over_random(volume_dice: pd.DataFrame, baseline: str = "random") -> pd.DataFrame:
    """Each initialisation minus ``baseline`` at each budget, paired on (seed, patient, phase): ``mean_diff`` with
    its 95 % patient-bootstrap interval and p values (``stats.pairwise_comparisons``, Holm within a budget)."""
    rows = []
    for budget, group in volume_dice.assign(budget=volume_dice["budget"].astype(str)).groupby("budget"):
        if baseline not in set(group["init"]) or group["init"].nunique() < 2:
            continue
        rows.append(stats.pairwise_comparisons(group, "init", KEYS, "dice", baseline=baseline).assign(budget=budget))
    if not rows:
        return pd.DataFrame(columns=["budget", "init", "mean_diff", "ci_low", "ci_high"])
    table = pd.concat(rows, ignore_index=True).rename(columns={"b": "init"}).drop(columns="a")
    table.insert(0, "budget", table.pop("budget"))
    return table.sort_values(["budget", "init"], key=lambda c: c.map(budget_order) if c.name == "budget" else c,
                             ignore_index=True)


def gains_by_structure(per_volume: pd.DataFrame, baseline: str = "random") -> pd.DataFrame:
    """Where a gain comes from: each initialisation minus ``baseline`` per budget and structure (RV, MYO, LV), the
    structure's 3D Dice paired on (seed, patient, phase) as in ``gains_over_random``: ``budget, structure, init,
    dice`` (the initialisation's mean), ``dice_random`` (the baseline's), ``mean_diff, ci_low, ci_high`` and the
    p values (Holm over the initialisations of a budget and structure). ``per_volume``: stage 04's rows (init,
    budget, seed, patient, phase, structure, dice)."""
    frame = per_volume.assign(budget=per_volume["budget"].astype(str))
    rows = []
    for (budget, structure), group in frame.groupby(["budget", "structure"]):
        if baseline not in set(group["init"]) or group["init"].nunique() < 2:
            continue
        rows.append(stats.pairwise_comparisons(group, "init", KEYS, "dice", baseline=baseline)
                    .assign(budget=budget, structure=structure))
    columns = ["budget", "structure", "init", "dice", f"dice_{baseline}", "mean_diff", "ci_low", "ci_high"]
    if not rows:
        return pd.DataFrame(columns=columns)
    table = (pd.concat(rows, ignore_index=True)
             .rename(columns={"b": "init", "mean_b": "dice", "mean_a": f"dice_{baseline}"}).drop(columns="a"))
    table = table[columns + [c for c in table.columns if c not in columns]]
    order = {name: k for k, name in enumerate(STRUCTURES.values())}
    return table.sort_values(["budget", "structure", "init"], ignore_index=True, key=lambda c: c.map(
        budget_order) if c.name == "budget" else c.map(order) if c.name == "structure" else c)


def answer(gains: pd.DataFrame, display: dict[str, str] | None = None, methods=None,
           freeze_below: int | None = None, alpha: float = 0.05) -> str:
    """The answer in one paragraph. Per budget, the self-supervised method (``methods``; every initialisation but
    random when ``None``) with the largest gain over random: it **pays** where its 95 % interval lies above 0 and its
    bootstrap p, Holm-adjusted over the methods compared at that budget (``boot_p_holm``), is below ``alpha`` —
    picking the best of several is what the adjustment pays for; it **costs** where the interval lies below 0 with
    the same p; otherwise no measurable difference. The intervals resample test patients: the labelled patients (one
    draw per seed) and each method's one pretraining run are fixed, and the answer says so."""
    if gains.empty:
        return "No budget has both random initialisation and a pretrained one: no answer to give."
    display = display or {}
    if methods is not None:
        gains = gains[gains["init"].isin(list(methods))]
        if gains.empty:
            return "No self-supervised method was compared with random initialisation: no answer to give."
    p_column = "boot_p_holm" if "boot_p_holm" in gains else "boot_p"
    lines, paid = [], []
    for budget, group in gains.groupby("budget", sort=False):
        best = group.loc[group["mean_diff"].idxmax()]
        name, where = display.get(best["init"], best["init"]), budget_label(budget, freeze_below)
        significant = best[p_column] < alpha
        pays, costs = significant and best["ci_low"] > 0, significant and best["ci_high"] < 0
        verdict = "pays" if pays else "costs" if costs else "makes no measurable difference"
        if pays:
            paid.append(f"{where} ({name})")
        lines.append(f"{where}: best {name} {best['mean_diff']:+.3f} [{best['ci_low']:+.3f}, {best['ci_high']:+.3f}]"
                     f" (p {best[p_column]:.2g}, Holm over {len(group)}) — {verdict}")
    head = (f"**Pretraining pays** at {', '.join(paid)}." if paid else
            "**Pretraining does not pay** at any budget here: no method's gain over random has an interval above 0 "
            "and an adjusted p below 0.05.")
    return (head + " Best method minus random, test Dice paired over patients and seeds (95 % patient-bootstrap "
            "interval; bootstrap p, Holm-adjusted over the methods at each budget): " + "; ".join(lines) + ". The "
            "intervals cover the test patients, not another draw of the labelled patients (one per seed) or another "
            "pretraining run (one per method).")
