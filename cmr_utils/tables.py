"""The report's tables of segmentation scores, computed from stage 04's per-run frames (pandas in, pandas out).

Inputs are the frames stage 04 writes to ``runs/<data>/<profile>/evaluate/``:

- ``results`` (``runs.csv``): one row per trained run (name, init, budget, seed, n_labelled, frozen_encoder,
  best_train_iou, best_val_iou, test_iou_model_grid);
- ``per_slice``: the study's IoU of each test slice on the model grid (init, budget, seed, patient, iou);
- ``per_volume``: ACDC's metrics per test patient, phase and structure on the volume's original grid (init, budget,
  seed, patient, phase, structure, dice, hd95, hd95_unit).

Intervals are 95 % patient-level bootstrap intervals (``cmr_utils.stats``: 2,000 resamples over test patients,
seeds pooled); one number per run (the study's IoU over the split) gets its mean and range over seeds instead.
``cmr_utils.figures`` names the file each table is written to.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import stats
from .budgets import budget_order

VOLUME_KEYS = ["init", "budget", "seed", "patient", "phase"]
MODEL_GRID = ("best_train_iou", "best_val_iou", "test_iou_model_grid")  # one number per run


def volume_dice(per_volume: pd.DataFrame) -> pd.DataFrame:
    """3D Dice of each run's test patient and phase, mean over the structures (RV, MYO, LV): ``VOLUME_KEYS`` + dice."""
    return per_volume.groupby(VOLUME_KEYS)["dice"].mean().reset_index()


