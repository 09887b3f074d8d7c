"""DICOM as a scanner exports it (``dicom``): a folder, at any depth, of one file per image, read as series.

Files are grouped by PatientID and SeriesInstanceUID; the headers alone decide the order, never the file names
nor the InstanceNumbers: slices by their position along the slice normal (ImagePositionPatient · the cross
product of ImageOrientationPatient's row and column directions, ascending), and within a slice location the
cardiac phases by TriggerTime (InstanceNumber where a series has no TriggerTime). A cine (several phases per
location) becomes frames (T, Z, H, W) like a 4D NIfTI's; a series of one phase is one 3D volume. The voxel
spacing (z, y, x) and the affine (``meta["affine"]``: RAS, on the (X column, Y row, Z slice) axes NIfTI files
use) come from the headers.

What is not one short-axis stack is never silently reordered: a series mixing orientations or image sizes,
with a phase missing at some slice locations, with uneven gaps between slice locations, with non-MR images or
multi-frame files is an error naming its files; whole series that are not MR (structured reports, presentation
states...) or are localisers (ImageType LOCALIZER), and localiser images inside a series, are skipped with a
warning on the ``cmr_utils.readers.dicom`` logger that names them. Compressed transfer syntaxes are decoded by
pydicom's pixel-data plugins; one without an installed plugin is an error naming the file and the syntax.

Sunnybrook Cardiac Data (Radau et al. 2009; ``readers.sunnybrook``): where ``link.csv`` and ``contourfiles/`` lie in
the folder (or beside it, when the folder is ``dicoms/``), the hand-drawn contours label the LV cavity (3) and the
myocardium (2); there is no RV label. The labelled volumes are then the contoured frames, each holding only the
slices that have contours (``meta["slices"]``: their indices in the frame's full stack), named ED and ES where
two frames are contoured (the larger LV cavity is ED); the scans and the cine stay unlabelled. A slice with an
inner contour alone (Sunnybrook's ES frames, a few slices of some ED frames) labels the LV alone: there the
myocardium is background in the label although it is not known. ``meta["myo_labelled"]`` says per slice whether
the myocardium is labelled, and ``meta["unlabelled"]`` names the structures the volume does not label on every
slice (``("RV",)`` or ``("RV", "MYO")``); ``evaluate.score_source`` leaves those out. The other metrics code
(the prepared splits of stage 01, ``metrics``) does not read it: do not train or score MYO or RV on these labels
there.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .base import ACDC_LABELS, CardiacVolume, DataError, Scan, Source, _check_image
from .sunnybrook import SunnybrookContours

log = logging.getLogger(__name__)

# suffixes of files that are certainly not DICOM (skipped without opening them)
NOT_DICOM = {".nii", ".gz", ".h5", ".hdf5", ".csv", ".txt", ".json", ".cfg", ".md", ".png", ".jpg", ".jpeg",
             ".npy", ".npz", ".pdf", ".xml", ".zip", ".py", ".yaml", ".yml", ".pt", ".ckpt"}
POSITION_TOL = 0.1  # mm along the slice normal: images closer than this share a slice location
ORIENTATION_TOL = 1e-3  # direction cosines that differ by less are one orientation
MAX_PROBES = 2000  # files ``matches`` opens before it gives up on a folder


def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: a 128-byte preamble, then ``DICM``."""
    if path.name.startswith(".") or path.suffix.lower() in NOT_DICOM:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _names(paths, n: int = 5) -> str:
    paths = list(paths)
    shown = ", ".join(str(p) for p in paths[:n])
    return shown + (f" and {len(paths) - n} more" if len(paths) > n else "")


# ---------------------------------------------------------------------------------------------- headers
@dataclass(frozen=True)
class DicomImage:
    """What the reader needs from one file's header."""

    path: Path
    patient: str
    series: str  # SeriesInstanceUID
    series_number: int | None
    modality: str
    localiser: bool
    rows: int | None
    columns: int | None
    n_frames: int
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row direction, then column direction
    position: tuple[float, ...] | None  # ImagePositionPatient of the first pixel, mm
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) mm
    trigger_time: float | None
    instance: int | None
    slice_thickness: float | None
    slice_gap: float | None  # SpacingBetweenSlices


def _float(value) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


