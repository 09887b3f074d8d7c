"""Sunnybrook Cardiac Data's hand-drawn contours (Radau et al. 2009) as labels of the ``dicom`` layout.

Where ``link.csv`` (``patient_id`` = the DICOM PatientID, ``original_id`` = the challenge's name) and
``contourfiles/<original_id>/{i,o}-contours/IM-0001-NNNN-{i,o}contour-manual.txt`` lie in the data folder (or beside
it, when the folder is ``dicoms/``), contour NNNN belongs to the image whose InstanceNumber is NNNN; each file holds
one "x y" point per line in that image's pixel coordinates. Filled, the inner contour (LV endocardium) is the LV
cavity (ACDC label 3) and the ring between the outer contour (epicardium) and the inner one the myocardium (2);
there is no RV label. An outer contour that leaves more than 5 % of its inner contour's cavity outside it is not
that image's epicardium: it is ignored with a warning naming both files (the shared copy's SC-HF-I-6 outer
contours are byte-identical to SC-HF-I-1's), and the slice labels the LV only, as slices with an inner contour
alone do (Sunnybrook's ES frames)."""
from __future__ import annotations

import csv
import logging
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from .base import DataError

log = logging.getLogger("cmr_utils.readers.dicom")  # one logger for what the dicom layout skips or ignores

CONTOUR_FILE = re.compile(r"IM-\d+-(?P<n>\d+)-(?P<kind>[io])contour-manual\.txt$")
MAX_LV_OUTSIDE = 0.05  # an outer contour leaving more of the inner contour's cavity outside is not its epicardium


def read_contour(path: Path) -> np.ndarray:
    """Points (N, 2) as (x column, y row) in pixels."""
    try:
        points = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as err:
        raise DataError(f"{path}: expected one 'x y' point per line ({err})") from err
    if points.shape[1] != 2 or len(points) < 3:
        raise DataError(f"{path}: expected at least 3 'x y' points, got an array of shape {points.shape}")
    return points


def fill_contour(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixels (rows, columns) whose centres lie inside the closed polygon ``points`` (x column, y row)."""
    from matplotlib.path import Path as Polygon

    rows, cols = np.mgrid[: shape[0], : shape[1]]
    centres = np.column_stack([cols.ravel(), rows.ravel()]).astype(np.float64)
    return Polygon(points, closed=False).contains_points(centres).reshape(shape)


class SunnybrookContours:
    """The contours of a Sunnybrook folder: ``find(folder)`` is None where the folder has none."""

    def __init__(self, root: Path):
        self.root = Path(root)
        link = self.root / "link.csv"
        with open(link, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"patient_id", "original_id"} <= set(rows[0]):
            raise DataError(f"{link}: expected columns patient_id, original_id; got {sorted(rows[0])}")
        self.link = {r["patient_id"].strip(): r["original_id"].strip() for r in rows}

    @classmethod
    def find(cls, folder: Path) -> SunnybrookContours | None:
        for root in (Path(folder), Path(folder).parent):
            if (root / "link.csv").is_file() and (root / "contourfiles").is_dir():
                return cls(root)
        return None

    def files(self) -> list[Path]:
        return [self.root / "link.csv", *sorted((self.root / "contourfiles").rglob("*contour-manual.txt"))]

    def contour_files(self, patient: str) -> dict[int, dict[str, Path]]:
        """``{InstanceNumber: {"i": inner file, "o": outer file}}`` ({} for a patient link.csv does not name)."""
        if patient not in self.link:
            return {}
        folder = self.root / "contourfiles" / self.link[patient]
        if not folder.is_dir():
            raise DataError(f"{self.root / 'link.csv'}: {patient} -> {self.link[patient]}, but {folder} does not exist")
        out: dict[int, dict[str, Path]] = defaultdict(dict)
        for path in sorted(folder.rglob("*contour-manual.txt")):
            m = CONTOUR_FILE.match(path.name)
            if m:
                out[int(m.group("n"))][m.group("kind")] = path
        return dict(out)

    def place(self, patient: str, series: list) -> dict[int, dict[int, dict[str, Path]]]:
        """``{phase t: {slice z: {"i": file[, "o": file]}}}`` of ``patient``'s one ``DicomSeries``, the images
        found by InstanceNumber; {} without contours."""
        contours = self.contour_files(patient)
        if not contours:
            return {}
        if len(series) != 1:
            raise DataError(f"{self.root}: patient {patient} has {len(series)} series; Sunnybrook's contours name "
                            "images by InstanceNumber, which is ambiguous across series")
        where: dict[int, tuple[int, int, Path]] = {}
        for z, row in enumerate(series[0].grid):
            for t, img in enumerate(row):
                if img.instance in where:
                    raise DataError(f"{img.path}: InstanceNumber {img.instance} also in {where[img.instance][2]}; "
                                    "contours cannot be placed")
                where[img.instance] = (t, z, img.path)
        out: dict[int, dict[int, dict[str, Path]]] = defaultdict(dict)
        for n, files in sorted(contours.items()):
            if n not in where:
                raise DataError(f"{', '.join(map(str, files.values()))}: no image with InstanceNumber {n} in "
                                f"patient {patient}")
            if "i" not in files:
                raise DataError(f"{files['o']}: an outer contour without the inner contour of its image")
            t, z, _ = where[n]
            out[t][z] = files
        return dict(out)

    @staticmethod
    def phases(contoured: dict[int, dict[int, dict[str, Path]]]) -> dict[int, str]:
        """``{t: "ED" / "ES"}`` where exactly two frames are contoured, as in the challenge (both contours at
        end-diastole, the inner one at end-systole): the frame of the larger LV cavity (the summed areas of its
        inner contours) is ED, the other ES; {} otherwise (the frames keep their cine names)."""
        if len(contoured) != 2:
            return {}

        def cavity(by_slice):  # shoelace area of each inner contour, pixels
            return sum(0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
                       for x, y in (read_contour(files["i"]).T for files in by_slice.values()))

        ed, es = sorted(contoured, key=lambda t: cavity(contoured[t]), reverse=True)
        return {ed: "ED", es: "ES"}

    @staticmethod
    def label(files: dict[str, Path], shape: tuple[int, int]) -> tuple[np.ndarray, dict[str, Path]]:
        """One slice's label (3 LV cavity, 2 myocardium where the outer contour is kept) and the contour files
        used (the outer one dropped, with a warning, when it does not surround the inner one)."""
        label = np.zeros(shape, dtype=np.uint8)
        inner = fill_contour(read_contour(files["i"]), shape)
        if "o" in files:
            outer = fill_contour(read_contour(files["o"]), shape)
            outside = float((inner & ~outer).sum()) / max(int(inner.sum()), 1)
            if outside > MAX_LV_OUTSIDE:
                log.warning("dicom: ignoring the outer contour %s: %.0f%% of the LV cavity of %s lies outside it "
                            "(not this image's epicardium); this slice labels the LV only",
                            files["o"], 100 * outside, files["i"])
                files = {"i": files["i"]}
            else:
                label[outer & ~inner] = 2
        label[inner] = 3
        return label, files
