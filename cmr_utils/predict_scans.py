"""Segment new scans with a trained run: label maps as NIfTI on each input's own grid, and volumes.

``predict_folder(run, input, output)`` (``make predict RUN=... INPUT=... OUTPUT=...``, or
``python -m cmr_utils.predict_scans``) reads every scan of ``input`` in any layout of ``cmr_utils.readers``,
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
  RV ejection fractions (%) on the ED and ES rows where both phases are known, and ``check``: "ok", or the
  findings of ``cmr_utils.plausibility`` (no heart, no LV cavity, a heart too small...) joined by "; ".

A prediction that missed the heart is written (exit code 0) but never silently: its ``check`` says so, a line
``predict: WARNING <case> <phase>: <findings>`` goes to stderr even with ``progress=False`` (which silences
progress only), and the summary line counts the flagged frames.

**The run folder alone predicts.** Stage 03 wrote everything the model needs into the run's ``plans.json``
(``cmr_utils.plans``): stage 01's preprocessing (``cmr_utils.geometry``: physical geometry — resampled to
``target_spacing`` mm, so a scan of any pixel size or framing is seen at the training scale, padded, the heart
located first in a wider field — or, without spacing, pixel geometry: ``resize``, ``field_of_view``,
``image_size``; each volume normalised to [0, 1] between the intensity percentiles stage 01 recorded), the
test-time flips, the label map and the model's build arguments. ``RUN=`` is a run name of the workspace of
``PROFILE=`` and ``DATA=``, or the path of a run folder (a copy on a machine without the workspace works the
same). A run trained before runs carried ``plans.json`` is an error that says to retrain it.
Each cine frame is normalised on its own, as a labelled volume was in training.

Nothing is written until every scan is predicted: the outputs are made in a temporary sibling folder and
swapped in at the end, so a failure leaves no partial output. OUTPUT must not lie inside INPUT (nothing the
user gave is ever modified), and an existing OUTPUT is replaced only if it holds the outputs of an earlier
prediction and nothing else.
"""
from __future__ import annotations

import argparse
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
                  "myo_mass_g", "lv_ef", "rv_ef", "check"]  # check: "ok" or the plausibility findings


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
    """The rows of ``volume_rows`` with LV and RV ejection fractions (%) on a patient's ED and ES rows where it
    has exactly one of each (NaN where the ED volume is 0), in the order of ``VOLUME_COLUMNS`` (``check``
    last), then what the layout adds (vendor, centre...)."""
    from .metrics import ejection_fraction

    table = pd.DataFrame(rows)
    table["lv_ef"], table["rv_ef"] = np.nan, np.nan
    for _, group in table.groupby("patient", sort=False):
        ed, es = group[group["phase"] == "ED"], group[group["phase"] == "ES"]
        if len(ed) != 1 or len(es) != 1:
            continue
        for structure in ("lv", "rv"):
            edv, esv = float(ed[f"{structure}_volume"].iloc[0]), float(es[f"{structure}_volume"].iloc[0])
            table.loc[[ed.index[0], es.index[0]], f"{structure}_ef"] = \
                ejection_fraction(edv, esv) if edv > 0 else np.nan
    extra = [c for c in table.columns if c not in VOLUME_COLUMNS]
    return table[VOLUME_COLUMNS + extra]


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
        others = sorted(p.name for p in out.iterdir()
                        if p.name != "volumes.csv" and not p.name.endswith("_pred.nii.gz"))
        if others:
            raise ValueError(f"OUTPUT {output_dir} exists and holds other files ({others[:5]}); it is replaced "
                             "only when it holds an earlier prediction (volumes.csv, *_pred.nii.gz): choose a "
                             "new or empty folder")


