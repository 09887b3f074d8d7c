"""One reader interface for every supported cardiac MRI layout.

``open_source(folder)`` recognises the layout of a folder and returns a ``Source`` whose ``volumes()``
yield ``CardiacVolume`` objects: image (Z, H, W) float32, label (Z, H, W) uint8 or None, voxel spacing
(z, y, x) in mm when the files carry it, patient id, phase (ED / ES, or the cine frame) and source name.
``n_slices(patient)`` / ``slice_counts()`` give the number of 2D slices of those labelled volumes (the sum of
their Z) from the file headers and HDF5 dataset shapes only, without reading any voxel (the plan uses it).

Supported layouts (see ``LAYOUTS``):

=================  ==================================================================  ============
layout             files                                                               spacing
=================  ==================================================================  ============
``acdc-nifti``     official ACDC release: ``patientNNN/patientNNN_frameFF[_gt].nii.gz``,  from header
                   ``patientNNN_4d.nii.gz``, ``Info.cfg``
``acdc-h5``        SSL4MIS / WSL4MIS HDF5: ``patientNNN_frameFF.h5`` (``image``, ``label``,  none
                   Z first); ED = the lower frame number of a patient
``decathlon``      Medical Segmentation Decathlon Task02_Heart: ``imagesTr/la_NNN.nii.gz``,  from header
                   ``labelsTr/la_NNN.nii.gz``, ``dataset.json``
``la2018-h5``      2018 Atrial Segmentation Challenge, UA-MT HDF5: ``<case>/mri_norm2.h5``   none
                   (``image``, ``label``, Z last)
=================  ==================================================================  ============

The source data are only ever read. Every problem with a file raises ``DataError`` naming the file.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

ACDC_LABELS = {1: "RV", 2: "MYO", 3: "LV"}
LA_LABELS = {1: "LA"}


class DataError(ValueError):
    """A data folder or file that cannot be read as expected."""


@dataclass
class CardiacVolume:
    patient: str
    phase: str  # "ED" / "ES" for labelled ACDC frames, "F03" for a cine frame, "3D" for single volumes
    image: np.ndarray  # (Z, H, W) float32
    label: np.ndarray | None  # (Z, H, W) uint8, or None
    spacing: tuple[float, float, float] | None  # (z, y, x) mm, None when the files carry none
    source: str  # layout name
    path: Path
    frame: int | None = None
    group: str | None = None  # ACDC pathology group when known
    labels: dict[int, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- checks
def _check_image(image: np.ndarray, path: Path) -> np.ndarray:
    if image.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {image.shape}")
    if min(image.shape) < 1:
        raise DataError(f"{path}: empty volume of shape {image.shape}")
    image = np.asarray(image, dtype=np.float32)
    if not np.isfinite(image).all():
        raise DataError(f"{path}: image contains NaN or infinite values")
    if float(image.max()) == float(image.min()):
        raise DataError(f"{path}: image is constant ({float(image.min())}); expected an MRI volume")
    return image


def _check_label(label: np.ndarray, image: np.ndarray, path: Path, allowed: dict[int, str]) -> np.ndarray:
    if label.shape != image.shape:
        raise DataError(f"{path}: label shape {label.shape} does not match image shape {image.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            raise DataError(f"{path}: label has non-integer values; expected {{0, {', '.join(map(str, allowed))}}}")
        label = rounded
    values = set(np.unique(label).tolist())
    bad = sorted(values - {0, *allowed})
    if bad:
        raise DataError(f"{path}: label values {bad} outside the source's set "
                        f"{{0 background, {', '.join(f'{k} {v}' for k, v in allowed.items())}}}")
    return label.astype(np.uint8)


def _read_nifti(path: Path, ndim: int = 3) -> tuple[np.ndarray, tuple[float, ...]]:
    """Data as (Z, Y, X[, ...]) order reversed from nibabel's (X, Y, Z), with spacing in the same order."""
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        zooms = tuple(float(z) for z in img.header.get_zooms())
    except Exception as err:  # nibabel raises several types for truncated or corrupt files
        raise DataError(f"{path}: cannot read NIfTI file ({type(err).__name__}: {err})") from err
    if data.ndim != ndim:
        raise DataError(f"{path}: expected a {ndim}D NIfTI image, got shape {data.shape}")
    if ndim == 3:
        return np.ascontiguousarray(np.transpose(data, (2, 1, 0))), zooms[2::-1]
    # 4D cine (X, Y, Z, T) -> (T, Z, Y, X)
    return np.ascontiguousarray(np.transpose(data, (3, 2, 1, 0))), zooms[2::-1]


