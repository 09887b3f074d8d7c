"""Stage 04 logic: every run's selected model on the test split, scored as the study and as ACDC do.

- every volume is predicted as a new scan is (``cmr_utils.inference.predict_volume``): normalised, put on its
  inference canvas by the geometry stage 01 used (physical: the whole field at the training spacing, the heart
  located first where it is larger than the training window; pixel: the model grid), and predicted;
- the study's IoU (``cmr_utils.metrics.study_iou``), per slice and over the split, on the model's grid
  (the training window of that prediction against the prepared test labels, ``image_size`` px);
- per patient and phase (ED, ES), on each volume's ORIGINAL grid against its ORIGINAL labels, as the ACDC
  challenge does: the softmax probabilities are mapped back (``cmr_utils.geometry``'s ``to_native``),
  argmax'd, and compared with the label
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
from .geometry import canvas_window, geometry_for
from .inference import predict_volume
from .plans import Preprocessing
from .prepare import normalise_volume
from .readers import CardiacVolume, DataError, Source, open_source
from .training import predicts_in_bf16


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


def native_predictions(prepared, source: Source,
                       probabilities_of: Callable[[CardiacVolume, object], np.ndarray], split: str = "test"
                       ) -> Iterator[tuple[CardiacVolume, np.ndarray, np.ndarray, np.ndarray]]:
    """For each labelled volume of ``split``, one at a time: ``(volume, rows, model-grid labels, native labels)``.

    ``probabilities_of(volume, geometry)`` returns the class probabilities (Z, C, *geometry.canvas_shape) of the
    volume on its inference canvas (``cmr_utils.inference.predict_volume``), the geometry being the one stage 01
    used (``cmr_utils.geometry.geometry_for``). Their training window (``canvas_window``) is argmax'd on the model
    grid (the study's IoU, against the prepared labels of ``rows``); the whole canvas is mapped back to the
    volume's original grid and argmax'd there. ``volume`` is the source's ``CardiacVolume`` (original image,
    labels and spacing).
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
        if manifest.get("geometry") == "physical" and vol.spacing is None:
            raise DataError(f"{vol.path}: stage 01 prepared it in physical geometry ({manifest['target_spacing']} mm) "
                            "but it has no voxel spacing now (spacing.csv gone?); restore it, or rerun stage 01")
        geometry = geometry_for(manifest, h, w, vol.spacing)
        probabilities = np.asarray(probabilities_of(vol, geometry), dtype=np.float32)
        model_grid = canvas_window(probabilities, geometry.size).argmax(axis=1).astype(np.uint8)
        yield vol, rows, model_grid, geometry.labels_to_native(probabilities)
    missing = sorted(set(positions) - seen)
    if missing:
        raise DataError(f"{source.folder}: the prepared {split} volumes {missing[:4]} are not in the source; "
                        "rerun stage 01")


def score_run(prepared, source: Source, probabilities_of: Callable[[CardiacVolume, object], np.ndarray],
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
                 batch_size: int = 16, flips: bool = False, split: str = "test") -> dict:
    """Score one run's selected model on ``split`` (``score_run``); ``source`` defaults to the labelled source
    named in the prepared manifest (pass it to read it once for many runs); ``flips``: average the probabilities
    over flips (``predict_probabilities``, the profile's ``evaluate.test_time_flips``). The model predicts in bf16
    where it trained in bf16 and ``device`` runs bf16 natively (``training.predicts_in_bf16``)."""
    run_dir = Path(run_dir)
    model = load_trained_model(run_dir).to(device).eval()
    result = run_dir / "result.json"
    bf16 = predicts_in_bf16(json.loads(result.read_text()).get("precision") if result.is_file() else None, device)
    source = labelled_source(prepared) if source is None else source
    preprocessing = Preprocessing.from_manifest(prepared.manifest, str(prepared.folder / "manifest.json"))
    low, high = preprocessing.normalise_low, preprocessing.normalise_high  # as stage 01 normalised the slices
    return score_run(prepared, source, lambda vol, geometry: predict_volume(
        model, normalise_volume(vol.image, low, high), geometry, batch_size, flips, bf16), split)


