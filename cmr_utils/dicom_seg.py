"""A prediction as a DICOM Segmentation object (``make predict DICOM_SEG=1``), for viewers and archives.

``write_segmentations(scan, labels, folder, algorithm, version)`` writes the DICOM-SEG (highdicom, BINARY) of
a scan read by the DICOM layout (``cmr_utils.readers.dicom``): one SEG series per source series, one instance per
cardiac phase (``<case>_seg_F01.dcm``...; ``<case>_seg.dcm`` for a single-phase series), since highdicom puts one
frame per image position in an instance. Every frame of a SEG references its source image by SOP Instance UID
and carries that image's position, so OHIF, 3D Slicer's DICOM module or a PACS place it on the series. The segments are ACDC's labels with their SNOMED CT codes: 1 RV (right ventricle), 2 MYO (left
ventricle myocardium), 3 LV (left ventricle, its cavity here). Frames without any label are left out of the SEG
(highdicom's default); readers give them as empty.

``check_scan(scan)`` reads the headers a SEG needs (the study, series and instance UIDs, the frame of reference)
and names the file that lacks one, so that ``make predict`` refuses before it predicts anything. Patient and
study attributes the standard lets be empty (PatientName, StudyDate...) are copied empty where a file has none,
and so are dates that are not dates (Sunnybrook's birth date 00000000). A series whose images carry different
FrameOfReferenceUIDs (Sunnybrook's: its anonymiser replaced each one) gets the first image's, with a warning.
The UIDs of the SEG are derived from the source series, the algorithm and the labels: the same prediction
gives the same file.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from .readers import DataError, Scan

# (number = ACDC label, label, SNOMED CT type in pydicom's codes.SCT, display colour CIELab)
SEGMENTS = ((1, "RV", "RightVentricle", (55.0, -10.0, -45.0)),
            (2, "MYO", "LeftVentricleMyocardium", (50.0, 60.0, 40.0)),
            (3, "LV", "LeftVentricle", (85.0, -5.0, 75.0)))
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")
EMPTY_ALLOWED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")  # Type 2: present, possibly empty
DATES = ("PatientBirthDate", "StudyDate")  # emptied where not a date (Sunnybrook's 00000000, 20120000)
SERIES_NUMBER = 900  # of the SEG series; the source's number is in its SeriesInstanceUID reference
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root, as pydicom.uid.generate_uid uses


def source_files(scan: Scan) -> list[Path]:
    """The scan's DICOM files in the SEG's frame order: phase after phase, each from the first slice location to
    the last (the order of the NIfTI mask's (Z, T) axes)."""
    if any("files" not in vol.meta for vol in scan.frames):
        raise DataError(f"{scan.path}: not read from DICOM files; a DICOM-SEG references DICOM source images")
    return [Path(f) for vol in scan.frames for f in vol.meta["files"]]


def _headers(scan: Scan) -> list:
    from .readers.dicom import _dcmread, _lenient

    with _lenient():
        return [_dcmread(path, stop_before_pixels=True) for path in source_files(scan)]


def check_scan(scan: Scan) -> None:
    """A DataError naming the first file of ``scan`` without a header a DICOM-SEG needs, or of another study; a
    warning where the images of the series do not share one frame of reference."""
    from .readers.dicom import _lenient

    with _lenient():  # values are checked on first use: Sunnybrook's UIDs have leading zeros
        _check_headers(scan)


def _check_headers(scan: Scan) -> None:
    from .readers.dicom import ORIENTATION_TOL

    study, frames_of_reference, orientation = None, set(), None
    for path, ds in zip(source_files(scan), _headers(scan)):
        missing = [k for k in REQUIRED if not str(ds.get(k, "") or "").strip()]
        if missing:
            raise DataError(f"{path}: no {', '.join(missing)}; a DICOM-SEG must reference the image's study, "
                            "series and frame of reference (drop --dicom-seg / DICOM_SEG=1 to write NIfTI only)")
        study = study or ds.StudyInstanceUID
        if ds.StudyInstanceUID != study:
            raise DataError(f"{path}: StudyInstanceUID {ds.StudyInstanceUID} differs from the rest of its series "
                            f"({study}); a DICOM-SEG references one study")
        frames_of_reference.add(str(ds.FrameOfReferenceUID))
        cosines = np.asarray(ds.get("ImageOrientationPatient", [np.nan] * 6), dtype=float)
        orientation = cosines if orientation is None else orientation
        if not np.abs(cosines - orientation).max() <= ORIENTATION_TOL:
            raise DataError(f"{path}: ImageOrientationPatient {list(cosines)} differs from the series' first image "
                            f"({list(orientation)}); a DICOM-SEG needs one orientation per series")
    if len(frames_of_reference) > 1:
        warnings.warn(f"{scan.path}: {len(frames_of_reference)} FrameOfReferenceUIDs in one series (the standard has "
                      "one per series; an anonymiser that replaced every UID does this); its DICOM-SEG takes the "
                      f"first image's, {source_files(scan)[0]}, for every frame (the positions agree: the reader "
                      "checked them)", stacklevel=3)


def _valid_date(value) -> bool:
    import datetime

    try:
        datetime.datetime.strptime(str(value or ""), "%Y%m%d")
    except ValueError:
        return False
    return True


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(prefix=UID_PREFIX, entropy_srcs=list(parts))


def file_names(scan: Scan) -> list[str]:
    """The SEG files of ``scan``: ``<case>_seg.dcm``, or for a cine ``<case>_seg_F01.dcm``... one per phase."""
    if not scan.cine:
        return [f"{scan.case}_seg.dcm"]
    return [f"{scan.case}_seg_F{t:02d}.dcm" for t in range(1, len(scan.frames) + 1)]


def write_segmentations(scan: Scan, labels: np.ndarray, folder: Path, algorithm: str, version: str) -> list[Path]:
    """Write ``labels`` (T, Z, H, W) in ACDC's labels, on ``scan``'s DICOM grid, as DICOM-SEG into ``folder``: one
    SEG series per source series, one instance per cardiac phase (InstanceNumber = phase; highdicom puts one
    segmentation frame per image position in an instance), named by ``file_names``."""
    from pydicom import config

    from .readers.dicom import _lenient

    labels = np.asarray(labels, dtype=np.uint8)
    writing = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE  # the source's UIDs are referenced as they are
    try:
        with _lenient(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
            return _write(scan, labels, Path(folder), algorithm, version)
    finally:
        config.settings.writing_validation_mode = writing


def _write(scan: Scan, labels: np.ndarray, folder: Path, algorithm: str, version: str) -> list[Path]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    datasets = _headers(scan)
    n_slices = labels.shape[1]
    if labels.shape[0] != len(scan.frames) or len(datasets) != labels.shape[0] * n_slices:
        raise ValueError(f"{scan.path}: labels of shape {labels.shape} for {len(scan.frames)} phase(s) of "
                         f"{len(datasets)} source images")
    frame_of_reference = datasets[0].FrameOfReferenceUID  # one per series (check_scan warns where it is not)
    # one orientation: the reader allowed direction cosines that differ by up to ORIENTATION_TOL (scanner rounding,
    # Sunnybrook's SCD0000201), highdicom compares them exactly
    orientation = datasets[0].ImageOrientationPatient
    for ds in datasets:  # headers only, in memory: the source files are never written to
        ds.FrameOfReferenceUID = frame_of_reference
        ds.ImageOrientationPatient = orientation
        for keyword in EMPTY_ALLOWED:
            if keyword not in ds or (keyword in DATES and not _valid_date(ds[keyword].value)):
                setattr(ds, keyword, "")
    algorithm_id = hd.AlgorithmIdentificationSequence(name=algorithm, version=version,
                                                      family=codes.DCM.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(number, label, codes.SCT.AnatomicalStructure, getattr(codes.SCT, code),
                                          hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_id,
                                          display_color=hd.color.CIELabColor(*lab))
                for number, label, code, lab in SEGMENTS]
    series = str(datasets[0].SeriesInstanceUID)
    written = []
    for t, name in enumerate(file_names(scan)):
        phase = labels[t]
        digest = hashlib.sha256(phase.tobytes()).hexdigest()
        seg = hd.seg.Segmentation(
            source_images=datasets[t * n_slices:(t + 1) * n_slices], pixel_array=phase,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
            series_instance_uid=_uid(series, algorithm, "series"), series_number=SERIES_NUMBER,
            sop_instance_uid=_uid(series, algorithm, str(t), digest), instance_number=t + 1,
            manufacturer="cmr_utils", manufacturer_model_name=algorithm[:64], software_versions=version,
            device_serial_number="none", content_label="HEART",
            content_description=f"RV, LV myocardium, LV by {algorithm}"[:64],
            series_description=f"Segmentation {algorithm}"[:64])
        seg.save_as(folder / name)
        written.append(folder / name)
    return written
