"""Segment new scans with a trained run: label maps as NIfTI on each input's own grid, and volumes.

``predict_folder(run, input, output)`` (``make predict RUN=... INPUT=... OUTPUT=...``, or
``python -m cmr_utils.predict_command``) reads every scan of ``input`` in any layout of ``cmr_utils.readers``,
applies exactly the run's preprocessing, predicts, maps the prediction back to the scan's original grid and
writes into ``output``:

- ``<case>_pred.nii.gz``: one per input file, with the input's shape, affine and header (data type uint8),
  labels in ACDC's convention (0 background, 1 RV, 2 MYO, 3 LV), so that it overlays the input in ITK-SNAP and
  3D Slicer. A 4D cine gives ONE 4D mask (X, Y, Z, T), every frame segmented. A DICOM series gets the affine of
  its headers (``cmr_utils.readers.dicom``); another non-NIfTI input gets a diagonal affine of its voxel spacing;
  one without spacing (LA2018's HDF5, ACDC's without its ``spacing.csv``) gets an identity affine (unit spacing)
  and a warning says so;
- ``volumes.csv``: per case and phase (or cine frame), the LV, RV and myocardial volumes (mL; pixels where
  the source has no spacing: column ``volume_unit``), the myocardial mass (g, at 1.05 g/mL) and the LV and
  RV ejection fractions (%) on the ED and ES rows, ``ed_es_from``: how ED and ES were found (``headers``: the
  input names them — ACDC's Info.cfg, M&Ms' CSV, Sunnybrook's contoured frames, file names; ``lv_volume``: a
  cine whose input does not, where ED is the frame of largest and ES of smallest predicted LV volume, and their
  rows' phase becomes ED and ES; ``none``: neither, no EF), ``check``: "ok", or the findings of ``cmr_utils.plausibility`` on the frame
  (no heart, no LV cavity, a heart or LV cavity too small...) joined by "; ", and ``quality``, per case: "ok" or
  "warning: <reasons>" — the frames that failed ``check``, and a patient's LV EDV, LV EF and myocardial mass at
  ED outside the physiological ranges of ``plausibility.PHYSIOLOGICAL_RANGES``;
- with ``dicom_seg`` (``make predict DICOM_SEG=1``; DICOM input only): ``<case>_seg[_Fnn].dcm``, DICOM
  Segmentation objects that reference the source images (``cmr_utils.dicom_seg``).

A prediction that missed the heart is written (exit code 0) but never silently: its ``check`` and ``quality``
say so, a line ``predict: WARNING <case> <phase>: <findings>`` (per frame) or ``predict: WARNING <case>:
<findings>`` (per patient) goes to stderr even with ``progress=False`` (which silences progress only), and the
summary line counts the flagged frames and cases.

**The run folder alone predicts.** Stage 03 wrote everything the model needs into the run's ``plans.json``
(``cmr_utils.plans``): stage 01's preprocessing (``cmr_utils.geometry``: physical geometry — resampled to
``target_spacing`` mm, so a scan of any pixel size or framing is seen at the training scale, padded, the heart
located first in a wider field — or, without spacing, pixel geometry: ``resize``, ``field_of_view``,
``image_size``; each volume normalised to [0, 1] between the intensity percentiles stage 01 recorded), the
test-time flips, the label map and the model's build arguments. ``RUN=`` is a run name of the workspace of
``PROFILE=`` and ``DATA=``, or the path of a run folder (a copy on a machine without the workspace works the
same). A run trained before runs carried ``plans.json`` is an error that says to retrain it.
Each cine frame is normalised on its own, as a labelled volume was in training.

Every scan is read and checked before the first prediction (a broken file sorted last fails before anything is
predicted; scans are read again to predict, one at a time, so memory holds one scan). Nothing is written until
every scan is predicted: the outputs are made in a temporary sibling folder and swapped in at the end, so a
failure or an interrupt leaves no partial output, and no folder the run created (OUTPUT's parents included). OUTPUT must not lie inside INPUT (nothing the
user gave is ever modified), and an existing OUTPUT is replaced only if it holds the outputs of an earlier
prediction and nothing else.
"""
from __future__ import annotations

import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .files import AtomicDir
from .plans import Preprocessing, read_plans
from .readers import CardiacVolume, DataError, Scan, open_source