@contextmanager
def _lenient():
    """pydicom without its warnings about values off the standard's format (Sunnybrook's UIDs with leading
    zeros), which it raises when a value is first used: the reader checks the values it uses itself."""
    from pydicom import config

    mode = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        yield
    finally:
        config.settings.reading_validation_mode = mode


def _dcmread(path: Path, **kwargs):
    from pydicom import dcmread

    try:
        return dcmread(path, **kwargs)
    except Exception as err:  # pydicom raises several types for truncated or non-DICOM files
        raise DataError(f"{path}: cannot read DICOM file ({type(err).__name__}: {err})") from err


def read_header(path: Path, root: Path) -> DicomImage:
    with _lenient():
        return _header(path, root)


def _header(path: Path, root: Path) -> DicomImage:
    ds = _dcmread(path, stop_before_pixels=True)
    patient = str(ds.get("PatientID", "") or "").strip()
    if not patient:  # no PatientID: the first folder under the source's root names the patient
        rel = path.relative_to(root)
        patient = rel.parts[0] if len(rel.parts) > 1 else root.name
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    instance = ds.get("InstanceNumber")
    number = ds.get("SeriesNumber")
    return DicomImage(
        path=path, patient=patient, series=str(ds.get("SeriesInstanceUID", "") or f"no-uid:{path.parent}"),
        series_number=int(number) if number not in (None, "") else None,
        modality=str(ds.get("Modality", "") or "").upper(), localiser="LOCALIZER" in image_type,
        rows=ds.get("Rows"), columns=ds.get("Columns"), n_frames=int(ds.get("NumberOfFrames", 1) or 1),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6), position=_floats(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2), trigger_time=_float(ds.get("TriggerTime")),
        instance=int(instance) if instance not in (None, "") else None,
        slice_thickness=_float(ds.get("SliceThickness")), slice_gap=_float(ds.get("SpacingBetweenSlices")))


def read_pixels(image: DicomImage) -> np.ndarray:
    """The image's stored values with the modality rescale applied, float32 (rows, columns)."""
    with _lenient():
        return _pixels(image)


def _pixels(image: DicomImage) -> np.ndarray:
    ds = _dcmread(image.path)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        data = ds.pixel_array
    except Exception as err:  # a missing decoder plugin raises RuntimeError; corrupt data several types
        name = f"{syntax.name} ({syntax})" if syntax is not None else "unknown"
        raise DataError(f"{image.path}: cannot decode the pixel data, transfer syntax {name}: "
                        f"{type(err).__name__}: {err}") from err
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")) != "MONOCHROME2" or data.ndim != 2:
        raise DataError(f"{image.path}: expected one greyscale (MONOCHROME2) image, got "
                        f"{ds.get('PhotometricInterpretation')} of shape {data.shape}")
    slope, intercept = _float(ds.get("RescaleSlope")), _float(ds.get("RescaleIntercept"))
    data = data.astype(np.float32)
    if slope is not None and slope != 1.0:
        data *= np.float32(slope)
    if intercept:
        data += np.float32(intercept)
    return data


