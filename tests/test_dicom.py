"""The DICOM layout (cmr_utils.readers.dicom): synthetic series written here with pydicom (shuffled file names and
InstanceNumbers, an oblique orientation, known positions and spacing) whose pixels encode their slice and phase,
every inconsistent series it must refuse, Sunnybrook-style contours, and the real Sunnybrook data where
CMR_SUNNYBROOK_DIR names it."""
import logging
import random
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402

from cmr_utils.readers import DataError, Dicom, open_source  # noqa: E402
from cmr_utils.readers.sunnybrook import fill_contour  # noqa: E402

ROW_DIR = np.array([1.0, 1.0, 0.0]) / np.sqrt(2)  # oblique: image rows run along (x + y)
COL_DIR = np.array([0.0, 0.0, -1.0])
NORMAL = np.cross(ROW_DIR, COL_DIR)
ORIGIN = np.array([-20.0, 35.5, 60.0])
PIXEL = (1.5, 1.25)  # DICOM PixelSpacing: between rows, between columns
GAP = 8.0


def code(z: int, t: int, rows: int, cols: int) -> np.ndarray:
    """A frame whose values say where it belongs: 1000 (z + 1) + 10 t, plus the row index (< 10)."""
    return (1000 * (z + 1) + 10 * t + np.arange(rows)[:, None] + np.zeros((1, cols))).astype(np.uint16)


def dicom_image(path: Path, *, z: int, t: int, instance: int, series_uid: str, patient="P1", rows=8, cols=6,
                modality="MR", orientation=None, image_type=("ORIGINAL", "PRIMARY", "M"), trigger=True,
                series_number=5, position=None):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality, ds.ImageType = patient, modality, list(image_type)
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, series_number, instance
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient, "study"])  # one study per patient
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[series_uid, "frame of reference"])  # one per series
    ds.ImageOrientationPatient = [float(v) for v in (orientation if orientation is not None
                                                     else np.concatenate([ROW_DIR, COL_DIR]))]
    pos = ORIGIN + z * GAP * NORMAL if position is None else np.asarray(position)
    ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
    ds.PixelSpacing = list(PIXEL)
    ds.SliceThickness = GAP
    if trigger:
        ds.TriggerTime = 40.0 * t + 0.3 * z  # each slice from its own heartbeats: slightly different times
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = code(z, t, rows, cols).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def write_series(folder: Path, n_slices=3, n_phases=4, seed=0, series_uid=None, **kwargs) -> dict:
    """Files with shuffled names and InstanceNumbers (``trigger=False``: InstanceNumbers in phase order within a
    slice, as the fallback needs); returns ``{(z, t): path}``."""
    rng = random.Random(seed)
    series_uid = series_uid or generate_uid()
    cells = [(z, t) for z in range(n_slices) for t in range(n_phases)]
    names = [f"IMG{rng.randrange(10**6):06d}_{i}" for i in range(len(cells))]  # no suffix, as scanners often do
    rng.shuffle(names)
    instances = list(range(1, len(cells) + 1))
    if kwargs.get("trigger", True):
        rng.shuffle(instances)
    else:  # phase order within each slice; slices in reverse so that InstanceNumber does not follow position
        instances = [(n_slices - 1 - z) * n_phases + t + 1 for z, t in cells]
    out = {}
    for (z, t), name, instance in zip(cells, names, instances):
        out[(z, t)] = folder / name
        dicom_image(folder / name, z=z, t=t, instance=instance, series_uid=series_uid, **kwargs)
    return out