MYOCARDIAL_DENSITY = 1.05  # g/mL, the usual constant for myocardial mass
VOLUME_COLUMNS = ["case", "patient", "phase", "frame", "volume_unit", "lv_volume", "rv_volume", "myo_volume",
                  "myo_mass_g", "lv_ef", "rv_ef", "ed_es_from", "check",  # check: "ok" or the frame's findings
                  "quality"]  # per case: "ok" or "warning: <reasons>"
PREDICTION_FILE = re.compile(r".+_pred\.nii\.gz|.+_seg(_F\d+)?\.dcm|volumes\.csv")  # what a prediction writes


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class TrainedRun:
    """A run's selected model with the preprocessing it was trained with; ``segment`` maps a volume (any
    shape, any intensity range) to its label map on the volume's own grid."""

    name: str
    folder: Path
    model: object
    preprocessing: Preprocessing
    batch_size: int = 16
    flips: bool = False  # test-time flips (the run's plans: the profile's evaluate.test_time_flips when it trained)
    bf16: bool = False  # bf16 autocast (trained in bf16 and the device runs it natively: training.predicts_in_bf16)

    def probabilities(self, vol: CardiacVolume) -> np.ndarray:
        """Softmax probabilities (Z, C, h, w) on the volume's original grid."""
        from .inference import predict_volume

        image, geometry = self.preprocessing.to_model(vol)
        return geometry.to_native(predict_volume(self.model, image, geometry, self.batch_size, self.flips, self.bf16))

    def segment(self, vol: CardiacVolume) -> np.ndarray:
        return self.probabilities(vol).argmax(axis=1).astype(np.uint8)


def open_run(run: str | Path, profile: str = "default", data: str | None = "", *, device: str = "cpu",
             batch_size: int = 16, flips: bool | None = None) -> TrainedRun:
    """A trained run, ready to segment: ``run`` is the path of a run folder (a copy anywhere predicts the same), or
    a run name (``{init}-{budget}-s{seed}``) of the workspace of ``profile`` and ``data``
    (``cmr_utils.paths.run_folder``).

    Everything comes from the folder's ``plans.json`` and ``model.pt`` (``cmr_utils.plans``): the preprocessing,
    the label map, the model's build arguments, test-time flips (``flips`` overrides them: stage 04 passes its
    profile's) and bf16 where the run trained in bf16 and ``device`` runs it natively, as stage 04 scores them. A run
    that does not exist, did not train (status not ok) or was trained before runs carried their plans is an error
    that says which (retrain it)."""
    from .finetune import load_trained_model
    from .paths import run_folder
    from .training import predicts_in_bf16

    run_dir = run_folder(run, profile, data)
    plans = read_plans(run_dir)
    model = load_trained_model(run_dir, plans["model"]["n_classes"]).to(device).eval()
    flips = plans["predict"]["test_time_flips"] if flips is None else flips
    return TrainedRun(run_dir.name, run_dir, model, Preprocessing(**plans["preprocessing"]), batch_size, bool(flips),
                      predicts_in_bf16(plans["training"].get("precision"), device))


# ---------------------------------------------------------------------------------------------- writing
def label_image(labels: np.ndarray, scan: Scan):
    """A NIfTI image of ``labels`` (T, Z, Y, X) on ``scan``'s grid: the input's affine and header (uint8, no
    intensity scaling), 4D for a cine, 3D otherwise; where the input is not NIfTI, the affine its reader found
    (``meta["affine"]``: DICOM's, from the headers), else a diagonal affine of its voxel spacing (identity without
    one)."""
    import nibabel as nib

    data = np.ascontiguousarray(np.transpose(labels, (3, 2, 1, 0)) if scan.cine else labels[0].T, dtype=np.uint8)
    if not scan.nifti:
        spacing, affine = scan.frames[0].spacing, scan.frames[0].meta.get("affine")
        if affine is None:
            affine = np.diag([*((1.0, 1.0, 1.0) if spacing is None else spacing[::-1]), 1.0])
        image = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
        image.header.set_xyzt_units("mm")
    else:
        ref = nib.load(str(scan.path))
        if tuple(ref.shape) != data.shape:
            raise DataError(f"{scan.path}: prediction of shape {data.shape} does not match the image {ref.shape}")
        header = ref.header.copy()
        header.set_data_dtype(np.uint8)
        image = type(ref)(data, ref.affine, header)
        image.set_qform(ref.get_qform(), code=int(ref.header["qform_code"]))
        image.set_sform(ref.get_sform(), code=int(ref.header["sform_code"]))
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, 3
    image.header["descrip"] = b"labels 1 RV 2 MYO 3 LV (ACDC)"
    return image


