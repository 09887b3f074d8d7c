"""make predict DICOM_SEG=1 (cmr_utils.dicom_seg): DICOM Segmentation objects read back with highdicom reference
exactly the source images, sit on their geometry and decode to the NIfTI masks; a cine without ED/ES in its headers
gets them from the predicted LV volume; DICOM-SEG of other layouts, or of files without the headers it needs, is
refused before anything is predicted. On a synthetic cine written here, and one real Sunnybrook patient where
CMR_SUNNYBROOK_DIR is set."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

hd = pytest.importorskip("highdicom")
import pydicom  # noqa: E402

from cmr_utils.predict_scans import predict_folder  # noqa: E402
from cmr_utils.readers import DataError, Dicom  # noqa: E402
from test_dicom import GAP, PIXEL, write_series  # noqa: E402
from test_readers_layouts import write_pairs  # noqa: E402

SNOMED = {"RV": "53085002", "MYO": "49848007", "LV": "87878005"}  # right ventricle, LV myocardium, left ventricle


def striped(vol):
    """A segmenter whose answer follows the frame (code(): 1000 (z + 1) + 10 t + row): on every slice and phase,
    LV on rows >= 8 - t (so the LV grows with the phase: ED is the last phase, ES the first), MYO on rows 2..3, RV
    on rows 0..1 of the first slice only (other slices have no RV frame in the SEG)."""
    t = int(vol.image[0, 0, 0]) % 1000 // 10
    labels = np.zeros(vol.image.shape, np.uint8)
    labels[:, 8 - t:, :] = 3
    labels[:, 2:4, :] = 2
    labels[0, 0:2, :] = 1
    return labels


def read_back(seg_file: Path, sources: list[Path]):
    """The SEG at ``seg_file`` as highdicom reads it, and its label map (Z, H, W) on ``sources`` (slice order)."""
    seg = hd.seg.segread(seg_file)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sources]
    return seg, seg.get_pixels_by_source_instance(uids, combine_segments=True)


def check_seg(seg, sources: list[Path]):
    """The SEG references exactly ``sources`` (one phase, slice order), at their positions and pixel spacing."""
    headers = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in sources)}
    first = next(iter(headers.values()))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.Modality == "SEG"  # Segmentation Storage
    assert seg.SegmentationType == "BINARY" and seg.StudyInstanceUID == first.StudyInstanceUID
    assert (seg.Rows, seg.Columns) == (first.Rows, first.Columns)
    referenced = {str(item.ReferencedSOPInstanceUID)
                  for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(headers) and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(shared.PixelMeasuresSequence[0].PixelSpacing, first.PixelSpacing)
    np.testing.assert_allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient,
                               first.ImageOrientationPatient)
    for frame in seg.PerFrameFunctionalGroupsSequence:  # every frame at its source image's position
        uid = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        np.testing.assert_allclose(frame.PlanePositionSequence[0].ImagePositionPatient,
                                   headers[uid].ImagePositionPatient, atol=1e-3)
    assert [(s.SegmentNumber, s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
             s.SegmentedPropertyCategoryCodeSequence[0].CodeValue) for s in seg.SegmentSequence] == [
        (1, "RV", SNOMED["RV"], "91723000"), (2, "MYO", SNOMED["MYO"], "91723000"),
        (3, "LV", SNOMED["LV"], "91723000")]


def test_dicom_seg_of_a_synthetic_cine_reads_back(tmp_path):
    files = write_series(tmp_path / "scan", n_slices=3, n_phases=4, rows=12, cols=6)
    source = dict(sorted(files.items()))
    table = predict_folder(striped, tmp_path / "scan", tmp_path / "out", progress=False, dicom_seg=True)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["P1_pred.nii.gz", "P1_seg_F01.dcm", "P1_seg_F02.dcm",
                                                     "P1_seg_F03.dcm", "P1_seg_F04.dcm", "volumes.csv"]
    mask = np.asarray(nib.load(str(out / "P1_pred.nii.gz")).dataobj)  # (X, Y, Z, T)
    series_uids = set()
    for t in range(4):
        phase_files = [source[(z, t)] for z in range(3)]
        seg, decoded = read_back(out / f"P1_seg_F{t + 1:02d}.dcm", phase_files)
        check_seg(seg, phase_files)
        assert seg.InstanceNumber == t + 1
        series_uids.add(seg.SeriesInstanceUID)
        np.testing.assert_array_equal(decoded, mask[..., t].T)  # the NIfTI mask, (Z, Y, X)
        assert (decoded[:, 8 - t:] == 3).all() and (decoded[0, :2] == 1).all() and not (decoded[1:] == 1).any()
    assert len(series_uids) == 1  # one SEG series per source series, an instance per phase
    # no ED/ES in the headers: the phases of largest and smallest LV volume (here the last and the first)
    assert list(table["phase"]) == ["ES", "F02", "F03", "ED"] and set(table["ed_es_from"]) == {"lv_volume"}
    lv = table.set_index("phase")["lv_volume"]
    assert lv["ED"] == pytest.approx(3 * 7 * 6 * PIXEL[0] * PIXEL[1] * GAP / 1000)  # 3 slices x 7 rows x 6 columns
    assert table.set_index("phase").loc["ED", "lv_ef"] == pytest.approx(100 * (7 - 4) / 7)
    # a second prediction gives the same files: UIDs derive from the source series, the algorithm and the labels
    predict_folder(striped, tmp_path / "scan", tmp_path / "again", progress=False, dicom_seg=True)
    for name in ("P1_seg_F01.dcm", "P1_seg_F04.dcm"):
        a, b = pydicom.dcmread(out / name), pydicom.dcmread(tmp_path / "again" / name)
        assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)


def test_dicom_seg_is_for_dicom_input_only(tmp_path, capsys):
    from cmr_utils.predict_command import main

    calls = []
    with pytest.raises(ValueError, match="is in the nifti-pairs layout; a DICOM Segmentation references DICOM"):
        predict_folder(lambda vol: calls.append(vol), write_pairs(tmp_path / "in"), tmp_path / "out",
                       progress=False, dicom_seg=True)
    assert not calls and not (tmp_path / "out").exists()
    # the command refuses before it loads the run (none exists here)
    assert main(["--run", "random-all-s0", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "new" / "out"),
                 "--device", "cpu", "--dicom-seg"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --dicom-seg (DICOM_SEG=1): INPUT") and "nifti-pairs" in err
    assert not (tmp_path / "new").exists()


def test_dicom_seg_needs_the_study_and_frame_of_reference(tmp_path):
    files = write_series(tmp_path / "scan", n_slices=2, n_phases=2)
    last = max(files.values())  # the file sorted last: checked before anything is predicted
    ds = pydicom.dcmread(last)
    del ds.FrameOfReferenceUID
    ds.save_as(last, enforce_file_format=True)
    calls = []
    with pytest.raises(DataError, match=f"{last}: no FrameOfReferenceUID; a DICOM-SEG must reference"):
        predict_folder(lambda vol: calls.append(vol), tmp_path / "scan", tmp_path / "out", progress=False,
                       dicom_seg=True)
    assert not calls and not (tmp_path / "out").exists()
    table = predict_folder(striped, tmp_path / "scan", tmp_path / "out", progress=False)  # NIfTI alone is fine
    assert len(table) == 2


def test_dicom_seg_takes_one_orientation_where_the_series_rounds_it(tmp_path):
    """Direction cosines that differ in the 6th decimal (as Sunnybrook's SCD0000201 does) are one orientation for the
    reader; highdicom compares them exactly, so the SEG takes the first image's."""
    files = write_series(tmp_path / "scan", n_slices=3, n_phases=2, rows=12, cols=6)
    last = max(files.values())
    ds = pydicom.dcmread(last)
    first_iop = [float(v) for v in ds.ImageOrientationPatient]
    ds.ImageOrientationPatient = [first_iop[0] + 2e-6, *first_iop[1:]]
    ds.save_as(last, enforce_file_format=True)
    predict_folder(striped, tmp_path / "scan", tmp_path / "out", progress=False, dicom_seg=True)
    for t in range(2):
        phase_files = [dict(files)[(z, t)] for z in range(3)]
        seg, decoded = read_back(tmp_path / "out" / f"P1_seg_F{t + 1:02d}.dcm", phase_files)
        check_seg(seg, phase_files)
        assert (decoded[:, 8 - t:] == 3).all()
    assert pydicom.dcmread(last).ImageOrientationPatient[0] == first_iop[0] + 2e-6  # the source file is untouched


# ---------------------------------------------------------------------------------------------- the real data
def test_sunnybrook_patient_dicom_seg_and_ed_es_from_the_cine(tmp_path):
    """One Sunnybrook patient as a scanner gives it (its files linked into a folder of their own: no contours, so
    nothing names ED and ES): a 4D mask on the series' grid, ED and ES from the predicted LV volume, and one SEG
    per phase that reads back onto the source files."""
    from conftest import real_dir

    root = real_dir("CMR_SUNNYBROOK_DIR")
    patient = tmp_path / "SCD0000101"
    patient.mkdir()
    for path in sorted((root / "dicoms" / "SCD0000101").glob("*.dcm")):
        (patient / path.name).symlink_to(path)

    def bright_lv(vol):  # a stand-in model: the brightest 1% is "LV", a band below it "MYO"
        high, low = np.percentile(vol.image, [99, 97])
        return np.select([vol.image > high, vol.image > low], [3, 2], 0).astype(np.uint8)

    with pytest.warns(UserWarning, match="FrameOfReferenceUIDs in one series"):  # Sunnybrook's anonymiser's doing
        table = predict_folder(bright_lv, patient, tmp_path / "out", progress=False, dicom_seg=True)
    (scan,) = list(Dicom(patient).scans())
    (series,) = Dicom(patient).series("SCD0000101")
    mask = nib.load(str(tmp_path / "out" / "SCD0000101_pred.nii.gz"))
    assert mask.shape == (256, 256, 12, 20) and np.allclose(mask.affine, series.affine, atol=1e-4)
    assert len(table) == 20 and set(table["ed_es_from"]) == {"lv_volume"}
    ed, es = table[table["phase"] == "ED"].iloc[0], table[table["phase"] == "ES"].iloc[0]
    assert ed["lv_volume"] == table["lv_volume"].max() and es["lv_volume"] == table["lv_volume"].min()
    assert ed["lv_ef"] == pytest.approx(100 * (ed["lv_volume"] - es["lv_volume"]) / ed["lv_volume"])
    data = np.asarray(mask.dataobj)
    for t in (int(ed["frame"]) - 1, int(es["frame"]) - 1):
        phase_files = [Path(f) for f in scan.frames[t].meta["files"]]
        seg, decoded = read_back(tmp_path / "out" / f"SCD0000101_seg_F{t + 1:02d}.dcm", phase_files)
        check_seg(seg, phase_files)
        np.testing.assert_array_equal(decoded, data[..., t].T)
    assert len(list((tmp_path / "out").glob("SCD0000101_seg_F*.dcm"))) == 20
    saved = pd.read_csv(tmp_path / "out" / "volumes.csv")
    assert list(saved["ed_es_from"].unique()) == ["lv_volume"] and saved["quality"].notna().all()