def predict_folder(segment: Callable[[CardiacVolume], np.ndarray] | TrainedRun, input_dir, output_dir, *,
                   label_map: dict | str | None = None, progress: bool = True) -> pd.DataFrame:
    """Segment every scan of ``input_dir`` (any supported layout) into ``output_dir``; return volumes.csv's table.

    ``segment``: a ``TrainedRun`` (``open_run``), or any function from a ``CardiacVolume`` to its label map
    (Z, H, W) on the volume's grid in ACDC's labels. ``label_map``: for a nifti-pairs folder whose label files
    use other values (see ``cmr_utils.readers.NiftiPairs``).

    A frame whose prediction is implausible (``cmr_utils.plausibility``: no heart, no LV cavity, a heart too
    small) is written all the same, its ``check`` says why, and a line ``predict: WARNING <case> <phase>:
    <findings>`` goes to stderr whatever ``progress`` says: ``progress=False`` silences progress, not warnings."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    _check_output(input_dir, output_dir)
    source = open_source(input_dir, label_map=label_map)
    segment_fn = segment.segment if isinstance(segment, TrainedRun) else segment
    patients = source.patients()
    if not source.has_spacing:
        warnings.warn(f"{source.folder}: the {source.layout} layout records no voxel spacing; the predicted "
                      "NIfTI files get unit spacing (an identity affine) and volumes.csv counts pixels",
                      stacklevel=2)
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
            scan_rows = volume_rows(scan, predictions)
            for row in scan_rows:
                if row["check"] != "ok":
                    flagged += 1
                    print(f"predict: WARNING {scan.case} {row['phase']}: {row['check']}", file=sys.stderr, flush=True)
            rows += scan_rows
            if progress:
                print(f"predict: [{n}] {scan.case}: {len(scan.frames)} frame(s) of {scan.frames[0].image.shape} "
                      f"in {time.time() - started:.1f} s", file=sys.stderr, flush=True)
        if not rows:
            raise DataError(f"{input_dir}: no scan to predict")
        table = volumes_table(rows)
        table.to_csv(staging.path / "volumes.csv", index=False)
        staging.commit()
    except BaseException:
        staging.abort()
        raise
    if progress:
        print(f"predict: {n} scan(s) of {input_dir} ({source.layout}) -> {output_dir}; "
              + (f"{flagged} of {len(table)} frame(s) flagged implausible (WARNING lines above, column check of "
                 "volumes.csv)" if flagged else f"all {len(table)} frame(s) pass the plausibility check"),
              file=sys.stderr)
    return table


def predict_run(run: str, input_dir, output_dir, *, profile: str = "default", data: str | None = "",
                label_map: dict | str | None = None, device: str = "cpu", batch_size: int = 16,
                progress: bool = True) -> pd.DataFrame:
    """``make predict``: ``open_run`` then ``predict_folder``; usable from a notebook."""
    _check_output(Path(input_dir), Path(output_dir))  # before loading anything
    trained = open_run(run, profile, data, device=device, batch_size=batch_size)
    return predict_folder(trained, input_dir, output_dir, label_map=label_map, progress=progress)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True,
                        help="a run folder (its path), or a run name of PROFILE and DATA, e.g. random-all-s0")
    parser.add_argument("--input", required=True, help="folder of scans in a supported layout")
    parser.add_argument("--output", required=True, help="folder for <case>_pred.nii.gz and volumes.csv")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--data", default="", help="the DATA= the run was trained on (empty: the phantom)")
    parser.add_argument("--label-map", default=None, help="nifti-pairs label values -> ACDC's, e.g. 1:3,2:2,3:1")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, or auto: the GPU where there is one and the run's profile allows it")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    for name in ("run", "input", "output"):
        if not getattr(args, name).strip():
            print(f"error: {name.upper()}= is empty; usage: make predict RUN=<run folder or name> "
                  "INPUT=<folder> OUTPUT=<folder>", file=sys.stderr)
            return 2
    try:
        from .params import load_profile
        from .training import inference_device

        device = args.device
        if device == "auto":  # the GPU where there is one and the profile's trainer.accelerator allows it
            device = inference_device(load_profile(args.profile)["trainer"]["accelerator"])
        predict_run(args.run, args.input, args.output, profile=args.profile, data=args.data,
                    label_map=args.label_map, batch_size=args.batch_size, device=device)
    except (ValueError, FileNotFoundError) as err:  # DataError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