def volume_rows(scan: Scan, predictions: list[np.ndarray]) -> list[dict]:
    """One row per frame of ``scan``: LV, RV and myocardial volumes (mL, or pixels without spacing), mass, and
    ``check``: "ok", or what ``cmr_utils.plausibility.check_prediction`` finds implausible, joined by "; "."""
    from . import metrics
    from .plausibility import check_prediction

    rows = []
    for vol, pred in zip(scan.frames, predictions):
        ml = vol.spacing is not None
        v = {name: metrics.structure_volume(pred, k, vol.spacing) for k, name in metrics.STRUCTURES.items()}
        rows.append({"case": scan.case, "patient": vol.patient, "phase": vol.phase, "frame": vol.frame,
                     "volume_unit": "mL" if ml else "px", "lv_volume": v["LV"], "rv_volume": v["RV"],
                     "myo_volume": v["MYO"], "myo_mass_g": v["MYO"] * MYOCARDIAL_DENSITY if ml else np.nan,
                     "check": "; ".join(check_prediction(pred, vol.spacing)) or "ok",
                     **{k: val for k, val in vol.meta.items() if isinstance(val, (str, int, float))}})
    return rows


def volumes_table(rows: list[dict]) -> pd.DataFrame:
    """The rows of ``volume_rows`` with ED and ES and the LV and RV ejection fractions (%) on their rows, in the
    order of ``VOLUME_COLUMNS``, then what the layout adds (vendor, centre...).

    ED and ES: a patient's one ED and one ES row where the input names them (``ed_es_from`` "headers"); else, in
    each cine case of the patient (several frames, none named ED or ES), the frames of largest and smallest LV
    volume, renamed ED and ES ("lv_volume"; none where every frame has the same LV volume). EF is NaN where the
    ED volume is 0. ``quality`` is filled by ``quality_flags``."""
    from .metrics import ejection_fraction

    table = pd.DataFrame(rows)
    table["lv_ef"], table["rv_ef"], table["ed_es_from"], table["quality"] = np.nan, np.nan, "none", ""
    pairs = []  # (rows of the pair's unit, ED row, ES row, how found)
    for _, group in table.groupby("patient", sort=False):
        ed, es = group[group["phase"] == "ED"], group[group["phase"] == "ES"]
        if len(ed) == 1 and len(es) == 1:
            pairs.append((group.index, ed.index[0], es.index[0], "headers"))
            continue
        for _, case in group.groupby("case", sort=False):
            if len(case) < 2 or case["frame"].isna().any() or case["phase"].isin(["ED", "ES"]).any():
                continue
            ed_row, es_row = case["lv_volume"].idxmax(), case["lv_volume"].idxmin()
            if case["lv_volume"].loc[ed_row] > case["lv_volume"].loc[es_row]:
                table.loc[[ed_row, es_row], "phase"] = ["ED", "ES"]
                pairs.append((case.index, ed_row, es_row, "lv_volume"))
    for unit, ed_row, es_row, how in pairs:
        table.loc[unit, "ed_es_from"] = how
        for structure in ("lv", "rv"):
            edv, esv = float(table.loc[ed_row, f"{structure}_volume"]), float(table.loc[es_row, f"{structure}_volume"])
            table.loc[[ed_row, es_row], f"{structure}_ef"] = ejection_fraction(edv, esv) if edv > 0 else np.nan
    extra = [c for c in table.columns if c not in VOLUME_COLUMNS]
    return table[VOLUME_COLUMNS + extra]


