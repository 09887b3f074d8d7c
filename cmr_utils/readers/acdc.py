"""ACDC in its two layouts: the official NIfTI release (``acdc-nifti``, with ``Info.cfg``) and the SSL4MIS HDF5
volumes (``acdc-h5``)."""
from __future__ import annotations

import re
from pathlib import Path

from .base import (ACDC_LABELS, CardiacVolume, DataError, Source, _check_image, _check_label, _depth, _h5_shape,
                   _nifti_shape, _read_h5, _read_nifti, _spacing)


def parse_info_cfg(path: Path) -> dict[str, str]:
    """ACDC's ``Info.cfg``: ``Key: value`` lines (ED, ES, Group, Height, NbFrame, Weight)."""
    if not path.is_file():
        raise DataError(f"{path}: Info.cfg not found")
    info = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise DataError(f"{path}:{n}: expected 'Key: value', got {line!r}")
        info[key.strip()] = value.strip()
    for key in ("ED", "ES"):
        if key not in info or not info[key].isdigit():
            raise DataError(f"{path}: expected an integer '{key}:' frame number, got {info.get(key)!r}")
    return info


class AcdcNifti(Source):
    layout = "acdc-nifti"
    description = "official ACDC release: patientNNN/patientNNN_frameFF.nii.gz, _gt.nii.gz, _4d.nii.gz, Info.cfg"
    labels = ACDC_LABELS
    has_spacing = True
    _pattern = re.compile(r"patient\d{3}$")

    @classmethod
    def matches(cls, folder):
        return any(p.is_dir() and cls._pattern.match(p.name) and (p / "Info.cfg").exists()
                   for p in folder.iterdir())

    def patients(self):
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and self._pattern.match(p.name))

    def info(self, patient: str) -> dict[str, str]:
        return parse_info_cfg(self.folder / patient / "Info.cfg")

    def group(self, patient):
        return self.info(patient).get("Group")

    def volumes(self, patients=None):
        for patient in self._select(patients):
            info = self.info(patient)
            for phase in ("ED", "ES"):
                frame = int(info[phase])
                img_path = self.folder / patient / f"{patient}_frame{frame:02d}.nii.gz"
                gt_path = self.folder / patient / f"{patient}_frame{frame:02d}_gt.nii.gz"
                image, zooms = _read_nifti(img_path)
                image = _check_image(image, img_path)
                label, _ = _read_nifti(gt_path)
                label = _check_label(label, image, gt_path, self.labels)
                yield CardiacVolume(patient, phase, image, label, _spacing(zooms, img_path), self.layout,
                                    img_path, frame, info.get("Group"), self.labels)

    def n_slices(self, patient):
        self._select([patient])
        info = self.info(patient)
        return sum(_depth(_nifti_shape(path), 2, path)  # nibabel's (X, Y, Z)
                   for path in (self.folder / patient / f"{patient}_frame{int(info[phase]):02d}.nii.gz"
                                for phase in ("ED", "ES")))

    def cine(self, patients=None):
        for patient in self._select(patients):
            path = self.folder / patient / f"{patient}_4d.nii.gz"
            if not path.exists():  # a release without the cine: fall back to the labelled frames
                yield from super().cine([patient])
                continue
            frames, zooms = _read_nifti(path, ndim=4)
            spacing = _spacing(zooms, path)
            group = self.group(patient)
            for t, image in enumerate(frames, start=1):
                yield CardiacVolume(patient, f"F{t:02d}", _check_image(image, path), None, spacing,
                                    self.layout, path, t, group, self.labels)

    def files(self):
        return sorted(p for pat in self.patients() for p in (self.folder / pat).iterdir() if p.is_file())


class AcdcH5(Source):
    layout = "acdc-h5"
    description = "SSL4MIS-style ACDC HDF5: patientNNN_frameFF.h5 with 'image' and 'label', Z first"
    labels = ACDC_LABELS
    _pattern = re.compile(r"(patient\d{3})_frame(\d{2})\.h5$")

    @classmethod
    def matches(cls, folder):
        return any(cls._pattern.match(p.name) for p in folder.iterdir())

    def _frames(self) -> dict[str, list[int]]:
        frames: dict[str, list[int]] = {}
        for p in self.folder.iterdir():
            m = self._pattern.match(p.name)
            if m:
                frames.setdefault(m.group(1), []).append(int(m.group(2)))
        return {k: sorted(v) for k, v in sorted(frames.items())}

    def patients(self):
        return list(self._frames())

    def volumes(self, patients=None):
        frames = self._frames()
        for patient in self._select(patients):
            found = frames[patient]
            if len(found) != 2:
                raise DataError(f"{self.folder}: {patient} has frames {found}; expected two (ED and ES)")
            for phase, frame in zip(("ED", "ES"), found):  # ED is the lower frame number
                path = self.folder / f"{patient}_frame{frame:02d}.h5"
                image, label = _read_h5(path)
                image = _check_image(image, path)
                label = _check_label(label, image, path, self.labels)
                yield CardiacVolume(patient, phase, image, label, None, self.layout, path, frame, None,
                                    self.labels)

    def n_slices(self, patient):
        self._select([patient])
        found = self._frames()[patient]
        if len(found) != 2:
            raise DataError(f"{self.folder}: {patient} has frames {found}; expected two (ED and ES)")
        paths = [self.folder / f"{patient}_frame{frame:02d}.h5" for frame in found]
        return sum(_depth(_h5_shape(path), 0, path) for path in paths)  # Z first

    def files(self):
        return sorted(p for p in self.folder.iterdir() if self._pattern.match(p.name))
