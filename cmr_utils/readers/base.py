"""What every layout shares: the volume and scan records, ``DataError``, the ``Source`` interface, and the
checked NIfTI / HDF5 reading (voxels, header-only shapes, 3D and 4D cine frames, label maps to ACDC's labels)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..structures import STRUCTURES

ACDC_LABELS = STRUCTURES  # ACDC's label values are the study's structures
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
    meta: dict = field(default_factory=dict)  # what the layout adds per volume, e.g. M&Ms' vendor and centre


@dataclass
class Scan:
    """One image file of a source: a 3D volume (one frame) or a 4D cine (every frame, in order).

    ``frames`` carry the labels where the source has them (ACDC's convention after any remapping) and the
    phase (``ED`` / ``ES`` where known, ``F03`` for another cine frame, ``3D`` for a lone volume). ``case``
    names the outputs made from the file (``<case>_pred.nii.gz``). ``nifti``: whether ``path`` is a NIfTI
    file whose affine and header a prediction copies."""

    case: str
    path: Path
    frames: list[CardiacVolume]
    cine: bool = False

    @property
    def nifti(self) -> bool:
        return _nifti_stem(self.path.name) is not None


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


def _nifti_stem(name: str) -> str | None:
    """``case`` of ``case.nii.gz`` / ``case.nii``; None for any other name."""
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _load_nifti(path: Path):
    """The NIfTI image at ``path`` (header read, voxels not yet), 3D or 4D, with a clear error otherwise."""
    import nibabel as nib

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes); expected a NIfTI image")
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several types for truncated or corrupt files
        raise DataError(f"{path}: cannot read NIfTI file ({type(err).__name__}: {err})") from err
    if len(img.shape) not in (3, 4):
        raise DataError(f"{path}: expected a 3D volume (X, Y, Z) or a 4D cine (X, Y, Z, T), got shape {img.shape}")
    if min(img.shape) < 1:
        raise DataError(f"{path}: empty image of shape {img.shape}")
    return img


def _nifti_frames(img, path: Path) -> np.ndarray:
    """Voxels of a 3D or 4D NIfTI image as frames (T, Z, Y, X); T = 1 for a 3D volume."""
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # truncated gzip streams fail here, after the header was read
        raise DataError(f"{path}: cannot read NIfTI voxels ({type(err).__name__}: {err})") from err
    data = data[..., None] if data.ndim == 3 else data
    return np.ascontiguousarray(np.transpose(data, (3, 2, 1, 0)))


def _check_pair(img, lab, img_path: Path, lab_path: Path) -> None:
    """A label file must lie on its image's grid: same shape (frames aside) and same affine."""
    shape, lab_shape = tuple(img.shape), tuple(lab.shape)
    if lab_shape != shape and not (len(shape) == 4 and lab_shape == shape[:3]):
        raise DataError(f"{lab_path}: label shape {lab_shape} does not match its image {img_path.name} {shape}")
    if not np.allclose(lab.affine, img.affine, rtol=1e-4, atol=1e-3):
        raise DataError(f"{lab_path}: label affine differs from its image {img_path.name}'s; expected the image's "
                        f"grid\n{np.round(img.affine, 4)}\ngot\n{np.round(lab.affine, 4)}")


def parse_label_map(label_map, where: str = "label_map") -> dict[int, int]:
    """``{value in the files: ACDC label}`` from a dict (keys may be strings, as in JSON) or ``"1:3,2:2,3:1"``;
    every value must map to 0 background, 1 RV, 2 MYO or 3 LV, and background stays background."""
    if isinstance(label_map, str):
        try:
            label_map = dict(item.split(":") for item in label_map.replace(" ", "").split(",") if item)
        except ValueError as err:
            raise DataError(f"{where}: expected 'file:acdc' pairs like '1:3,2:2,3:1', got {label_map!r}") from err
    if not isinstance(label_map, dict) or not label_map:
        raise DataError(f"{where}: expected a mapping {{value in the files: ACDC label}}, got {label_map!r}")
    try:
        mapping = {int(k): int(v) for k, v in label_map.items()}
    except (TypeError, ValueError) as err:
        raise DataError(f"{where}: expected integer labels, got {label_map!r}") from err
    if not set(mapping.values()) <= {0, *ACDC_LABELS} or any(k < 0 for k in mapping):
        raise DataError(f"{where}: targets must be ACDC labels {{0 background, 1 RV, 2 MYO, 3 LV}}, got {mapping}")
    if mapping.get(0, 0) != 0:
        raise DataError(f"{where}: background (0) must stay 0, got 0 -> {mapping[0]}")
    return {0: 0, **mapping}


def _map_labels(label: np.ndarray, mapping: dict[int, int], path: Path) -> np.ndarray:
    """Label values of a file -> ACDC's; a value the mapping does not declare is an error naming the file."""
    mapping = {0: 0, **mapping}
    if not np.issubdtype(label.dtype, np.integer):
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            raise DataError(f"{path}: label has non-integer values; expected {sorted(mapping)}")
        label = rounded.astype(np.int64)
    values = np.unique(label)
    bad = sorted(set(values.tolist()) - set(mapping))
    if bad:
        raise DataError(f"{path}: label values {bad[:10]} outside the declared set {sorted(mapping)} "
                        f"(mapped to ACDC's 1 RV, 2 MYO, 3 LV: {mapping})")
    lookup = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for k, v in mapping.items():
        lookup[k] = v
    return lookup[label.astype(np.int64)]


def _cine_volumes(patient: str, image_path: Path, label_path: Path | None, mapping: dict[int, int],
                  phases: dict[int, str], layout: str, meta: dict | None = None,
                  single_phase: str = "3D") -> list[CardiacVolume]:
    """Every frame of a 3D or 4D NIfTI image (with its label file, when there is one) as CardiacVolumes.

    ``phases``: ``{1-based frame: 'ED' / 'ES'}``; other frames of a cine are ``F03``..., a 3D volume is
    ``single_phase``. A label frame without foreground is kept unlabelled (M&Ms labels ED and ES only)."""
    img = _load_nifti(image_path)
    spacing = _spacing(tuple(float(z) for z in img.header.get_zooms()[:3])[::-1], image_path)
    frames = _nifti_frames(img, image_path)
    labels = None
    if label_path is not None:
        lab = _load_nifti(label_path)
        _check_pair(img, lab, image_path, label_path)
        labels = _map_labels(_nifti_frames(lab, label_path), mapping, label_path)
        if len(labels) == 1 and len(frames) > 1:
            raise DataError(f"{label_path}: a 3D label file for the 4D cine {image_path.name}; expected a 4D label "
                            f"file of shape {tuple(img.shape)} with the labelled frames filled")
    cine = len(frames) > 1
    out = []
    for t, image in enumerate(frames, start=1):
        label = None if labels is None else labels[t - 1]
        if cine and label is not None and not label.any():
            label = None
        phase = phases.get(t, f"F{t:02d}" if cine else single_phase)
        out.append(CardiacVolume(patient, phase, _check_image(image, image_path), label, spacing, layout,
                                 image_path, t if cine else None, None, dict(ACDC_LABELS), dict(meta or {})))
    return out


def _spacing(zooms: tuple[float, ...], path: Path) -> tuple[float, float, float]:
    if len(zooms) != 3 or not all(np.isfinite(z) and z > 0 for z in zooms):
        raise DataError(f"{path}: invalid voxel spacing {zooms} in the header")
    return tuple(zooms)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- source
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

    def scans(self, patients: list[str] | None = None) -> Iterator[Scan]:
        """Every image file to segment, one at a time. Default: each labelled volume's file, one frame."""
        for vol in self.volumes(patients):
            yield Scan(self.case_of(vol), vol.path, [vol])

    def case_of(self, vol: CardiacVolume) -> str:
        """The name of ``vol``'s file without its extension (the stem of its outputs)."""
        name = vol.path.name
        return _nifti_stem(name) or name.removesuffix(".h5")

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
