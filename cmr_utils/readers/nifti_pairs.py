"""The general layout (``nifti-pairs``): a folder of ``<case>.nii.gz`` (3D or 4D cine), each with an optional
``<case>_gt.nii.gz``, labels remapped by ``label_map``."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .base import ACDC_LABELS, DataError, Scan, Source, _cine_volumes, _nifti_stem, parse_label_map


class NiftiPairs(Source):
    layout = "nifti-pairs"
    description = ("a folder of <case>.nii.gz short-axis volumes (3D, or 4D cine), each with an optional "
                   "<case>_gt.nii.gz beside it; ACDC's labels (1 RV, 2 MYO, 3 LV) unless label_map.json remaps")
    labels = ACDC_LABELS
    has_spacing = True
    LABEL_MAP_FILE = "label_map.json"  # {"value in the files": ACDC label}, e.g. {"1": 3, "2": 2, "3": 1}
    _phase = re.compile(r"(?P<patient>.+)_(?P<phase>ED|ES)$", re.IGNORECASE)

    def __init__(self, folder: Path, label_map: dict | str | None = None):
        """``label_map``: ``{value in the label files: ACDC label}`` (or ``"1:3,2:2,3:1"``); default: the
        folder's ``label_map.json`` if there is one, else ACDC's own labels."""
        super().__init__(folder)
        where = "label_map"
        if label_map is None and (self.folder / self.LABEL_MAP_FILE).is_file():
            where = str(self.folder / self.LABEL_MAP_FILE)
            try:
                label_map = json.loads((self.folder / self.LABEL_MAP_FILE).read_text())
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err})") from err
        self.label_map = parse_label_map({1: 1, 2: 2, 3: 3} if label_map is None else label_map, where)

    @staticmethod
    def _cases(folder: Path) -> dict[str, Path]:
        cases = {}
        for p in sorted(folder.iterdir()):
            stem = _nifti_stem(p.name)
            if stem and not stem.endswith("_gt") and not p.name.startswith(".") and p.is_file():
                cases.setdefault(stem, p)
        return cases

    @classmethod
    def matches(cls, folder):
        return bool(cls._cases(folder))

    def _label_path(self, case: str) -> Path | None:
        found = [self.folder / f"{case}_gt{suffix}" for suffix in (".nii.gz", ".nii")]
        return next((p for p in found if p.is_file()), None)

    def patient_phase(self, case: str) -> tuple[str, str]:
        """``p01_ED`` -> (``p01``, ``ED``): an ``_ED`` / ``_ES`` suffix names the phase (so that EF can be
        computed); any other case is its own patient, phase ``3D``."""
        m = self._phase.match(case)
        return (m.group("patient"), m.group("phase").upper()) if m else (case, "3D")

    def patients(self):
        return sorted({self.patient_phase(case)[0] for case in self._cases(self.folder)})

    def scans(self, patients=None):
        selected = set(self._select(patients))
        orphans = sorted(p.name for p in self.folder.glob("*_gt.nii*")
                         if _nifti_stem(p.name) and _nifti_stem(p.name)[:-3] not in self._cases(self.folder))
        if orphans:
            raise DataError(f"{self.folder}: label file(s) {orphans[:5]} without their image <case>.nii.gz")
        for case, path in self._cases(self.folder).items():
            patient, phase = self.patient_phase(case)
            if patient in selected:
                frames = _cine_volumes(patient, path, self._label_path(case), self.label_map, {}, self.layout,
                                       single_phase=phase)
                yield Scan(case, path, frames, cine=len(frames) > 1)

    def volumes(self, patients=None):
        """Each case's volume; of a labelled 4D cine, the frames its label file fills."""
        for scan in self.scans(patients):
            labelled = [v for v in scan.frames if v.label is not None]
            yield from labelled if scan.cine and labelled else scan.frames

    def files(self):
        meta = [self.folder / self.LABEL_MAP_FILE] if (self.folder / self.LABEL_MAP_FILE).is_file() else []
        cases = self._cases(self.folder)
        return meta + list(cases.values()) + [p for p in map(self._label_path, cases) if p is not None]