def quality_flags(table: pd.DataFrame) -> dict[str, list[str]]:
    """Fill ``table``'s ``quality`` per case; return ``{patient: findings}`` of the patients whose values lie
    outside the physiological ranges (the frames' findings are in ``check`` already).

    A case is flagged for its frames that failed ``check`` (the finding itself for a single frame, a count for a
    cine) and for its patient's LV EDV, LV EF and myocardial mass at ED outside the physiological ranges
    (``plausibility.check_function``; volumes and mass only in mL)."""
    from .plausibility import check_function

    physiology = {}  # patient -> findings on its ED / ES pair
    for patient, group in table.groupby("patient", sort=False):
        ed = group[group["phase"] == "ED"]
        if len(ed) != 1 or group["ed_es_from"].iloc[0] == "none":
            continue
        row = ed.iloc[0]
        ml = row["volume_unit"] == "mL"
        physiology[patient] = check_function(row["lv_volume"] if ml else None, row["lv_ef"],
                                             row["myo_mass_g"] if ml else None)
    for _, group in table.groupby("case", sort=False):
        bad = group[group["check"] != "ok"]
        findings = []
        if len(group) == 1 and len(bad):
            findings.append(bad["check"].iloc[0])
        elif len(bad):
            findings.append(f"{len(bad)} of {len(group)} frames implausible (column check; first: "
                            f"{bad['phase'].iloc[0]}, {bad['check'].iloc[0].split('; ')[0]})")
        findings += physiology.get(group["patient"].iloc[0], [])
        table.loc[group.index, "quality"] = "warning: " + "; ".join(findings) if findings else "ok"
    return {patient: findings for patient, findings in physiology.items() if findings}


def check_inputs(source, patients: list[str], *, dicom_seg: bool = False) -> int:
    """Read every scan of ``source`` once, before anything is predicted: the readers' errors name the file (a
    truncated DICOM, two orientations in a series, a NIfTI of the wrong shape...); two scans with one case name,
    a cine whose frames differ in shape, and (``dicom_seg``) a series without the headers a DICOM-SEG needs are
    errors too. Returns the number of scans."""
    from .dicom_seg import check_scan

    cases: dict[str, Path] = {}
    for scan in source.scans(patients):
        if not scan.frames:
            raise DataError(f"{scan.path}: no image to predict")
        shapes = sorted({vol.image.shape for vol in scan.frames})
        if len(shapes) > 1:
            raise DataError(f"{scan.path}: frames of different shapes {shapes} in one scan")
        if scan.case in cases:
            raise DataError(f"{scan.path} and {cases[scan.case]}: two scans named {scan.case}; their outputs "
                            f"({scan.case}_pred.nii.gz) would overwrite each other: rename one")
        cases[scan.case] = scan.path
        if dicom_seg:
            check_scan(scan)
    if not cases:
        raise DataError(f"{source.folder}: no scan to predict")
    return len(cases)


def _check_output(input_dir: Path, output_dir: Path) -> None:
    inp, out = input_dir.resolve(), output_dir.resolve()
    if out == inp or inp in out.parents:
        raise ValueError(f"OUTPUT {output_dir} lies inside INPUT {input_dir}; the input is never written to: "
                         "choose a folder outside it")
    if out in inp.parents:
        raise ValueError(f"OUTPUT {output_dir} contains INPUT {input_dir}; choose a separate folder")
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"OUTPUT {output_dir} is a file; expected a folder")
        others = sorted(p.name for p in out.iterdir() if not PREDICTION_FILE.fullmatch(p.name))
        if others:
            raise ValueError(f"OUTPUT {output_dir} exists and holds other files ({others[:5]}); it is replaced "
                             "only when it holds an earlier prediction (volumes.csv, *_pred.nii.gz, *_seg*.dcm): "
                             "choose a new or empty folder")


def _require_dicom(folder: Path, layout: str, dicom_seg: bool) -> None:
    if dicom_seg and layout != "dicom":
        raise ValueError(f"--dicom-seg (DICOM_SEG=1): INPUT {folder} is in the {layout} layout; a DICOM "
                         "Segmentation references DICOM source images, so it is written for DICOM input only "
                         "(drop DICOM_SEG=1 for NIfTI masks)")