# ---------------------------------------------------------------------------------------------- series
@dataclass
class DicomSeries:
    """One series put in order: ``grid[z][t]`` is the image at slice location z (ascending along the normal)
    and phase t."""

    patient: str
    uid: str
    number: int | None
    grid: list[list[DicomImage]]
    spacing: tuple[float, float, float]  # (z, y, x) mm
    affine: np.ndarray  # 4 x 4, RAS, on NIfTI's (X column, Y row, Z slice) axes

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(T, Z, H, W)."""
        first = self.grid[0][0]
        return len(self.grid[0]), len(self.grid), int(first.rows), int(first.columns)

    @property
    def folder(self) -> Path:
        """The deepest folder that holds every file of the series."""
        return Path(os.path.commonpath([str(img.path.parent) for row in self.grid for img in row]))

    def files(self) -> list[Path]:
        return [img.path for row in self.grid for img in row]

    def frames(self) -> np.ndarray:
        """Voxels (T, Z, H, W) float32."""
        return np.stack([self.frame(t) for t in range(len(self.grid[0]))])

    def frame(self, t: int, slices: list[int] | None = None) -> np.ndarray:
        """Voxels (Z, H, W) float32 of phase ``t`` (0-based), of the slice locations ``slices`` (default: all)."""
        return np.stack([read_pixels(self.grid[z][t]) for z in (range(len(self.grid)) if slices is None else slices)])


def _phase_order(images: list[DicomImage], where: str) -> list[DicomImage]:
    """The images of one slice location in cardiac-phase order: by TriggerTime, else by InstanceNumber; two
    images at one time (or with one InstanceNumber) are an error naming them."""
    if all(img.trigger_time is not None for img in images):
        key, what = (lambda img: img.trigger_time), "TriggerTime"
    elif all(img.instance is not None for img in images):
        key, what = (lambda img: img.instance), "InstanceNumber"
    else:
        lacking = [img.path for img in images if img.instance is None]
        raise DataError(f"{where}: cannot order the phases: neither TriggerTime nor InstanceNumber in "
                        f"{_names(lacking)}")
    ordered = sorted(images, key=lambda img: (key(img), img.instance or 0))
    for a, b in zip(ordered, ordered[1:]):
        if key(a) == key(b):
            raise DataError(f"{where}: two images at one slice location with the same {what} {key(a)}: "
                            f"{a.path} and {b.path} (a repeated acquisition in the series?)")
    return ordered


def assemble_series(images: list[DicomImage]) -> DicomSeries:
    """Order the images of one series into slice locations x phases; any inconsistency is a DataError that
    names the files concerned."""
    first = images[0]
    where = f"series {first.series} of patient {first.patient} ({first.path.parent})"
    not_mr = [img.path for img in images if img.modality != "MR"]
    if not_mr:
        raise DataError(f"{where}: non-MR images ({sorted({img.modality for img in images} - {'MR'})}) in an MR "
                        f"series: {_names(not_mr)}")
    multi = [img.path for img in images if img.n_frames > 1]
    if multi:
        raise DataError(f"{where}: multi-frame (enhanced) DICOM files are not supported: {_names(multi)}")
    for attr, name in (("orientation", "ImageOrientationPatient"), ("position", "ImagePositionPatient"),
                       ("pixel_spacing", "PixelSpacing"), ("rows", "Rows"), ("columns", "Columns")):
        lacking = [img.path for img in images if getattr(img, attr) is None]
        if lacking:
            raise DataError(f"{where}: no {name} in {_names(lacking)}")
    sizes = defaultdict(list)
    for img in images:
        sizes[(int(img.rows), int(img.columns))].append(img.path)
    if len(sizes) > 1:
        raise DataError(f"{where}: images of different sizes (rows x columns) in one series: " +
                        "; ".join(f"{r}x{c}: {_names(p, 3)}" for (r, c), p in sorted(sizes.items())))
    ref = np.array(first.orientation)
    odd = [img.path for img in images if np.abs(np.array(img.orientation) - ref).max() > ORIENTATION_TOL]
    if odd:
        raise DataError(f"{where}: mixed orientations: {_names(odd)} differ from {first.path} "
                        f"(ImageOrientationPatient {list(ref)})")
    odd = [img.path for img in images if not np.allclose(img.pixel_spacing, first.pixel_spacing, atol=1e-4)]
    if odd:
        raise DataError(f"{where}: mixed PixelSpacing: {_names(odd)} differ from {first.path} {first.pixel_spacing}")
    row_dir, col_dir = ref[:3], ref[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1) > 1e-2 or abs(float(row_dir @ col_dir)) > 1e-2:
        raise DataError(f"{where}: ImageOrientationPatient {list(ref)} of {first.path} is not two orthogonal "
                        "unit vectors")

    # slice locations: positions along the normal, split where consecutive ones are further apart than the tolerance
    by_position = sorted(images, key=lambda img: float(np.dot(img.position, normal)))
    locations, current, last = [], [], None
    for img in by_position:
        s = float(np.dot(img.position, normal))
        if last is not None and s - last > POSITION_TOL:
            locations.append(current)
            current = []
        current.append(img)
        last = s
    locations.append(current)
    counts = [len(loc) for loc in locations]
    n_phases = max(set(counts), key=lambda c: (counts.count(c), c))
    short = [i for i, c in enumerate(counts) if c != n_phases]
    if short:
        detail = "; ".join(f"{float(np.dot(locations[i][0].position, normal)):.2f} mm: {counts[i]} image(s) "
                           f"({_names([img.path for img in locations[i]], 3)})" for i in short[:4])
        raise DataError(f"{where}: {len(locations)} slice locations with {n_phases} phases each, except {detail}; "
                        "missing or extra phases (or images of another slice stack) cannot be put in order")
    grid = [_phase_order(loc, where) for loc in locations]
    positions = np.array([float(np.dot(loc[0].position, normal)) for loc in grid])

    if len(grid) > 1:
        gaps = np.diff(positions)
        dz, smallest = float(np.median(gaps)), float(gaps.min())
        uneven = np.flatnonzero(np.abs(gaps - smallest) > max(0.1, 0.05 * smallest))
        if uneven.size:
            i = int(uneven[0])
            raise DataError(f"{where}: uneven slice gaps ({smallest:.2f} mm, but {gaps[i]:.2f} mm between "
                            f"{grid[i][0].path} and {grid[i + 1][0].path}): a slice location missing?")
    else:
        dz = first.slice_gap or first.slice_thickness
        if dz is None or dz <= 0:
            raise DataError(f"{where}: one slice location and neither SpacingBetweenSlices nor SliceThickness "
                            f"in {first.path}")
    row_step, col_step = first.pixel_spacing  # DICOM: between rows (y), between columns (x)
    origin = np.array(grid[0][0].position)
    for z, row in enumerate(grid):  # one affine holds only if every slice sits on the normal through the first
        for img in row:
            shift = np.array(img.position) - origin - (float(np.dot(img.position, normal)) - positions[0]) * normal
            if np.abs(shift).max() > 0.5 * min(row_step, col_step):
                raise DataError(f"{where}: {img.path} is shifted in its plane by {np.round(shift, 2).tolist()} mm "
                                f"from the first slice location ({grid[0][0].path}); one affine cannot hold the stack")
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_step  # +1 column (NIfTI X)
    lps[:3, 1] = col_dir * row_step  # +1 row (NIfTI Y)
    lps[:3, 2] = normal * dz  # +1 slice location (NIfTI Z)
    lps[:3, 3] = grid[0][0].position
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS -> NIfTI's RAS
    return DicomSeries(first.patient, first.series, first.series_number, grid,
                       (float(dz), float(row_step), float(col_step)), affine)


# ---------------------------------------------------------------------------------------------- source
class Dicom(Source):
    layout = "dicom"
    description = ("DICOM files as a scanner exports them, at any depth (grouped by PatientID and "
                   "SeriesInstanceUID, ordered by the headers); Sunnybrook's contourfiles/ and link.csv beside "
                   "dicoms/ label LV and MYO")
    labels = ACDC_LABELS
    has_spacing = True

    @classmethod
    def matches(cls, folder):
        probes = 0
        for path in Path(folder).rglob("*"):
            if path.name.startswith(".") or path.suffix.lower() in NOT_DICOM or not path.is_file():
                continue
            if is_dicom(path):
                return True
            probes += 1
            if probes >= MAX_PROBES:
                return False
        return False

    # ---- headers and series
    @cached_property
    def headers(self) -> list[DicomImage]:
        paths = sorted(p for p in self.folder.rglob("*") if p.is_file() and is_dicom(p))
        return [read_header(p, self.folder) for p in paths]

    @cached_property
    def _series_images(self) -> dict[str, dict[str, list[DicomImage]]]:
        """``{patient: {SeriesInstanceUID: images}}`` of the MR series, localisers left out (a warning names
        what is skipped)."""
        grouped: dict[tuple[str, str], list[DicomImage]] = defaultdict(list)
        for img in self.headers:
            grouped[(img.patient, img.series)].append(img)
        out: dict[str, dict[str, list[DicomImage]]] = defaultdict(dict)
        for (patient, uid), images in sorted(grouped.items()):
            modalities = {img.modality for img in images}
            if "MR" not in modalities:
                log.warning("dicom: skipping series %s of patient %s: modality %s, not MR (%s)", uid, patient,
                            sorted(modalities), _names([i.path for i in images], 3))
                continue
            localisers = [img for img in images if img.localiser]
            if len(localisers) == len(images):
                log.warning("dicom: skipping localiser series %s of patient %s (%s)", uid, patient,
                            _names([i.path for i in images], 3))
                continue
            if localisers:
                log.warning("dicom: skipping %d localiser image(s) inside series %s of patient %s: %s",
                            len(localisers), uid, patient, _names([i.path for i in localisers]))
            out[patient][uid] = [img for img in images if not img.localiser]
        return dict(out)

    def series(self, patient: str) -> list[DicomSeries]:
        """The patient's series, in order (errors name the files of an inconsistent one)."""
        self._select([patient])
        return self._assembled(patient)

    def _assembled(self, patient: str) -> list[DicomSeries]:
        cache = self.__dict__.setdefault("_series_cache", {})
        if patient not in cache:
            found = [assemble_series(images) for images in self._series_images[patient].values()]
            cache[patient] = sorted(found, key=lambda s: (s.number is None, s.number or 0, s.uid))
        return cache[patient]

    def patients(self):
        return sorted(self._series_images)

    def _case(self, series: DicomSeries, n_series: int) -> str:
        if n_series == 1:
            return series.patient
        return f"{series.patient}_s{series.number if series.number is not None else series.uid[-8:]}"

    def case_of(self, vol):
        return vol.meta["case"]

    # ---- labels (Sunnybrook)
    @cached_property
    def contours(self) -> SunnybrookContours | None:
        return SunnybrookContours.find(self.folder)

    def _contoured(self, patient: str, series: list[DicomSeries]) -> dict[int, dict[int, dict[str, Path]]]:
        return {} if self.contours is None else self.contours.place(patient, series)

    def _labelled(self, series: DicomSeries, case: str,
                  contoured: dict[int, dict[int, dict[str, Path]]]) -> list[CardiacVolume]:
        out, phases = [], SunnybrookContours.phases(contoured)
        for t, by_slice in sorted(contoured.items()):
            slices = sorted(by_slice)
            labelled = [SunnybrookContours.label(by_slice[z], series.shape[2:]) for z in slices]
            label = np.stack([lab for lab, _ in labelled])
            used = [files for _, files in labelled]
            myo_labelled = ["o" in files for files in used]
            meta = self._meta(series, case, t) | {
                "slices": slices, "unlabelled": ("RV",) if all(myo_labelled) else ("RV", "MYO"),
                "myo_labelled": myo_labelled, "contours": [str(p) for files in used for p in files.values()]}
            out.append(CardiacVolume(series.patient, phases.get(t, f"F{t + 1:02d}"),
                                     _check_image(series.frame(t, slices), series.folder),
                                     label, series.spacing, self.layout, series.folder, t + 1, None,
                                     dict(self.labels), meta))
        return out

    def _meta(self, series: DicomSeries, case: str, t: int) -> dict:
        meta = {"case": case, "series_uid": series.uid, "series_number": series.number, "affine": series.affine,
                "files": [str(row[t].path) for row in series.grid]}
        if self.contours is not None and series.patient in self.contours.link:
            meta["original_id"] = self.contours.link[series.patient]
        return meta

    # ---- the interface
    def scans(self, patients=None):
        """Each series: every frame, unlabelled (Sunnybrook's contours cover some slices of some frames only); the
        contoured frames of a Sunnybrook patient are ED and ES (``SunnybrookContours.phases``)."""
        for patient in self._select(patients):
            found = self._assembled(patient)
            phases = SunnybrookContours.phases(self._contoured(patient, found))
            for series in found:
                case = self._case(series, len(found))
                frames = series.frames()
                cine = len(frames) > 1
                vols = [CardiacVolume(patient, phases.get(t, f"F{t + 1:02d}") if cine else "3D",
                                      _check_image(frame, series.folder),
                                      None, series.spacing, self.layout, series.folder, t + 1 if cine else None,
                                      None, dict(self.labels), self._meta(series, case, t))
                        for t, frame in enumerate(frames)]
                yield Scan(case, series.folder, vols, cine=cine)

    def volumes(self, patients=None):
        """The contoured frames (their contoured slices) of a labelled patient; every frame of any other."""
        for patient in self._select(patients):
            found = self._assembled(patient)
            contoured = self._contoured(patient, found)
            if not contoured:
                for scan in self.scans([patient]):
                    yield from scan.frames
                continue
            series = found[0]
            yield from self._labelled(series, self._case(series, 1), contoured)

    def cine(self, patients=None):
        for scan in self.scans(patients):
            yield from scan.frames

    def n_slices(self, patient):
        """From the headers and the contour file names only (no pixel is read)."""
        self._select([patient])
        found = self._assembled(patient)
        contoured = self._contoured(patient, found)
        if contoured:
            return sum(len(by_slice) for by_slice in contoured.values())
        return sum(s.shape[0] * s.shape[1] for s in found)

    def files(self):
        out = [img.path for img in self.headers]
        return out + ([] if self.contours is None else self.contours.files())