def _read_h5(path: Path, keys=("image", "label")) -> list[np.ndarray]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise DataError(f"{path}: missing dataset(s) {missing}; found {sorted(f.keys())}")
            return [f[k][()] for k in keys]
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: cannot read HDF5 file ({type(err).__name__}: {err})") from err


def _nifti_shape(path: Path) -> tuple[int, ...]:
    """Shape of a NIfTI image in nibabel's (X, Y, Z[, T]) order, from its header only (no voxel is read)."""
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return tuple(int(n) for n in nib.load(str(path)).shape)
    except Exception as err:  # nibabel raises several types for truncated or corrupt files
        raise DataError(f"{path}: cannot read NIfTI header ({type(err).__name__}: {err})") from err


def _h5_shape(path: Path, key: str = "image") -> tuple[int, ...]:
    """Shape of one HDF5 dataset, from its metadata only (no voxel is read)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise DataError(f"{path}: missing dataset(s) {[key]}; found {sorted(f.keys())}")
            return tuple(int(n) for n in f[key].shape)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: cannot read HDF5 file ({type(err).__name__}: {err})") from err


def _depth(shape: tuple[int, ...], axis: int, path: Path) -> int:
    """Z of a 3D shape (``axis``: where Z is in the file), with the checks ``volumes()`` makes on the shape."""
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {shape}")
    if min(shape) < 1:
        raise DataError(f"{path}: empty volume of shape {shape}")
    return shape[axis]


def _spacing(zooms: tuple[float, ...], path: Path) -> tuple[float, float, float]:
    if len(zooms) != 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
        raise DataError(f"{path}: invalid voxel spacing {zooms} in the header")
    return tuple(zooms)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- layouts
class Source:
    """A folder of cardiac MRI in one layout. Subclasses implement one layout each."""

    layout: str = ""
    description: str = ""
    labels: dict[int, str] = {}
    has_spacing: bool = False

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def matches(cls, folder: Path) -> bool:
        raise NotImplementedError

    def patients(self) -> list[str]:
        """Sorted patient (case) ids."""
        raise NotImplementedError

    def volumes(self, patients: list[str] | None = None) -> Iterator[CardiacVolume]:
        """The labelled volumes (ACDC: ED and ES of each patient)."""
        raise NotImplementedError

    def cine(self, patients: list[str] | None = None) -> Iterator[CardiacVolume]:
        """Every available frame, unlabelled, for pretraining. Default: the labelled volumes' images."""
        for vol in self.volumes(patients):
            yield CardiacVolume(vol.patient, vol.phase, vol.image, None, vol.spacing, vol.source, vol.path,
                                vol.frame, vol.group, vol.labels)

    def group(self, patient: str) -> str | None:
        return None

    def n_slices(self, patient: str) -> int:
        """Number of 2D slices of ``patient``'s labelled volumes: the sum of Z over ``volumes([patient])``.

        Layouts override this to read only file headers / dataset shapes; this fallback reads the volumes.
        """
        return sum(int(v.image.shape[0]) for v in self.volumes([patient]))

    def slice_counts(self, patients: list[str] | None = None) -> dict[str, int]:
        """``{patient: n_slices(patient)}`` for ``patients`` (default: every patient), in patient order."""
        return {p: self.n_slices(p) for p in self._select(patients)}

    def files(self) -> list[Path]:
        """Every file this source reads (for the content hash of the manifest)."""
        raise NotImplementedError

    def _select(self, patients: list[str] | None) -> list[str]:
        known = self.patients()
        if patients is None:
            return known
        unknown = sorted(set(patients) - set(known))
        if unknown:
            raise DataError(f"{self.folder}: unknown patient(s) {unknown[:5]}")
        return [p for p in known if p in set(patients)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.folder)!r}, {len(self.patients())} patients)"


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