def predict_folder(segment: Callable[[CardiacVolume], np.ndarray] | TrainedRun, input_dir, output_dir, *,
                   label_map: dict | str | None = None, progress: bool = True,
                   dicom_seg: bool = False) -> pd.DataFrame:
    """Segment every scan of ``input_dir`` (any supported layout) into ``output_dir``; return volumes.csv's table.

    ``segment``: a ``TrainedRun`` (``open_run``), or any function from a ``CardiacVolume`` to its label map
    (Z, H, W) on the volume's grid in ACDC's labels. ``label_map``: for a nifti-pairs folder whose label files
    use other values (see ``cmr_utils.readers.NiftiPairs``). ``dicom_seg``: also write DICOM-SEG (DICOM input
    only; an error before anything is read otherwise).

    Every scan is read and checked (``check_inputs``) before the first prediction. A frame whose prediction is
    implausible (``cmr_utils.plausibility``: no heart, no LV cavity, a heart or LV cavity too small) and a patient
    whose LV EDV, EF or myocardial mass lies outside the physiological ranges are written all the same, ``check``
    and ``quality`` say why, and a ``predict: WARNING`` line goes to stderr whatever ``progress`` says:
    ``progress=False`` silences progress, not warnings."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    _check_output(input_dir, output_dir)
    source = open_source(input_dir, label_map=label_map)
    _require_dicom(source.folder, source.layout, dicom_seg)
    segment_fn = segment.segment if isinstance(segment, TrainedRun) else segment
    algorithm = segment.name if isinstance(segment, TrainedRun) else getattr(segment, "__name__", "segmenter")
    patients = source.patients()
    if not source.has_spacing:
        warnings.warn(f"{source.folder}: the {source.layout} layout records no voxel spacing; the predicted "
                      "NIfTI files get unit spacing (an identity affine) and volumes.csv counts pixels",
                      stacklevel=2)
    started = time.time()
    n_scans = check_inputs(source, patients, dicom_seg=dicom_seg)
    if progress:
        print(f"predict: {n_scans} scan(s) of {input_dir} ({source.layout}) read and checked in "
              f"{time.time() - started:.1f} s", file=sys.stderr, flush=True)
    staging = AtomicDir(output_dir)
    try:
        rows, n, flagged = [], 0, 0
        for scan in source.scans(patients):
            n += 1
            started = time.time()
            predictions = []
            for vol in scan.frames:
                pred = np.asarray(segment_fn(vol), dtype=np.uint8)
                if pred.shape != vol.image.shape:
                    raise ValueError(f"{scan.path}: the segmenter returned shape {pred.shape} for an image of "
                                     f"shape {vol.image.shape}")
                predictions.append(pred)
            label_image(np.stack(predictions), scan).to_filename(str(staging.path / f"{scan.case}_pred.nii.gz"))
            if dicom_seg:
                from . import __version__
                from .dicom_seg import write_segmentations

                write_segmentations(scan, np.stack(predictions), staging.path, algorithm, __version__)
            scan_rows = volume_rows(scan, predictions)
            for row in scan_rows:
                if row["check"] != "ok":
                    flagged += 1
                    print(f"predict: WARNING {scan.case} {row['phase']}: {row['check']}", file=sys.stderr, flush=True)
            rows += scan_rows
            if progress:
                print(f"predict: [{n}/{n_scans}] {scan.case}: {len(scan.frames)} frame(s) of "
                      f"{scan.frames[0].image.shape} in {time.time() - started:.1f} s", file=sys.stderr, flush=True)
        table = volumes_table(rows)
        for patient, findings in quality_flags(table).items():
            print(f"predict: WARNING {patient}: {'; '.join(findings)}", file=sys.stderr, flush=True)
        cases = table.loc[table["quality"] != "ok", "case"].unique()
        table.to_csv(staging.path / "volumes.csv", index=False)
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    if progress:
        print(f"predict: {n} scan(s) of {input_dir} ({source.layout}) -> {output_dir}; "
              + (f"{flagged} of {len(table)} frame(s) flagged implausible, {len(cases)} of {n} case(s) with quality "
                 "warnings (WARNING lines above, columns check and quality of volumes.csv)" if len(cases) else f"all {len(table)} frame(s) pass the plausibility check"),
              file=sys.stderr)
    return table


def predict_run(run: str, input_dir, output_dir, *, profile: str = "default", data: str | None = "",
                label_map: dict | str | None = None, device: str = "cpu", batch_size: int = 16,
                progress: bool = True, dicom_seg: bool = False) -> pd.DataFrame:
    """``make predict``: ``open_run`` then ``predict_folder``; usable from a notebook."""
    from .readers import locate_layout

    _check_output(Path(input_dir), Path(output_dir))  # before loading anything
    if dicom_seg:
        _require_dicom(*locate_layout(input_dir), dicom_seg)
    trained = open_run(run, profile, data, device=device, batch_size=batch_size)
    return predict_folder(trained, input_dir, output_dir, label_map=label_map, progress=progress,
                          dicom_seg=dicom_seg)