def trained_runs(results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``read_results``' runs split into those that trained (status ``ok``, ``n_labelled`` an integer) and those
    that are unavailable (name, init, budget, seed, reason: e.g. ImageNet weights not cached)."""
    unavailable = results[results["status"] != "ok"].reindex(columns=["name", "init", "budget", "seed", "reason"])
    trained = results[results["status"] == "ok"].copy()
    trained["n_labelled"] = trained["n_labelled"].astype(int)
    return trained, unavailable


def evaluate_runs(results: pd.DataFrame, prepared, finetune_dir, *, device: str = "cpu",
                  flips: bool = False) -> dict[str, pd.DataFrame]:
    """Every trained run of ``results`` scored on the test split (``evaluate_run``; the labelled source read once).
    Returns stage 04's frames, each row keyed by run, init, budget and seed: ``runs`` (``results`` with
    ``test_iou_model_grid`` and ``test_dice_native``, the mean 3D Dice over RV, MYO and LV), ``per_slice`` (model
    grid), ``per_volume`` and ``ef`` (original grid)."""
    source = labelled_source(prepared)
    frames, iou = {"per_slice": [], "per_volume": [], "ef": []}, {}
    for run in results.itertuples():
        scored = evaluate_run(Path(finetune_dir(run.name)), prepared, source, device=device, flips=flips)
        iou[run.name] = scored["iou_model_grid"]
        for name, rows in frames.items():
            rows.append(scored[name].assign(run=run.name, init=run.init, budget=run.budget, seed=run.seed))
    frames = {name: pd.concat(rows, ignore_index=True) for name, rows in frames.items()}
    runs = results.assign(test_iou_model_grid=results["name"].map(iou),
                          test_dice_native=results["name"].map(frames["per_volume"].groupby("run")["dice"].mean()))
    return {"runs": runs, **frames}


# ---------------------------------------------------------------------------------------------- external data
def score_source(segment: Callable[[CardiacVolume], np.ndarray], source: Source) -> dict:
    """Every labelled volume of an external ``source`` segmented by ``segment`` (a ``CardiacVolume`` -> its label
    map on the volume's own grid, e.g. ``cmr_utils.predict_scans.TrainedRun.segment``) and scored as the test
    split is (``score_volume``, ``ef_table``): ``per_volume`` (with the layout's vendor and centre where it
    carries them) and ``ef``. Unlabelled volumes are skipped; a source without any is an error. The structures a
    volume's ``meta["unlabelled"]`` names (Sunnybrook: RV; MYO where a slice has no outer contour) are not scored."""
    rows, volumes, meta = [], [], {}
    for vol in source.volumes():
        if vol.label is None:
            continue
        scores, vols = score_volume(vol.patient, vol.phase, np.asarray(segment(vol), dtype=np.uint8), vol.label,
                                    vol.spacing)
        unlabelled = set(vol.meta.get("unlabelled", ()))  # e.g. Sunnybrook: no RV, no MYO at ES
        rows += [row for row in scores if row["structure"] not in unlabelled]
        volumes += [row for row in vols if row["structure"] not in unlabelled]
        meta[vol.patient] = {k: vol.meta.get(k) for k in ("vendor", "centre") if vol.meta.get(k) is not None}
    if not rows:
        raise DataError(f"{source.folder}: no labelled volume to score ({source.layout}); external validation needs "
                        "label files")
    per_volume = pd.DataFrame(rows)
    for column in sorted({k for m in meta.values() for k in m}):
        per_volume[column] = per_volume["patient"].map(lambda p: meta[p].get(column))
    return {"per_volume": per_volume, "ef": ef_table(pd.DataFrame(volumes))}


def external_validation(results: pd.DataFrame, sources: dict[str, Source], profile: str,
                        data: str | None, device: str = "cpu") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every run of ``results`` (its validation-selected model, with the preprocessing it was trained with:
    ``cmr_utils.predict_scans.open_run``) scored on every external ``source`` on each volume's own grid
    (``score_source``): ``(per_volume, ef)`` with the run keys and ``dataset``, ``layout`` columns."""
    from .params import load_profile
    from .predict_scans import open_run

    flips = load_profile(profile)["evaluate"]["test_time_flips"]  # as the internal test split is scored
    per_volume, ef = [], []
    for run in results.itertuples():
        trained = open_run(run.name, profile, data, device=device, flips=flips)
        keys = {"run": run.name, "init": run.init, "budget": run.budget, "seed": run.seed}
        for name, source in sources.items():
            scored = score_source(trained.segment, source)
            per_volume.append(scored["per_volume"].assign(dataset=name, layout=source.layout, **keys))
            ef.append(scored["ef"].assign(dataset=name, layout=source.layout, **keys))
    return pd.concat(per_volume, ignore_index=True), pd.concat(ef, ignore_index=True)


def external_tables(internal: pd.DataFrame, external: pd.DataFrame, *, n_boot: int = 2000,
                    seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cross-dataset table and the drop from the internal test split, both on the native grid.

    ``internal``: stage 04's ``per_volume`` (budget ``all``); ``external``: ``score_source``'s rows with
    ``dataset`` (and ``vendor`` where the layout says) and the run keys. The value is the 3D Dice of a patient
    and phase, mean over RV, MYO and LV. ``cross``: per initialisation, dataset (``internal test`` first) and
    vendor (``all`` plus each vendor), the mean Dice and its 95 % patient-level bootstrap interval
    (``cmr_utils.stats.bootstrap_mean_ci``). ``drop``: per initialisation and external dataset, external minus
    internal mean Dice with a 95 % interval from resampling the patients of both sets independently."""
    from . import stats

    keys = ["init", "seed", "patient", "phase"]
    inside = internal.groupby(keys)["dice"].mean().reset_index().assign(dataset="internal test", vendor="all")
    ext_keys = keys + ["dataset"] + (["vendor"] if "vendor" in external else [])
    outside = external.groupby(ext_keys, dropna=False)["dice"].mean().reset_index()
    outside["patient"] = outside["dataset"] + "/" + outside["patient"].astype(str)  # patients of different sets
    by_vendor = outside[outside["vendor"].notna()] if "vendor" in outside else outside.iloc[:0]
    frames = [inside, outside.assign(vendor="all"), by_vendor]
    cross = stats.bootstrap_mean_ci(pd.concat(frames, ignore_index=True), "dice", by=["init", "dataset", "vendor"],
                                    n_boot=n_boot, seed=seed)
    order = {"internal test": 0}
    cross = cross.sort_values(["init", "dataset", "vendor"], key=lambda c: c.map(order).fillna(1)
                              if c.name == "dataset" else c).reset_index(drop=True)

    rows = []
    for (init, dataset), ext in outside.groupby(["init", "dataset"]):
        inn = inside[inside["init"] == init]
        a, b = _patient_means(inn, n_boot, seed), _patient_means(ext, n_boot, seed + 1)
        diff = b[1] - a[1]
        low, high = np.percentile(diff, [2.5, 97.5]) if np.isfinite(diff).all() else (np.nan, np.nan)
        rows.append({"init": init, "dataset": dataset, "internal_dice": a[0], "external_dice": b[0],
                     "drop": b[0] - a[0], "ci_low": low, "ci_high": high,
                     "n_internal_patients": inn["patient"].nunique(), "n_external_patients": ext["patient"].nunique()})
    drop = pd.DataFrame(rows, columns=["init", "dataset", "internal_dice", "external_dice", "drop", "ci_low",
                                       "ci_high", "n_internal_patients", "n_external_patients"])
    return cross, drop


def _patient_means(df: pd.DataFrame, n_boot: int, seed: int) -> tuple[float, np.ndarray]:
    """The mean of ``dice`` over rows and ``n_boot`` patient-level bootstrap resamples of it (NaN with fewer than
    two patients): the same resampling as ``cmr_utils.stats.bootstrap_mean_ci``."""
    finite = df[np.isfinite(df["dice"].to_numpy(dtype=np.float64))]
    per = finite.groupby("patient")["dice"].agg(["sum", "count"])
    sums, counts = per["sum"].to_numpy(np.float64), per["count"].to_numpy(np.float64)
    mean = float(sums.sum() / counts.sum()) if counts.sum() else np.nan
    if len(sums) < 2:
        return mean, np.full(n_boot, np.nan)
    from .stats import _cluster_bootstrap  # the resampling of bootstrap_mean_ci, kept as draws for a difference

    return mean, _cluster_bootstrap(sums, counts, n_boot, seed)


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


def reference_budget(results: pd.DataFrame) -> str:
    """The budget that the per-initialisation tables and figures describe (the study's table, validation curves,
    ACDC's metrics, ejection fraction, the framing test, explanations): ``all`` where the sweep has it, else the
    budget of most labelled slices among runs whose encoder trained (a low-label profile has no ``all`` runs)."""
    budgets = results["budget"].astype(str)
    if (budgets == "all").any() or results.empty:
        return "all"
    ok = results[results.get("status", "ok") == "ok"] if "status" in results else results
    trained = ok[~ok["frozen_encoder"].astype(bool)] if "frozen_encoder" in ok else ok
    pool = trained if not trained.empty else ok
    return str(pool.loc[pool["n_labelled"].astype(float).idxmax(), "budget"])