class Decathlon(Source):
    layout = "decathlon"
    description = "Medical Segmentation Decathlon Task02_Heart: imagesTr/la_NNN.nii.gz, labelsTr/la_NNN.nii.gz"
    labels = LA_LABELS
    has_spacing = True

    @classmethod
    def matches(cls, folder):
        return (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir()

    def _images(self) -> list[Path]:
        # macOS archives of the Decathlon carry '._la_003.nii.gz' resource files: skip hidden names
        return sorted(p for p in (self.folder / "imagesTr").glob("*.nii.gz") if not p.name.startswith("."))

    def patients(self):
        return [p.name[: -len(".nii.gz")] for p in self._images()]

    def volumes(self, patients=None):
        for case in self._select(patients):
            img_path = self.folder / "imagesTr" / f"{case}.nii.gz"
            lab_path = self.folder / "labelsTr" / f"{case}.nii.gz"
            image, zooms = _read_nifti(img_path)
            image = _check_image(image, img_path)
            label = None
            if lab_path.exists():
                label, _ = _read_nifti(lab_path)
                label = _check_label(label, image, lab_path, self.labels)
            yield CardiacVolume(case, "3D", image, label, _spacing(zooms, img_path), self.layout, img_path,
                                None, None, self.labels)

    def n_slices(self, patient):
        self._select([patient])
        path = self.folder / "imagesTr" / f"{patient}.nii.gz"
        return _depth(_nifti_shape(path), 2, path)  # nibabel's (X, Y, Z)

    def files(self):
        meta = [self.folder / "dataset.json"] if (self.folder / "dataset.json").exists() else []
        labels = [self.folder / "labelsTr" / p.name for p in self._images()]
        return meta + self._images() + [p for p in labels if p.exists()]


class La2018H5(Source):
    layout = "la2018-h5"
    description = "2018 Atrial Segmentation Challenge (UA-MT HDF5): <case>/mri_norm2.h5, Z last"
    labels = LA_LABELS

    @classmethod
    def matches(cls, folder):
        return any((p / "mri_norm2.h5").is_file() for p in folder.iterdir() if p.is_dir())

    def patients(self):
        return sorted(p.name for p in self.folder.iterdir() if (p / "mri_norm2.h5").is_file())

    def volumes(self, patients=None):
        for case in self._select(patients):
            path = self.folder / case / "mri_norm2.h5"
            image, label = _read_h5(path)
            if image.ndim != 3:
                raise DataError(f"{path}: expected a 3D (X, Y, Z) image, got shape {image.shape}")
            image = _check_image(np.transpose(image, (2, 1, 0)), path)  # (X, Y, Z) -> (Z, Y, X)
            label = _check_label(np.transpose(label, (2, 1, 0)) if label.ndim == 3 else label, image, path,
                                 self.labels)
            yield CardiacVolume(case, "3D", image, label, None, self.layout, path, None, None, self.labels)

    def n_slices(self, patient):
        self._select([patient])
        path = self.folder / patient / "mri_norm2.h5"
        return _depth(_h5_shape(path), 2, path)  # (X, Y, Z): Z last

    def files(self):
        return [self.folder / c / "mri_norm2.h5" for c in self.patients()]


LAYOUTS: dict[str, type[Source]] = {cls.layout: cls for cls in (AcdcNifti, AcdcH5, Decathlon, La2018H5)}


def detect_layout(folder: str | Path) -> str:
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: data folder does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder}: expected a folder of cardiac MRI, got a file")
    if not any(folder.iterdir()):
        raise DataError(f"{folder}: data folder is empty")
    for name, cls in LAYOUTS.items():
        if cls.matches(folder):
            return name
    expected = "\n".join(f"  - {cls.layout}: {cls.description}" for cls in LAYOUTS.values())
    raise DataError(f"{folder}: unrecognised data layout; expected one of:\n{expected}")


def open_source(folder: str | Path) -> Source:
    """Recognise the layout of ``folder`` and return its reader."""
    folder = Path(folder)
    source = LAYOUTS[detect_layout(folder)](folder)
    if not source.patients():
        raise DataError(f"{folder}: no patients found for layout {source.layout}")
    return source


def read_dataset_json(folder: Path) -> dict:
    """The Decathlon's ``dataset.json`` (labels, modality), with a clear error when malformed."""
    path = Path(folder) / "dataset.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DataError(f"{path}: not found") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
