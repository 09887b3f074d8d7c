"""Write a labelled ACDC-layout source in the other NIfTI layouts (``nifti-pairs``, ``mnms``), headers kept.

Used to hold the same scans in every layout a reader supports: the tests' round trips and the external-
validation measurements on the phantom (``cmr_utils.phantom`` writes it in the official ACDC layout).
The source is only read; ``folder`` must be new or empty.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np

from .readers import AcdcNifti, DataError, MnMs

_ACDC_TO_MNMS = {v: k for k, v in MnMs.label_map.items()}  # ACDC 1 RV, 3 LV -> M&Ms 3 RV, 1 LV


def _new_folder(folder) -> Path:
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder}: expected a new or empty folder to write into")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _frame_paths(source: AcdcNifti, patient: str, phase: str) -> tuple[Path, Path]:
    stem = source.folder / patient / f"{patient}_frame{int(source.info(patient)[phase]):02d}"
    return stem.with_name(stem.name + ".nii.gz"), stem.with_name(stem.name + "_gt.nii.gz")


def to_nifti_pairs(source: AcdcNifti, folder) -> Path:
    """``<patient>_ED.nii.gz`` / ``<patient>_ES.nii.gz`` with ``_gt`` beside each: the ED and ES files as they are."""
    folder = _new_folder(folder)
    for patient in source.patients():
        for phase in ("ED", "ES"):
            image, label = _frame_paths(source, patient, phase)
            shutil.copyfile(image, folder / f"{patient}_{phase}.nii.gz")
            shutil.copyfile(label, folder / f"{patient}_{phase}_gt.nii.gz")
    return folder


def to_mnms(source: AcdcNifti, folder, vendors: tuple[str, ...] = ("A", "B")) -> Path:
    """The M&Ms release layout: ``<code>/<code>_sa.nii.gz`` (the 4D cine), ``<code>_sa_gt.nii.gz`` (4D, ED and
    ES labelled in M&Ms' values 1 LV, 2 MYO, 3 RV) and ``info.csv`` (External code, VendorName, Vendor, Centre,
    ED, ES counted from 0). Patients cycle through ``vendors``; each vendor is its own centre."""
    import nibabel as nib

    folder = _new_folder(folder)
    lookup = np.zeros(4, np.uint8)
    for acdc, mnms in _ACDC_TO_MNMS.items():
        lookup[acdc] = mnms
    rows = []
    for n, patient in enumerate(source.patients()):
        cine = source.folder / patient / f"{patient}_4d.nii.gz"
        code = f"M{n + 1:03d}"
        (folder / code).mkdir()
        shutil.copyfile(cine, folder / code / f"{code}_sa.nii.gz")
        img = nib.load(str(cine))
        gt = np.zeros(img.shape, np.uint8)
        info = source.info(patient)
        for phase in ("ED", "ES"):
            _, label = _frame_paths(source, patient, phase)
            gt[..., int(info[phase]) - 1] = lookup[np.asanyarray(nib.load(str(label)).dataobj).astype(np.int64)]
        out = nib.Nifti1Image(gt, img.affine, img.header.copy())
        out.header.set_data_dtype(np.uint8)
        out.header.set_slope_inter(1.0, 0.0)
        out.to_filename(str(folder / code / f"{code}_sa_gt.nii.gz"))
        vendor = vendors[n % len(vendors)]
        rows.append({"External code": code, "VendorName": f"Vendor {vendor}", "Vendor": vendor,
                     "Centre": str(n % len(vendors) + 1), "ED": int(info["ED"]) - 1, "ES": int(info["ES"]) - 1})
    with open(folder / "info.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder
