"""Stage 04 logic: every run's selected model on the test split, scored as the study and as ACDC do.

- the study's IoU (``cmr_utils.metrics.study_iou``), per slice and over the split, on the model's grid
  (the prepared test slices and labels: squared, field-of-view crop, ``image_size`` px);
- per patient and phase (ED, ES), on each volume's ORIGINAL grid against its ORIGINAL labels, as the ACDC
  challenge does: the softmax probabilities are mapped back (resize, then undo the field-of-view crop and the
  padding or cropping; ``cmr_utils.geometry.SliceGeometry.to_native``), argmax'd, and compared with the label
  volume read from the labelled source: 3D Dice, IoU and HD95 per structure (mm where the source has spacing,
  pixels of the original grid otherwise — the unit is a column), and the structures' volumes;
- LV and RV ejection fraction from predicted versus true ED/ES volumes (original grid).

Volumes are predicted, mapped back and scored one at a time (a 2-core, 24 GiB machine holds one volume's
probabilities on the original grid, tens of MB, never the split's).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics
from .finetune import load_trained_model
from .geometry import SliceGeometry
from .readers import CardiacVolume, DataError, Source, open_source


# ---------------------------------------------------------------------------------------------- prediction
def predict_probabilities(model, images, batch_size: int = 16) -> np.ndarray:
    """Softmax probabilities (N, C, H, W) float32 of images (N, H, W) in [0, 1], in batches, under
    ``torch.no_grad`` on the model's device (put the model in eval mode yourself). The model maps
    (B, 1, H, W) to logits (B, C, H, W)."""
    import torch

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if np.ndim(images) != 3 or len(images) == 0:
        raise ValueError(f"images must have shape (N, H, W) with N >= 1, got {np.shape(images)}")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[start:start + batch_size], dtype=np.float32))[:, None].to(device)
            out.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------- scoring
def score_slices(pred: np.ndarray, truth: np.ndarray, slices: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """Per-slice scores (patient, phase, slice, iou, dice, dice_RV, dice_MYO, dice_LV) and the study's IoU
    of the split, on whatever grid ``pred`` and ``truth`` (N, H, W) share (stage 04: the model's)."""
    tp, fp, fn, tn = metrics.slice_stats(pred, truth)
    per_slice = slices[["patient", "phase", "slice"]].copy()
    per_slice["iou"] = metrics.study_iou_per_slice(tp, fp, fn, tn)
    per_slice["dice"] = metrics.mean_foreground_dice_per_slice(pred, truth)
    for k, name in metrics.STRUCTURES.items():
        per_slice[f"dice_{name}"] = metrics.dice_per_slice(pred, truth, k)
    return per_slice, metrics.study_iou(tp, fp, fn, tn)


def score_volume(patient: str, phase: str, pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[list, list]:
    """ACDC's metrics of one volume (Z, H, W): rows of (patient, phase, structure, dice, iou, hd95,
    hd95_unit) and rows of (patient, phase, structure, true, pred) volumes (ml with spacing, voxels without)."""
    scores = [{"patient": patient, "phase": phase, "structure": name, **s}
              for name, s in metrics.structure_scores(pred, truth, spacing).items()]
    volumes = [{"patient": patient, "phase": phase, "structure": name,
                "true": metrics.structure_volume(truth, k, spacing), "pred": metrics.structure_volume(pred, k, spacing)}
               for k, name in metrics.STRUCTURES.items()]
    return scores, volumes


def ef_table(volumes: pd.DataFrame) -> pd.DataFrame:
    """LV and RV ejection fractions (patient, structure, ef_true, ef_pred) from the volumes of ``score_volume``;
    ef_pred is NaN when the prediction has no cavity at end-diastole."""
    columns = ["patient", "structure", "ef_true", "ef_pred"]
    if volumes.empty:
        return pd.DataFrame(columns=columns)
    vol = volumes.pivot_table(index=["patient", "structure"], columns="phase", values=["true", "pred"]).dropna()
    rows = []
    for (patient, structure), v in vol.iterrows():
        if structure == "MYO" or v[("true", "ED")] <= 0:
            continue

        def ef_of(kind):  # undefined (NaN) when the prediction has no cavity at end-diastole
            return metrics.ejection_fraction(v[(kind, "ED")], v[(kind, "ES")]) if v[(kind, "ED")] > 0 else np.nan

        rows.append({"patient": patient, "structure": structure, "ef_true": ef_of("true"), "ef_pred": ef_of("pred")})
    return pd.DataFrame(rows, columns=columns)


def _volumes(slices: pd.DataFrame):
    """(patient, phase, row positions ordered by slice, spacing or None) for each volume of a split."""
    for (patient, phase), group in slices.groupby(["patient", "phase"], sort=True):
        group = group.sort_values("slice")
        spacing = tuple(group[["spacing_z", "spacing_y", "spacing_x"]].iloc[0])
        yield patient, phase, slices.index.get_indexer(group.index), \
            None if any(np.isnan(spacing)) else spacing


def score_predictions(pred: np.ndarray, truth: np.ndarray, slices: pd.DataFrame) -> dict:
    """Every metric on ONE grid (the model's): per-slice, per-volume (slices grouped into volumes, spacing of
    the slice table) and ejection-fraction tables, and the study's IoU. Stage 04 scores the 3D metrics on the
    original grid instead (``score_run``); this remains for label maps that share a grid."""
    per_slice, iou = score_slices(pred, truth, slices)
    rows, volumes = [], []
    for patient, phase, idx, spacing in _volumes(slices):
        scores, vols = score_volume(patient, phase, pred[idx], truth[idx], spacing)
        rows += scores
        volumes += vols
    return {"per_slice": per_slice, "per_volume": pd.DataFrame(rows), "ef": ef_table(pd.DataFrame(volumes)),
            "iou_model_grid": iou}


# ---------------------------------------------------------------------------------------------- native grid
def labelled_source(prepared) -> Source:
    """The labelled source a prepared folder was made from (the manifest's first source), through the readers."""
    entry = prepared.manifest["sources"][0]
    folder = Path(entry["folder"])
    if not folder.is_dir():
        raise DataError(f"{folder}: the labelled source of {prepared.folder} is gone; stage 04 reads the original "
                        "label volumes from it (restore it, or rerun stage 01 on the data's new place)")
    source = open_source(folder)
    if source.layout != entry["layout"]:
        raise DataError(f"{folder}: layout {source.layout}, but stage 01 read it as {entry['layout']}; rerun stage 01")
    return source


def native_predictions(prepared, source: Source, probabilities_of: Callable[[np.ndarray], np.ndarray],
                       split: str = "test") -> Iterator[tuple[CardiacVolume, np.ndarray, np.ndarray, np.ndarray]]:
    """For each labelled volume of ``split``, one at a time: ``(volume, rows, model-grid labels, native labels)``.

    ``probabilities_of(rows)`` returns the class probabilities (len(rows), C, S, S) of those rows of the
    prepared split (slice order within the volume); they are argmax'd on the model grid (the study's IoU) and
    mapped back to the volume's original grid with the geometry stage 01 used (``SliceGeometry``), then
    argmax'd there. ``volume`` is the source's ``CardiacVolume`` (original image, labels and spacing).
    """
    slices = prepared.slices(split)
    manifest = prepared.manifest
    positions = {key: slices.index.get_indexer(group.sort_values("slice").index)
                 for key, group in slices.groupby(["patient", "phase"], sort=False)}
    seen = set()
    for vol in source.volumes(sorted(slices["patient"].unique())):
        key = (vol.patient, vol.phase)
        rows = positions.get(key)
        z, h, w = vol.label.shape if vol.label is not None else (None, None, None)
        if rows is None or vol.label is None:
            raise DataError(f"{vol.path}: {vol.patient} {vol.phase} is not among the prepared {split} slices "
                            f"(or has no labels); the source differs from the one stage 01 prepared; rerun stage 01")
        recorded = slices.iloc[rows]
        if len(rows) != z or (recorded["orig_h"] != h).any() or (recorded["orig_w"] != w).any():
            raise DataError(f"{vol.path}: shape {(z, h, w)}, but stage 01 prepared {len(rows)} slices of "
                            f"{int(recorded['orig_h'].iloc[0])} x {int(recorded['orig_w'].iloc[0])}; "
                            "the source changed since stage 01; rerun it")
        seen.add(key)
        geometry = SliceGeometry.from_manifest(manifest, h, w)
        probabilities = np.asarray(probabilities_of(rows), dtype=np.float32)
        yield vol, rows, probabilities.argmax(axis=1).astype(np.uint8), geometry.labels_to_native(probabilities)
    missing = sorted(set(positions) - seen)
    if missing:
        raise DataError(f"{source.folder}: the prepared {split} volumes {missing[:4]} are not in the source; "
                        "rerun stage 01")


def score_run(prepared, source: Source, probabilities_of: Callable[[np.ndarray], np.ndarray],
              split: str = "test") -> dict:
    """One run's scores: ``per_slice`` and ``iou_model_grid`` on the model's grid (prepared labels);
    ``per_volume`` (patient, phase, structure, dice, iou, hd95, hd95_unit) and ``ef`` on each volume's
    original grid against the source's original labels (``native_predictions``)."""
    truth = prepared.labels(split)
    pred = np.zeros(truth.shape, dtype=np.uint8)
    rows_out, volumes = [], []
    for vol, rows, model_grid, native in native_predictions(prepared, source, probabilities_of, split):
        pred[rows] = model_grid
        scores, vols = score_volume(vol.patient, vol.phase, native, vol.label, vol.spacing)
        rows_out += scores
        volumes += vols
    per_slice, iou = score_slices(pred, np.asarray(truth), prepared.slices(split))
    return {"per_slice": per_slice, "per_volume": pd.DataFrame(rows_out), "ef": ef_table(pd.DataFrame(volumes)),
            "iou_model_grid": iou}


def evaluate_run(run_dir: Path, prepared, source: Source | None = None, *, device: str = "cpu",
                 batch_size: int = 16) -> dict:
    """Score one run's selected model on the test split (``score_run``); ``source`` defaults to the labelled
    source named in the prepared manifest (pass it to read it once for many runs)."""
    model = load_trained_model(run_dir).to(device).eval()
    images = prepared.images("test")
    source = labelled_source(prepared) if source is None else source
    return score_run(prepared, source, lambda rows: predict_probabilities(model, images[rows], batch_size))


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


def health_checks(results: pd.DataFrame, per_volume: pd.DataFrame, *, flat_drop: float = 0.05,
                  lost_dice: float = 0.05) -> pd.DataFrame:
    """Symptoms of a model that did not learn, one row each: a training loss that fell by less than
    ``flat_drop`` (relative) from the first epoch to the last, and a structure whose mean test Dice is below
    ``lost_dice`` (the model never predicts it). An empty table means no run shows either."""
    rows = []
    for run in results.itertuples():
        first, last = getattr(run, "train_loss_first", np.nan), getattr(run, "train_loss_last", np.nan)
        if np.isfinite(first) and np.isfinite(last) and first > 0 and (first - last) / first < flat_drop:
            rows.append({"run": run.name, "problem": "flat training loss",
                         "detail": f"train loss {first:.3f} -> {last:.3f} over {run.epochs} epochs"})
    dice = per_volume.groupby(["run", "structure"])["dice"].mean()
    for (run, structure), value in dice.items():
        if value < lost_dice:
            rows.append({"run": run, "problem": f"{structure} not segmented",
                         "detail": f"mean test Dice {value:.3f} on the original grid"})
    return pd.DataFrame(rows, columns=["run", "problem", "detail"])
