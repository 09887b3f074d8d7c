"""ACDC in its two layouts: the official NIfTI release (``acdc-nifti``, with ``Info.cfg``) and the SSL4MIS HDF5
volumes (``acdc-h5``, with the voxel spacing from a ``spacing.csv`` beside them or one folder up when there is one)."""
from __future__ import annotations

import csv
import math
import os
import re
from functools import cached_property
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
    """The SSL4MIS / WSL4MIS HDF5 volumes: ``patientNNN_frameFF.h5`` with ``image`` and ``label`` (Z, H, W).

    The HDF5 files carry no voxel spacing. A ``spacing.csv`` beside them or one folder up (the first found;
    columns ``file, spacing_x_mm, spacing_y_mm, spacing_z_mm, nifti_shape_xyz``, one row per ``.h5`` file, as
    read from the official NIfTI headers) gives every volume ``spacing = (z, y, x)`` mm, checked against the
    array: the HDF5 arrays are the NIfTI grids transposed, so ``nifti_shape_xyz`` is W x H x Z. Without it
    the volumes have ``spacing=None`` and ``has_spacing`` is False (work in pixels)."""

    layout = "acdc-h5"
    description = ("SSL4MIS-style ACDC HDF5: patientNNN_frameFF.h5 with 'image' and 'label', Z first; voxel spacing "
                   "from spacing.csv (file, spacing_x_mm, spacing_y_mm, spacing_z_mm, nifti_shape_xyz) beside the "
                   "files or one folder up, else none")
    labels = ACDC_LABELS
    spacing_name = "spacing.csv"
    spacing_columns = ("file", "spacing_x_mm", "spacing_y_mm", "spacing_z_mm", "nifti_shape_xyz")
    _pattern = re.compile(r"(patient\d{3})_frame(\d{2})\.h5$")

    @classmethod
    def matches(cls, folder):
        return any(cls._pattern.match(p.name) for p in folder.iterdir())

    @cached_property
    def spacing_csv(self) -> Path | None:
        """``spacing.csv`` beside the HDF5 files, else one folder up (SSL4MIS keeps ``data/ACDC/`` above
        ``ACDC_training_volumes/``); None when neither exists."""
        for folder in (self.folder, self.folder.parent):
            if (folder / self.spacing_name).is_file():
                return folder / self.spacing_name
        return None

    @property
    def has_spacing(self) -> bool:  # per source: True where a spacing.csv was found
        return self.spacing_csv is not None

    @cached_property
    def spacing_table(self) -> dict[str, tuple[tuple[float, float, float], tuple[int, int, int]]]:
        """``{file name: ((z, y, x) mm, nifti_shape_xyz)}`` from ``spacing.csv``, read once and checked: the
        columns, positive numeric spacings, ``W x H x Z`` shapes, and a row for every ``.h5`` file of the folder.
        Empty without a CSV."""
        path = self.spacing_csv
        if path is None:
            return {}
        expected = ", ".join(self.spacing_columns)
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                header = [c.strip() for c in reader.fieldnames or []]
                missing = [c for c in self.spacing_columns if c not in header]
                if missing:
                    raise DataError(f"{path}: missing column(s) {missing}; expected {expected}, got {header}")
                rows = [(n, {k.strip(): (v or "").strip() for k, v in row.items() if k is not None})
                        for n, row in enumerate(reader, start=2)]
        except (OSError, UnicodeDecodeError, csv.Error) as err:
            raise DataError(f"{path}: cannot read the spacing CSV ({type(err).__name__}: {err})") from err
        table = {}
        for n, row in rows:
            name = row["file"]
            if name in table:
                raise DataError(f"{path}:{n}: {name} listed twice")
            spacing = []
            for axis in ("z", "y", "x"):
                value = row[f"spacing_{axis}_mm"]
                try:
                    number = float(value)
                except ValueError:
                    number = math.nan
                if not (math.isfinite(number) and number > 0):
                    raise DataError(f"{path}:{n}: {name}: spacing_{axis}_mm must be a positive number of mm, "
                                    f"got {value!r}")
                spacing.append(number)
            parts = row["nifti_shape_xyz"].lower().split("x")
            if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
                raise DataError(f"{path}:{n}: {name}: nifti_shape_xyz must be three positive integers 'XxYxZ' "
                                f"(e.g. 232x256x10), got {row['nifti_shape_xyz']!r}")
            table[name] = (tuple(spacing), tuple(int(p) for p in parts))
        absent = [p.name for p in self._h5_files() if p.name not in table]
        if absent:
            raise DataError(f"{path}: no row for {len(absent)} file(s) of {self.folder}: {', '.join(absent[:5])}"
                            f"{', ...' if len(absent) > 5 else ''}; expected one row per .h5 file ({expected})")
        return table

    def _spacing_of(self, path: Path, shape: tuple[int, ...]) -> tuple[float, float, float] | None:
        """(z, y, x) mm of the HDF5 file ``path`` whose array has ``shape`` (Z, H, W), from ``spacing.csv``."""
        if self.spacing_csv is None:
            return None
        if path.name not in self.spacing_table:  # a file added after the CSV was read
            raise DataError(f"{self.spacing_csv}: no row for {path.name}; expected one row per .h5 file")
        spacing, shape_xyz = self.spacing_table[path.name]
        if tuple(shape_xyz[::-1]) != tuple(shape):
            z, h, w = shape
            raise DataError(f"{self.spacing_csv}: {path.name}: nifti_shape_xyz {'x'.join(map(str, shape_xyz))} does "
                            f"not match the HDF5 array {path} of shape (Z, H, W) {tuple(shape)}; expected "
                            f"nifti_shape_xyz {w}x{h}x{z} (W x H x Z)")
        return spacing

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
                yield CardiacVolume(patient, phase, image, label, self._spacing_of(path, image.shape), self.layout,
                                    path, frame, None, self.labels)

    def n_slices(self, patient):
        self._select([patient])
        found = self._frames()[patient]
        if len(found) != 2:
            raise DataError(f"{self.folder}: {patient} has frames {found}; expected two (ED and ES)")
        paths = [self.folder / f"{patient}_frame{frame:02d}.h5" for frame in found]
        return sum(_depth(_h5_shape(path), 0, path) for path in paths)  # Z first

    def _h5_files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if self._pattern.match(p.name))

    def files(self):
        """The HDF5 files and, where there is one, ``spacing.csv``. The manifest's hash names each file relative
        to the folder, so a CSV one folder up is given as ``<folder>/../spacing.csv`` (from the folder's real
        path, so that ``..`` reaches the same file when the folder is a symbolic link)."""
        csv_path = self.spacing_csv
        if csv_path is None:
            return self._h5_files()
        relative = os.path.relpath(csv_path.parent.resolve() / csv_path.name, self.folder.resolve())
        return [self.folder / relative] + self._h5_files()