def over_seeds(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per initialisation: the mean of a one-number-per-run ``column`` over seeds and its range (seed_min, seed_max)."""
    return runs.groupby("init")[column].agg(mean="mean", seed_min="min", seed_max="max")


def over_patients(df: pd.DataFrame, value: str, counts: bool = False) -> pd.DataFrame:
    """Per initialisation: the mean of ``value`` over all rows and its patient-level bootstrap interval (and, with
    ``counts``, the numbers of test patients and seeds)."""
    summary = stats.bootstrap_mean_ci(df, value, by="init").set_index("init")
    return summary[["mean", "ci_low", "ci_high"] + (["n_patients", "n_seeds"] if counts else [])]


def iou_by_init(results: pd.DataFrame, per_slice: pd.DataFrame, per_volume: pd.DataFrame,
                reference: str = "all") -> pd.DataFrame:
    """The study's table at the ``reference`` budget, one row per initialisation (columns: a (measure, statistic)
    MultiIndex): ``best_train_iou``, ``best_val_iou`` and ``test_iou_model_grid`` over seeds (``over_seeds``);
    ``test_slice_iou`` (per test slice) and ``test_dice`` (per patient and phase) over patients (``over_patients``)."""
    runs = results[results["budget"] == reference]
    dice = volume_dice(per_volume)
    return pd.concat({**{column: over_seeds(runs, column) for column in MODEL_GRID},
                      "test_slice_iou": over_patients(per_slice[per_slice["budget"] == reference], "iou"),
                      "test_dice": over_patients(dice[dice["budget"] == reference], "dice", counts=True)}, axis=1)


def iou_by_budget(results: pd.DataFrame, per_slice: pd.DataFrame) -> pd.DataFrame:
    """The label-budget curve's numbers, one row per (init, budget): the study's IoU per test slice, mean and
    bootstrap interval (``stats.bootstrap_mean_ci`` columns), the labelled slices, whether the encoder was frozen,
    and ``split_iou_seed_mean`` (the IoU of the whole split, mean over seeds)."""
    runs = (results.groupby(["init", "budget"])
            .agg(n_labelled=("n_labelled", "first"), frozen_encoder=("frozen_encoder", "first"),
                 split_iou_seed_mean=("test_iou_model_grid", "mean"))
            .reset_index())
    summary = stats.bootstrap_mean_ci(per_slice, "iou", by=["init", "budget"]).merge(runs, on=["init", "budget"])
    summary.insert(2, "n_labelled", summary.pop("n_labelled"))
    return summary


def paired_comparisons(per_volume: pd.DataFrame) -> pd.DataFrame:
    """Every pair of initialisations at each budget with two or more, paired on (seed, patient, phase) over the
    patient-phase 3D Dice (``stats.pairwise_comparisons``; Holm within a budget), with a ``budget`` column."""
    rows = [stats.pairwise_comparisons(group, "init", ["seed", "patient", "phase"], "dice").assign(budget=budget)
            for budget, group in volume_dice(per_volume).groupby("budget") if group["init"].nunique() > 1]
    if not rows:
        return pd.DataFrame(columns=[*stats.PAIRED_COLUMNS, "boot_p_holm", "wilcoxon_p_holm", "budget"])
    return pd.concat(rows, ignore_index=True)


def acdc_metrics(per_volume: pd.DataFrame, reference: str = "all") -> pd.DataFrame:
    """ACDC's metrics at the ``reference`` budget per (init, phase, structure): mean and SD of the 3D Dice over
    volumes and seeds, mean HD95 (in ``hd95_unit``) and the number of volumes."""
    return (per_volume[per_volume["budget"] == reference]
            .groupby(["init", "phase", "structure"])
            .agg(dice=("dice", "mean"), dice_sd=("dice", "std"), hd95=("hd95", "mean"),
                 hd95_unit=("hd95_unit", "first"), volumes=("dice", "size"))
            .reset_index())


def headline(results: pd.DataFrame, per_volume: pd.DataFrame) -> pd.DataFrame:
    """The report's first table, one row per (init, budget), budgets from all labels down: the labelled slices,
    the seeds, the study's IoU (``test_iou_model_grid``: the whole test split on the model grid, mean over seeds)
    and the 3D Dice (per patient and phase on the original grid, mean over RV, MYO and LV) with its 95 %
    patient-level bootstrap interval."""
    text = results.assign(budget=results["budget"].astype(str))
    inits = list(dict.fromkeys(text["init"]))  # the plan's order
    runs = (text.groupby(["init", "budget"], sort=False)
            .agg(labelled_slices=("n_labelled", "first"), seeds=("seed", "nunique"), iou=("test_iou_model_grid", "mean"))
            .reset_index())
    dice = volume_dice(per_volume.assign(budget=per_volume["budget"].astype(str)))
    ci = (stats.bootstrap_mean_ci(dice, "dice", by=["init", "budget"])
          .rename(columns={"mean": "dice", "ci_low": "dice_ci_low", "ci_high": "dice_ci_high"})
          [["init", "budget", "dice", "dice_ci_low", "dice_ci_high"]])
    table = runs.merge(ci, on=["init", "budget"], how="left")
    order = table["budget"].map(budget_order).map(lambda key: tuple(-k if isinstance(k, int) else k for k in key))
    return (table.assign(_budget=order, _init=table["init"].map(inits.index))
            .sort_values(["_budget", "_init"]).drop(columns=["_budget", "_init"]).reset_index(drop=True))


def headline_view(table: pd.DataFrame) -> pd.DataFrame:
    """``headline`` as the report shows it: five columns, the Dice and its interval in one cell."""
    def dice(row) -> str:
        if pd.isna(row["dice"]):
            return "–"
        ci = "" if pd.isna(row["dice_ci_low"]) else f" [{row['dice_ci_low']:.3f}, {row['dice_ci_high']:.3f}]"
        return f"{row['dice']:.3f}{ci}"

    return pd.DataFrame({
        "initialisation": table["init"], "budget": table["budget"],
        "labelled slices": table["labelled_slices"].astype("Int64"),
        "IoU (study, test split)": table["iou"].map(lambda x: "–" if pd.isna(x) else f"{x:.3f}"),
        "3D Dice [95 % CI]": table.apply(dice, axis=1) if len(table) else pd.Series(dtype=str),
    })


def validation_histories(runs: pd.DataFrame, finetune_dir) -> dict[str, pd.DataFrame]:
    """Per initialisation: the fine-tuning history (``history.csv`` of each of its ``runs``), mean over seeds per
    epoch."""
    return {init: pd.concat([pd.read_csv(Path(finetune_dir(name)) / "history.csv") for name in group["name"]])
            .groupby("epoch").mean(numeric_only=True).reset_index()
            for init, group in runs.groupby("init")}
