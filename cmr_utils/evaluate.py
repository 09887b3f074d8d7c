"""Stage 04 logic: every run's selected model on the test split, scored as the study and as ACDC do.

- the study's IoU (``cmr_utils.metrics.study_iou``), per slice and over the split;
- per patient and phase (ED, ES): 3D Dice, IoU and HD95 per structure (mm where the source has spacing,
  pixels otherwise — the unit is a column);
- LV and RV ejection fraction from predicted versus true ED/ES volumes.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics
from .explain import predict
from .finetune import load_trained_model


def _volumes(slices: pd.DataFrame):
    """(patient, phase, row positions ordered by slice, spacing or None) for each volume of a split."""
    for (patient, phase), group in slices.groupby(["patient", "phase"], sort=True):
        group = group.sort_values("slice")
        spacing = tuple(group[["spacing_z", "spacing_y", "spacing_x"]].iloc[0])
        yield patient, phase, slices.index.get_indexer(group.index), \
            None if any(np.isnan(spacing)) else spacing


def score_predictions(pred: np.ndarray, truth: np.ndarray, slices: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per-slice, per-volume and ejection-fraction tables for one run's test predictions."""
    tp, fp, fn, tn = metrics.slice_stats(pred, truth)
    per_slice = slices[["patient", "phase", "slice"]].copy()
    per_slice["iou"] = metrics.study_iou_per_slice(tp, fp, fn, tn)
    per_slice["dice"] = metrics.mean_foreground_dice_per_slice(pred, truth)
    for k, name in metrics.STRUCTURES.items():
        per_slice[f"dice_{name}"] = metrics.dice_per_slice(pred, truth, k)

    rows, volumes = [], []
    for patient, phase, idx, spacing in _volumes(slices):
        scores = metrics.structure_scores(pred[idx], truth[idx], spacing)
        for name, s in scores.items():
            rows.append({"patient": patient, "phase": phase, "structure": name, **s})
        for k, name in metrics.STRUCTURES.items():
            volumes.append({"patient": patient, "phase": phase, "structure": name,
                            "true": metrics.structure_volume(truth[idx], k, spacing),
                            "pred": metrics.structure_volume(pred[idx], k, spacing)})
    per_volume = pd.DataFrame(rows)

    vol = pd.DataFrame(volumes).pivot_table(index=["patient", "structure"], columns="phase",
                                            values=["true", "pred"]).dropna()
    ef_rows = []
    for (patient, structure), v in vol.iterrows():
        if structure == "MYO" or v[("true", "ED")] <= 0:
            continue

        def ef_of(kind):  # undefined (NaN) when the prediction has no cavity at end-diastole
            return metrics.ejection_fraction(v[(kind, "ED")], v[(kind, "ES")]) if v[(kind, "ED")] > 0 else np.nan

        ef_rows.append({"patient": patient, "structure": structure, "ef_true": ef_of("true"), "ef_pred": ef_of("pred")})
    ef = pd.DataFrame(ef_rows, columns=["patient", "structure", "ef_true", "ef_pred"])
    return {"per_slice": per_slice, "per_volume": per_volume, "ef": ef,
            "split_iou": metrics.study_iou(tp, fp, fn, tn)}


def evaluate_run(run_dir: Path, images: np.ndarray, truth: np.ndarray, slices: pd.DataFrame,
                 device: str = "cpu") -> dict:
    model = load_trained_model(run_dir)
    return score_predictions(predict(model.to(device), images)[0], np.asarray(truth), slices)


def read_results(runs: list[dict], finetune_dir) -> pd.DataFrame:
    """One row per planned run with its ``result.json`` (status ok / unavailable)."""
    rows = []
    for run in runs:
        path = Path(finetune_dir(run["name"])) / "result.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run stage 03 for {run['name']} first")
        rows.append({"reason": None, **run, **json.loads(path.read_text())})  # reason: set when unavailable
    return pd.DataFrame(rows)


def ef_agreement_table(ef: pd.DataFrame) -> pd.DataFrame:
    """Bias, limits of agreement and correlation of predicted versus true EF per initialisation and structure;
    ``undefined`` counts the volumes whose prediction had no cavity at end-diastole."""
    rows = []
    for (init, structure), g in ef.groupby(["init", "structure"]):
        valid = g.dropna(subset=["ef_true", "ef_pred"])
        row = metrics.ef_agreement(valid["ef_true"], valid["ef_pred"]) if len(valid) else {"n": 0}
        rows.append({"init": init, "structure": structure, **row, "undefined": len(g) - len(valid)})
    return pd.DataFrame(rows)