def decoded(image: np.ndarray) -> list[tuple[int, int]]:
    """(z, t) of each slice of a (Z, H, W) frame made by ``code``."""
    return [(int(v) // 1000 - 1, (int(v) % 1000) // 10) for v in image[:, 0, 0]]


# ---------------------------------------------------------------------------------------------- order and geometry
def test_series_ordered_by_position_and_trigger_time(tmp_path):
    files = write_series(tmp_path / "scan", n_slices=3, n_phases=4)
    src = open_source(tmp_path / "scan")
    assert isinstance(src, Dicom) and src.layout == "dicom" and src.patients() == ["P1"]
    (scan,) = list(src.scans())
    assert scan.cine and scan.case == "P1" and len(scan.frames) == 4
    for t, vol in enumerate(scan.frames):
        assert vol.image.shape == (3, 8, 6) and vol.image.dtype == np.float32 and vol.label is None
        assert decoded(vol.image) == [(z, t) for z in range(3)]
        assert vol.phase == f"F{t + 1:02d}" and vol.frame == t + 1 and vol.patient == "P1"
        np.testing.assert_allclose(vol.image[1], code(1, t, 8, 6))
        assert vol.meta["files"] == [str(files[(z, t)]) for z in range(3)]
    assert scan.frames[0].spacing == pytest.approx((GAP, PIXEL[0], PIXEL[1]))
    assert src.n_slices("P1") == 12 and len(list(src.volumes())) == 4 and len(list(src.cine())) == 4
    assert sorted(src.files()) == sorted(files.values())


def test_affine_maps_voxels_to_the_headers_positions(tmp_path):
    write_series(tmp_path, n_slices=3, n_phases=2)
    affine = next(Dicom(tmp_path).scans()).frames[0].meta["affine"]
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    for z in range(3):
        for r, c in [(0, 0), (7, 0), (0, 5), (3, 4)]:
            lps = ORIGIN + z * GAP * NORMAL + c * PIXEL[1] * ROW_DIR + r * PIXEL[0] * COL_DIR
            np.testing.assert_allclose(affine @ [c, r, z, 1], [*(lps * lps_to_ras), 1], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [PIXEL[1], PIXEL[0], GAP], atol=1e-4)


def test_instance_number_orders_phases_without_trigger_time(tmp_path):
    write_series(tmp_path, n_slices=2, n_phases=3, trigger=False, seed=4)
    frames = next(Dicom(tmp_path).scans()).frames
    assert [decoded(v.image) for v in frames] == [[(0, t), (1, t)] for t in range(3)]


def test_single_phase_series_is_one_volume_with_thickness_spacing(tmp_path):
    write_series(tmp_path, n_slices=1, n_phases=1)
    (scan,) = list(Dicom(tmp_path).scans())
    assert not scan.cine and scan.frames[0].phase == "3D" and scan.frames[0].image.shape == (1, 8, 6)
    assert scan.frames[0].spacing == pytest.approx((GAP, *PIXEL))


def test_any_depth_patients_and_series(tmp_path):
    write_series(tmp_path / "site" / "a" / "b", patient="P1", n_slices=2, n_phases=2)
    write_series(tmp_path / "site" / "c", patient="P2", n_slices=2, n_phases=3, series_number=6, seed=1)
    write_series(tmp_path / "site" / "d", patient="P2", n_slices=3, n_phases=1, series_number=2, seed=2)
    (tmp_path / "site" / "notes.txt").write_text("not DICOM")
    src = open_source(tmp_path)
    assert src.layout == "dicom" and src.patients() == ["P1", "P2"]
    scans = list(src.scans(["P2"]))
    assert [(s.case, len(s.frames), s.frames[0].image.shape[0]) for s in scans] == [("P2_s2", 1, 3), ("P2_s6", 3, 2)]
    assert scans[1].path == tmp_path / "site" / "c" and src.case_of(scans[1].frames[0]) == "P2_s6"
    assert src.n_slices("P2") == 3 + 3 * 2


def test_nifti_folder_is_not_dicom(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(tmp_path / "case.nii.gz"))
    assert not Dicom.matches(tmp_path)
    assert open_source(tmp_path).layout == "nifti-pairs"


# ---------------------------------------------------------------------------------------------- inconsistent series
def test_missing_phase_is_an_error_naming_the_slice_files(tmp_path):
    files = write_series(tmp_path, n_slices=3, n_phases=4)
    files[(1, 2)].unlink()
    with pytest.raises(DataError, match="missing or extra phases") as err:
        list(Dicom(tmp_path).scans())
    assert str(files[(1, 0)]) in str(err.value) and "3 image(s)" in str(err.value)


def test_mixed_sizes_are_an_error_naming_the_file(tmp_path):
    files = write_series(tmp_path, n_slices=2, n_phases=2, series_uid="1.2.3.4")
    dicom_image(files[(0, 1)], z=0, t=1, instance=99, series_uid="1.2.3.4", rows=10)
    with pytest.raises(DataError, match="different sizes") as err:
        list(Dicom(tmp_path).scans())
    assert "10x6" in str(err.value) and str(files[(0, 1)]) in str(err.value)


def test_mixed_orientations_are_an_error_naming_the_file(tmp_path):
    files = write_series(tmp_path, n_slices=2, n_phases=2, series_uid="1.2.3.4")
    dicom_image(files[(1, 1)], z=1, t=1, instance=99, series_uid="1.2.3.4", orientation=[1, 0, 0, 0, 1, 0])
    with pytest.raises(DataError, match="mixed orientations") as err:
        list(Dicom(tmp_path).scans())
    assert str(files[(1, 1)]) in str(err.value)


def test_missing_slice_location_is_an_error(tmp_path):
    files = write_series(tmp_path, n_slices=4, n_phases=2)
    for t in range(2):
        files[(2, t)].unlink()
    with pytest.raises(DataError, match="uneven slice gaps") as err:
        list(Dicom(tmp_path).scans())
    assert str(files[(1, 0)]) in str(err.value) and str(files[(3, 0)]) in str(err.value)


def test_slice_shifted_in_plane_is_an_error(tmp_path):
    files = write_series(tmp_path, n_slices=3, n_phases=1, series_uid="1.2.3.4")
    dicom_image(files[(2, 0)], z=2, t=0, instance=9, series_uid="1.2.3.4",
                position=ORIGIN + 2 * GAP * NORMAL + 3.0 * ROW_DIR)
    with pytest.raises(DataError, match="shifted in its plane") as err:
        list(Dicom(tmp_path).scans())
    assert str(files[(2, 0)]) in str(err.value)


def test_duplicate_trigger_time_is_an_error(tmp_path):
    files = write_series(tmp_path, n_slices=2, n_phases=2, series_uid="1.2.3.4")
    dicom_image(tmp_path / "repeat", z=0, t=1, instance=50, series_uid="1.2.3.4")
    for t in range(2):  # keep every location at three images, so that only the repeat is wrong
        dicom_image(tmp_path / f"extra{t}", z=1, t=t + 5, instance=60 + t, series_uid="1.2.3.4")
    files[(1, 1)].unlink()
    with pytest.raises(DataError, match="same TriggerTime") as err:
        list(Dicom(tmp_path).scans())
    assert str(tmp_path / "repeat") in str(err.value) and str(files[(0, 1)]) in str(err.value)


def test_non_mr_image_inside_a_series_is_an_error(tmp_path):
    write_series(tmp_path, n_slices=2, n_phases=2, series_uid="1.2.3.4")
    dicom_image(tmp_path / "ct", z=0, t=7, instance=70, series_uid="1.2.3.4", modality="CT")
    with pytest.raises(DataError, match=r"non-MR images \(\['CT'\]\)") as err:
        list(Dicom(tmp_path).scans())
    assert str(tmp_path / "ct") in str(err.value)


def test_non_mr_and_localiser_series_are_skipped_with_a_warning(tmp_path, caplog):
    write_series(tmp_path / "cine", n_slices=2, n_phases=2, series_uid="1.2.3.4")
    ct = write_series(tmp_path / "ct", n_slices=2, n_phases=1, modality="CT", series_uid="9.9.1")
    loc = write_series(tmp_path / "loc", n_slices=3, n_phases=1, series_uid="9.9.2",
                       image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    with caplog.at_level(logging.WARNING, logger="cmr_utils.readers.dicom"):
        src = Dicom(tmp_path)
        assert src.patients() == ["P1"]
        (scan,) = list(src.scans())
    assert scan.frames[0].meta["series_uid"] == "1.2.3.4" and len(scan.frames) == 2
    assert "modality ['CT'], not MR" in caplog.text and str(ct[(0, 0)].parent) in caplog.text
    assert "localiser series 9.9.2" in caplog.text and str(loc[(0, 0)].parent) in caplog.text


def test_only_non_mr_is_no_patient(tmp_path):
    write_series(tmp_path, n_slices=2, n_phases=1, modality="CT")
    with pytest.raises(DataError, match="no patients found for layout dicom"):
        open_source(tmp_path)


def test_localiser_image_inside_a_series_is_skipped_with_a_warning(tmp_path, caplog):
    write_series(tmp_path, n_slices=2, n_phases=2, series_uid="1.2.3.4")
    dicom_image(tmp_path / "scout", z=0, t=0, instance=40, series_uid="1.2.3.4", orientation=[1, 0, 0, 0, 1, 0],
                image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    with caplog.at_level(logging.WARNING, logger="cmr_utils.readers.dicom"):
        (scan,) = list(Dicom(tmp_path).scans())
    assert [decoded(v.image) for v in scan.frames] == [[(0, t), (1, t)] for t in range(2)]
    assert "1 localiser image(s)" in caplog.text and str(tmp_path / "scout") in caplog.text


def test_unflagged_localiser_is_an_orientation_error(tmp_path):
    write_series(tmp_path, n_slices=2, n_phases=2, series_uid="1.2.3.4")
    dicom_image(tmp_path / "scout", z=0, t=0, instance=40, series_uid="1.2.3.4", orientation=[1, 0, 0, 0, 1, 0])
    with pytest.raises(DataError, match="mixed orientations") as err:
        list(Dicom(tmp_path).scans())
    assert str(tmp_path / "scout") in str(err.value)


# ---------------------------------------------------------------------------------------------- transfer syntaxes
def test_rle_compressed_series_decodes(tmp_path):
    from pydicom.uid import RLELossless

    files = write_series(tmp_path, n_slices=2, n_phases=2)
    for path in files.values():
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(files[(0, 0)]).file_meta.TransferSyntaxUID == RLELossless
    frames = next(Dicom(tmp_path).scans()).frames
    np.testing.assert_array_equal(frames[1].image[0], code(0, 1, 8, 6))


def test_undecodable_pixel_data_names_file_and_transfer_syntax(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    files = write_series(tmp_path, n_slices=2, n_phases=2)
    ds = pydicom.dcmread(files[(1, 0)])
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(60)])  # a JPEG 2000 marker, then nothing decodable
    ds["PixelData"].VR = "OB"
    ds.save_as(files[(1, 0)], enforce_file_format=True)
    with pytest.raises(DataError, match="transfer syntax JPEG 2000 Image Compression \\(Lossless Only\\)") as err:
        list(Dicom(tmp_path).scans())
    assert str(files[(1, 0)]) in str(err.value)


# ---------------------------------------------------------------------------------------------- Sunnybrook contours
def square(x0, y0, x1, y1) -> str:
    return "\n".join(f"{x:.2f} {y:.2f}" for x, y in [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]) + "\n"


def test_sunnybrook_contours_become_lv_and_myo_labels(tmp_path):
    root = tmp_path / "Sunnybrook"
    files = write_series(root / "dicoms" / "SCD01", patient="SCD01", n_slices=3, n_phases=4, rows=20, cols=16)
    instance = {zt: int(pydicom.dcmread(p).InstanceNumber) for zt, p in files.items()}
    (root / "link.csv").write_text("patient_id,original_id\nSCD01,SC-X-1\n")
    contours = root / "contourfiles" / "SC-X-1"
    (contours / "i-contours").mkdir(parents=True)
    (contours / "o-contours").mkdir()
    for z in (1, 2):  # phase 3: inner and outer on slices 1 and 2; phase 1: inner only, slice 2
        n = instance[(z, 3)]
        (contours / "i-contours" / f"IM-0001-{n:04d}-icontour-manual.txt").write_text(square(4.5, 5.5, 9.5, 11.5))
        (contours / "o-contours" / f"IM-0001-{n:04d}-ocontour-manual.txt").write_text(square(2.5, 3.5, 11.5, 13.5))
    n = instance[(2, 1)]
    (contours / "i-contours" / f"IM-0001-{n:04d}-icontour-manual.txt").write_text(square(5.5, 6.5, 8.5, 9.5))

    for folder in (root, root / "dicoms"):  # the root, or its dicoms/ with link.csv beside it
        src = open_source(folder)
        assert src.layout == "dicom" and src.patients() == ["SCD01"] and src.n_slices("SCD01") == 3
        vols = list(src.volumes())
        assert [(v.phase, v.frame, v.meta["slices"], v.meta["unlabelled"]) for v in vols] == [
            ("ES", 2, [2], ("RV", "MYO")), ("ED", 4, [1, 2], ("RV",))]
        es, ed = vols
        assert decoded(ed.image) == [(1, 3), (2, 3)] and decoded(es.image) == [(2, 1)]
        assert ed.meta["myo_labelled"] == [True, True] and es.meta["myo_labelled"] == [False]
        assert ed.meta["original_id"] == "SC-X-1" and ed.spacing == pytest.approx((GAP, *PIXEL))
        # pixel centres inside the squares: columns 5..9 x rows 6..11 (LV), columns 3..11 x rows 4..13 (outer)
        lv = np.zeros((20, 16), bool)
        lv[6:12, 5:10] = True
        outer = np.zeros((20, 16), bool)
        outer[4:14, 3:12] = True
        for k in range(2):
            np.testing.assert_array_equal(ed.label[k] == 3, lv)
            np.testing.assert_array_equal(ed.label[k] == 2, outer & ~lv)
        assert set(np.unique(es.label)) == {0, 3} and (es.label[0] == 3).sum() == 3 * 3
        (scan,) = list(src.scans())
        assert all(v.label is None for v in scan.frames)  # the cine stays unlabelled
        assert [v.phase for v in scan.frames] == ["F01", "ES", "F03", "ED"]
        assert len(list(src.cine())) == 4
        assert root / "link.csv" in src.files() and len(src.files()) == 12 + 1 + 5

    # external scoring leaves out what the contours do not label: RV everywhere, MYO at ES
    from cmr_utils.evaluate import score_source

    def segment(vol):  # the truth, plus an "RV" the labels know nothing of
        pred = vol.label.copy() if vol.label is not None else np.zeros(vol.image.shape, np.uint8)
        pred[:, 0:2, 0:2] = 1
        return pred

    scored = score_source(segment, src)
    per_volume = scored["per_volume"]
    assert sorted(zip(per_volume["phase"], per_volume["structure"])) == [("ED", "LV"), ("ED", "MYO"), ("ES", "LV")]
    assert np.allclose(per_volume["dice"], 1.0)
    (ef,) = scored["ef"].itertuples()
    assert ef.structure == "LV" and ef.ef_true == pytest.approx(100 * (60 - 9) / 60) and ef.ef_pred == ef.ef_true


def test_outer_contour_not_around_the_inner_one_is_ignored(tmp_path, caplog):
    files = write_series(tmp_path / "dicoms" / "A", patient="A", n_slices=1, n_phases=2, rows=20, cols=16)
    n = int(pydicom.dcmread(files[(0, 1)]).InstanceNumber)
    (tmp_path / "link.csv").write_text("patient_id,original_id\nA,SC-A\n")
    for kind, box in (("i", (4.5, 5.5, 9.5, 11.5)), ("o", (8.5, 3.5, 15.5, 13.5))):  # 2 of 5 LV columns inside
        path = tmp_path / "contourfiles" / "SC-A" / f"{kind}-contours" / f"IM-0001-{n:04d}-{kind}contour-manual.txt"
        path.parent.mkdir(parents=True)
        path.write_text(square(*box))
    with caplog.at_level(logging.WARNING, logger="cmr_utils.readers.dicom"):
        (vol,) = list(open_source(tmp_path).volumes())
    assert "ignoring the outer contour" in caplog.text and f"IM-0001-{n:04d}-ocontour" in caplog.text
    assert vol.meta["myo_labelled"] == [False] and set(np.unique(vol.label)) == {0, 3} and (vol.label == 3).sum() == 30


def test_contour_without_its_image_is_an_error(tmp_path):
    write_series(tmp_path / "dicoms" / "A", patient="A", n_slices=2, n_phases=2)
    (tmp_path / "link.csv").write_text("patient_id,original_id\nA,SC-A\n")
    bad = tmp_path / "contourfiles" / "SC-A" / "i-contours" / "IM-0001-0099-icontour-manual.txt"
    bad.parent.mkdir(parents=True)
    bad.write_text(square(1, 1, 3, 3))
    with pytest.raises(DataError, match="no image with InstanceNumber 99") as err:
        list(open_source(tmp_path).volumes())
    assert str(bad) in str(err.value)


def test_fill_contour_counts_pixel_centres():
    inside = fill_contour(np.array([[1.5, 1.5], [4.5, 1.5], [4.5, 3.5], [1.5, 3.5]]), (6, 7))
    assert inside.sum() == 3 * 2 and inside[2:4, 2:5].all()


# ---------------------------------------------------------------------------------------------- the real data
SUNNYBROOK = {  # patient: (slice locations, slice gap mm, pixel mm, contoured frames (ES, ED))
    "SCD0000101": (12, 10.0, 1.367188, (8, 19)),
    "SCD0000201": (13, 10.0, 1.367188, None),
    "SCD0000301": (10, 8.0, 1.2891, None),
    "SCD0000401": (11, 8.0, 1.3672, None),
    "SCD0000501": (11, 8.0, 1.3672, (9, 19)),
}


MYO_SLICES = {"SCD0000101": 9, "SCD0000201": 9, "SCD0000301": 10, "SCD0000401": 9,
              "SCD0000501": 0}  # SC-HF-I-6's outer contours are copies of SC-HF-I-1's: ignored


@pytest.fixture(scope="module")
def sunnybrook():
    from conftest import real_dir

    return open_source(real_dir("CMR_SUNNYBROOK_DIR"))


def test_sunnybrook_cines(sunnybrook):
    assert sunnybrook.layout == "dicom" and sunnybrook.patients() == sorted(SUNNYBROOK)
    for patient, (n_slices, gap, pixel, _) in SUNNYBROOK.items():
        (series,) = sunnybrook.series(patient)
        assert series.shape == (20, n_slices, 256, 256)
        assert series.spacing == pytest.approx((gap, pixel, pixel), abs=1e-3)
        times = [[img.trigger_time for img in row] for row in series.grid]
        assert all(a < b for row in times for a, b in zip(row, row[1:]))
    frames = list(sunnybrook.cine(["SCD0000101"]))
    assert len(frames) == 20 and frames[0].image.shape == (12, 256, 256) and frames[0].label is None


def test_sunnybrook_labels_land_on_their_frames(sunnybrook):
    from cmr_utils.readers.dicom import read_pixels
    from cmr_utils.readers.sunnybrook import read_contour

    root = Path(sunnybrook.folder)
    n_labelled = n_both = n_touching = 0
    for patient, (_, _, _, frames) in SUNNYBROOK.items():
        vols = list(sunnybrook.volumes([patient]))
        assert len(vols) == 2
        assert [v.phase for v in vols] == (["ES", "ED"] if vols[0].frame < vols[1].frame else ["ED", "ES"])
        es, ed = sorted(vols, key=lambda v: v.phase != "ES")
        assert any("o-contours" in c for c in ed.meta["contours"]) or patient == "SCD0000501"
        assert not any("o-contours" in c for c in es.meta["contours"])
        if frames is not None:
            assert (es.frame, ed.frame) == frames
        assert es.meta["unlabelled"] == ("RV", "MYO") and not any(es.meta["myo_labelled"])
        assert sum(ed.meta["myo_labelled"]) == MYO_SLICES[patient]
        assert (ed.label == 3).sum() > (es.label == 3).sum()
        for vol in vols:
            n_labelled += len(vol.meta["slices"])
            assert set(np.unique(vol.label)) <= {0, 2, 3} and (vol.label == 1).sum() == 0
            for k, z in enumerate(vol.meta["slices"]):
                path = Path(vol.meta["files"][z])
                # the labelled slice is the image of the file its contour names (<n>.dcm, n = InstanceNumber)
                n = int(path.stem)
                np.testing.assert_array_equal(vol.image[k], read_pixels(next(
                    img for img in sunnybrook.headers if img.path == path)))
                inner = root / "contourfiles" / vol.meta["original_id"] / "i-contours" / \
                    f"IM-0001-{n:04d}-icontour-manual.txt"
                assert str(inner) in vol.meta["contours"]
                x, y = read_contour(inner).T
                area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))  # shoelace, pixels
                lv = vol.label[k] == 3
                assert abs(lv.sum() - area) < 0.1 * area + 20
                rows, cols = np.nonzero(lv)
                assert abs(cols.mean() - x.mean()) < 3 and abs(rows.mean() - y.mean()) < 3
                if vol.meta["myo_labelled"][k]:
                    # LV inside the myocardial ring: an LV pixel next to background is where the hand-drawn inner
                    # contour crosses the outer one (2 of the 46 slices, 18 and 26 pixel sides)
                    myo = vol.label[k] == 2
                    assert myo.sum() > 0.2 * lv.sum()
                    ring = lv | myo
                    touching = sum(int((lv & ~np.roll(ring, s, axis=a)).sum()) for a in (0, 1) for s in (1, -1))
                    assert touching <= 0.03 * lv.sum()
                    n_touching += touching > 0
                    n_both += 1
    assert n_labelled == 96  # one labelled slice per inner contour: 96 frames in the release
    assert n_both == 46 - 9 and n_touching == 2  # 46 outer contours, SC-HF-I-6's 9 ignored
    assert sum(sunnybrook.n_slices(p) for p in SUNNYBROOK) == 96


def test_sunnybrook_copied_outer_contours_are_ignored(sunnybrook, caplog):
    with caplog.at_level(logging.WARNING, logger="cmr_utils.readers.dicom"):
        es, ed = sorted(sunnybrook.volumes(["SCD0000501"]), key=lambda v: v.phase != "ES")
    assert caplog.text.count("ignoring the outer contour") == 9 and "SC-HF-I-6/o-contours/IM-0001-0059" in caplog.text
    assert not (ed.label == 2).any() and ed.meta["unlabelled"] == ("RV", "MYO") and len(ed.meta["slices"]) == 11


# ---------------------------------------------------------------------------------------------- prediction
def test_predict_folder_writes_masks_on_the_dicom_grid(tmp_path):
    import nibabel as nib
    import pandas as pd

    from cmr_utils.predict_scans import predict_folder

    write_series(tmp_path / "scan", n_slices=3, n_phases=4)

    def segment(vol):  # "LV" on the slice's brighter half of rows (code(): values grow with the row index)
        return np.where(vol.image >= vol.image[:, 4:5, :], 3, 0).astype(np.uint8)

    table = predict_folder(segment, tmp_path / "scan", tmp_path / "out", progress=False)
    mask = nib.load(str(tmp_path / "out" / "P1_pred.nii.gz"))
    affine = next(Dicom(tmp_path / "scan").scans()).frames[0].meta["affine"]
    assert mask.shape == (6, 8, 3, 4) and np.allclose(mask.affine, affine, atol=1e-4)
    data = np.asarray(mask.dataobj)
    assert (data[:, 4:, :, :] == 3).all() and (data[:, :4, :, :] == 0).all()  # rows 4..7 of every slice and frame
    saved = pd.read_csv(tmp_path / "out" / "volumes.csv")
    assert list(saved["phase"]) == ["F01", "F02", "F03", "F04"] and set(saved["case"]) == {"P1"}
    lv_ml = 3 * 4 * 6 * PIXEL[0] * PIXEL[1] * GAP / 1000  # 3 slices x 4 rows x 6 columns
    assert np.allclose(saved["lv_volume"], lv_ml) and np.allclose(table["lv_volume"], lv_ml)
    assert "series_uid" in saved and "affine" not in saved and "files" not in saved


def test_predict_folder_on_sunnybrook(sunnybrook, tmp_path):
    import nibabel as nib

    from cmr_utils.predict_scans import predict_folder

    table = predict_folder(lambda vol: np.zeros(vol.image.shape, np.uint8), sunnybrook.folder, tmp_path / "out",
                           progress=False)
    assert len(table) == 5 * 20 and set(table["check"]) != {"ok"}  # an empty prediction is flagged, not dropped
    for patient, (n_slices, gap, pixel, _) in SUNNYBROOK.items():
        mask = nib.load(str(tmp_path / "out" / f"{patient}_pred.nii.gz"))
        assert mask.shape == (256, 256, n_slices, 20)
        assert np.allclose(np.linalg.norm(mask.affine[:3, :3], axis=0), [pixel, pixel, gap], atol=1e-3)


def test_make_predict_path_on_sunnybrook(sunnybrook, tmp_path, monkeypatch, capsys):
    """``make predict INPUT=<Sunnybrook>``'s command (``predict_command.main``) with a stand-in for the trained run:
    one 4D mask per patient, the ED and ES frames named, so that volumes.csv has the LV ejection fraction."""
    import pandas as pd

    from cmr_utils import predict_scans
    from cmr_utils.predict_command import main

    def bright_lv(vol):  # a stand-in model: "LV" where the frame is brightest
        return np.where(vol.image > np.percentile(vol.image, 99), 3, 0).astype(np.uint8)

    monkeypatch.setattr(predict_scans, "open_run", lambda *args, **kwargs: bright_lv)
    assert main(["--run", "any-s0", "--input", str(sunnybrook.folder), "--output", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    assert "5 scan(s)" in capsys.readouterr().err
    table = pd.read_csv(tmp_path / "out" / "volumes.csv")
    assert len(table) == 100 and sorted(table["case"].unique()) == sorted(SUNNYBROOK)
    for patient, group in table.groupby("patient"):
        assert sorted(group["phase"][group["phase"].isin(["ED", "ES"])]) == ["ED", "ES"]
        assert group["lv_ef"].notna().sum() == 2 and group["original_id"].str.startswith("SC-HF-I-").all()


def test_sunnybrook_stacks_run_apex_to_base_by_their_affines_and_anatomy(sunnybrook):
    """Every labelled Sunnybrook volume's slice axis points away from the apex (``runs_base_to_apex`` False) and
    the anatomy agrees: its LV cavity is smaller in the first third of the contoured slices than in the last."""
    from cmr_utils.geometry import runs_base_to_apex

    volumes = list(sunnybrook.volumes())
    assert volumes
    for vol in volumes:
        assert runs_base_to_apex(vol.meta["affine"]) is False, (vol.patient, vol.phase)
        area = (vol.label == 3).sum(axis=(1, 2))
        area = area[np.flatnonzero(area)[0]:np.flatnonzero(area)[-1] + 1]
        third = max(1, len(area) // 3)
        assert area[:third].mean() < area[-third:].mean(), (vol.patient, vol.phase, area.tolist())
