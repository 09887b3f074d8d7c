"""The M&Ms challenge release (``mnms``): 4D short-axis cines, ED / ES labels remapped to ACDC's, and the
release's information CSV (ED, ES, vendor, centre)."""
from __future__ import annotations

import csv
from functools import cached_property
from pathlib import Path

from .base import ACDC_LABELS, DataError, Scan, Source, _cine_volumes, _load_nifti, _nifti_stem


class MnMs(Source):
    layout = "mnms"
    description = ("M&Ms challenge release: <code>/<code>_sa.nii.gz (4D cine), <code>/<code>_sa_gt.nii.gz (ED and ES "
                   "labelled 1 LV, 2 MYO, 3 RV), the release's CSV (External code, VendorName, Vendor, Centre, ED, ES)")
    labels = ACDC_LABELS
    has_spacing = True
    label_map = {1: 3, 2: 2, 3: 1}  # M&Ms 1 LV, 2 MYO, 3 RV -> ACDC 3 LV, 2 MYO, 1 RV

    @classmethod
    def matches(cls, folder):
        return any(p.is_dir() and (p / f"{p.name}_sa.nii.gz").is_file() for p in folder.iterdir())

    def patients(self):
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and (p / f"{p.name}_sa.nii.gz").is_file())

    @cached_property
    def info_csv(self) -> Path | None:
        """The release's information CSV: the first ``*.csv`` with an ``External code`` column in the folder or
        up to two folders above it (the release keeps it beside ``Training/``, ``Validation/``, ``Testing/``)."""
        for folder in (self.folder, self.folder.parent, self.folder.parent.parent):
            for path in sorted(folder.glob("*.csv")):
                with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
                    header = [c.strip().lower() for c in next(csv.reader(f), [])]
                if "external code" in header:
                    return path
        return None

    @cached_property
    def info(self) -> dict[str, dict]:
        """``{code: {ED, ES (0-based frames, as in the CSV), vendor, vendor_name, centre}}`` from the CSV."""
        path = self.info_csv
        if path is None:
            return {}
        import pandas as pd

        table = pd.read_csv(path, dtype=str).rename(columns=lambda c: c.strip().lower())
        missing = [c for c in ("external code", "ed", "es") if c not in table]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; expected External code, ED, ES")
        out = {}
        for n, row in enumerate(table.itertuples(index=False), start=2):
            row = dict(zip(table.columns, row))
            try:
                ed, es = int(float(row["ed"])), int(float(row["es"]))
            except (TypeError, ValueError) as err:
                raise DataError(f"{path}:{n}: expected integer ED and ES frames, "
                                f"got {row['ed']!r}, {row['es']!r}") from err
            meta = {"vendor": row.get("vendor"), "vendor_name": row.get("vendorname"),
                    "centre": row.get("centre", row.get("center"))}
            out[str(row["external code"]).strip()] = {"ED": ed, "ES": es, **{k: v for k, v in meta.items()
                                                                             if isinstance(v, str)}}
        return out

    def group(self, patient):
        return None

    def scans(self, patients=None):
        for code in self._select(patients):
            info = self.info.get(code, {})
            image = self.folder / code / f"{code}_sa.nii.gz"
            label = self.folder / code / f"{code}_sa_gt.nii.gz"
            phases = {info[k] + 1: k for k in ("ED", "ES") if k in info}  # the CSV counts frames from 0
            n_frames = _load_nifti(image).shape[3:4] or (1,)
            bad = [f"{k} {info[k]}" for k in ("ED", "ES") if k in info and not 0 <= info[k] < n_frames[0]]
            if bad:
                raise DataError(f"{self.info_csv}: {code}: {', '.join(bad)} outside the {n_frames[0]} frames "
                                f"(0-based) of {image}")
            meta = {k: v for k, v in info.items() if k not in ("ED", "ES")}
            frames = _cine_volumes(code, image, label if label.exists() else None, self.label_map, phases,
                                   self.layout, meta)
            yield Scan(f"{code}_sa", image, frames, cine=len(frames) > 1)

    def volumes(self, patients=None):
        """ED and ES (with their labels where the release has them); without the CSV, the labelled frames."""
        for scan in self.scans(patients):
            known = [v for v in scan.frames if v.phase in ("ED", "ES")]
            yield from known or [v for v in scan.frames if v.label is not None]

    def files(self):
        csv_file = [self.info_csv] if self.info_csv is not None and self.info_csv.parent == self.folder else []
        return csv_file + sorted(p for code in self.patients() for p in (self.folder / code).iterdir()
                                 if p.is_file() and _nifti_stem(p.name))
