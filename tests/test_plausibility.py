"""The plausibility check of a predicted label map: a heart of realistic size passes, a missing heart, LV or
myocardium and a heart a few voxels big are flagged with their measured values, and (where CMR_ACDC_DIR names
ACDC's HDF5 folder) no real ground truth is flagged."""
import numpy as np
import pytest

from cmr_utils import plausibility
from cmr_utils.plausibility import check_function, check_prediction

SPACING = (8.0, 1.5, 1.5)  # (z, y, x) mm, a usual cine short-axis grid


def synthetic_heart(shape=(10, 128, 128), spacing=SPACING, heart_slices=slice(1, -1)):
    """Labels 1 RV, 2 MYO, 3 LV (ACDC) of realistic size in mm: an LV cavity of radius 25 mm in a myocardial
    ring 8 mm thick, and an RV disk of radius 30 mm centred 40 mm beside it, on ``heart_slices`` (base to apex:
    the stack's first and last slices hold no heart, as in a real stack). About 126 mL of LV, 346 mL of heart."""
    z, y, x = shape
    yy, xx = np.meshgrid((np.arange(y) - y / 2) * spacing[1], (np.arange(x) - x / 2) * spacing[2], indexing="ij")
    r_left, r_right = np.hypot(yy, xx - 15), np.hypot(yy, xx + 25)  # mm from the LV's and the RV's centres
    section = np.zeros((y, x), np.uint8)
    section[r_right < 30] = 1
    section[r_left < 33] = 2
    section[r_left < 25] = 3
    labels = np.zeros(shape, np.uint8)
    labels[heart_slices] = section
    return labels


def test_a_heart_of_realistic_size_is_plausible():
    labels = synthetic_heart()
    voxel_ml = np.prod(SPACING) / 1000
    assert (labels == 3).sum() * voxel_ml == pytest.approx(126, rel=0.02)  # what the helper promises
    assert check_prediction(labels, SPACING) == []
    assert check_prediction(labels) == []  # without spacing: its share of the pixels, 12%
    assert check_prediction(labels.astype(np.int64), list(SPACING)) == []  # any integer type, any sequence


def test_a_missing_heart_lv_or_myocardium_is_flagged():
    labels = synthetic_heart()
    assert check_prediction(np.zeros_like(labels), SPACING) == ["no heart predicted (no RV, MYO or LV voxel)"]
    assert check_prediction(np.zeros_like(labels)) == ["no heart predicted (no RV, MYO or LV voxel)"]
    no_lv = np.where(labels == 3, 0, labels).astype(np.uint8)
    assert check_prediction(no_lv, SPACING) == ["no LV cavity predicted"]  # the rest is large enough
    no_myo = np.where(labels == 2, 0, labels).astype(np.uint8)
    assert check_prediction(no_myo, SPACING) == ["no myocardium predicted"]
    rv_only = np.where(labels > 1, 0, labels).astype(np.uint8)
    assert check_prediction(rv_only, SPACING) == ["no LV cavity predicted", "no myocardium predicted"]


def test_a_heart_of_a_few_voxels_is_flagged_with_its_volume():
    tiny = np.zeros((10, 128, 128), np.uint8)
    tiny[5, 60, 60:62] = 3
    tiny[5, 61, 60:62] = 2
    tiny[5, 62, 60] = 1  # 5 voxels of 0.018 mL: 0.09 mL of heart, 0.072 mL of LV+MYO
    assert check_prediction(tiny, SPACING) == [
        "heart (RV+MYO+LV) implausibly small: 0.09 mL, under 30.0 mL",
        "left ventricle (LV+MYO) implausibly small: 0.072 mL, under 15.0 mL"]


def test_the_ml_thresholds_at_their_edge():
    """Voxels of exactly 1 mL (10 mm each way) on an 8 cm stack: 29 mL of heart is flagged, 30 mL is not."""
    heart = np.zeros((8, 10, 10), np.uint8)
    heart.flat[:15] = 3
    heart.flat[15:29] = 1  # LV+MYO 15 mL (at its threshold), heart 29 mL
    assert check_prediction(heart, (10, 10, 10)) == ["no myocardium predicted",
                                                     "heart (RV+MYO+LV) implausibly small: 29.0 mL, under 30.0 mL"]
    heart.flat[29] = 2
    assert check_prediction(heart, (10, 10, 10)) == []


def test_a_partial_stack_expects_a_part_of_a_heart():
    """One mid-ventricular slice of 5 mm holds about 27 mL of heart: below a whole heart's minimum (30 mL) but a
    plausible slice; 10 voxels of heart there are flagged against what 0.5 cm of stack holds (4 and 3 mL/cm)."""
    mid = synthetic_heart(shape=(1, 128, 128), heart_slices=slice(None))
    spacing = (5.0, 1.5, 1.5)  # voxels of 0.01125 mL
    assert 20 < (mid > 0).sum() * 0.01125 < plausibility.MIN_HEART_ML
    assert check_prediction(mid, spacing) == []
    few = np.zeros_like(mid)
    few[0, 60, 60:64], few[0, 61, 60:64], few[0, 62, 60:62] = 3, 2, 1  # 10 voxels, 8 of them LV+MYO
    assert check_prediction(few, spacing) == [
        "heart (RV+MYO+LV) implausibly small: 0.11 mL, under 2.0 mL for a stack of 0.5 cm",
        "left ventricle (LV+MYO) implausibly small: 0.09 mL, under 1.5 mL for a stack of 0.5 cm"]


def test_an_lv_cavity_of_a_few_voxels_in_a_plausible_heart_is_flagged():
    """What a contrast-inverted scan gives: the heart found, its LV cavity nearly empty (0.1 mL)."""
    labels = synthetic_heart()
    inverted = np.where(labels == 3, 2, labels).astype(np.uint8)  # the cavity read as myocardium...
    inverted[5, 64, 70:75] = 3  # ...but for 5 voxels of 0.018 mL
    assert check_prediction(inverted, SPACING) == ["LV cavity implausibly small: 0.09 mL, under 3.2 mL for a stack of 8.0 cm"]
    one_slice = inverted[5:6]  # a 0.8 cm stack expects at least 0.32 mL of LV cavity
    assert check_prediction(one_slice, SPACING)[-1] == "LV cavity implausibly small: 0.09 mL, under 0.32 mL for a " \
                                                       "stack of 0.8 cm"


def test_physiological_ranges():
    assert check_function(120.0, 60.0, 110.0) == []
    assert check_function(40.0, 10.0, 300.0) == []  # the edges are in range
    assert check_function(0.1, 95.0, 12.0) == ["LV EDV 0.1 mL outside 40-400 mL", "LV EF 95.0% outside 10-85%",
                                               "myocardial mass 12.0 g outside 30-300 g"]
    assert check_function(450.0, 5.0, 310.0) == ["LV EDV 450.0 mL outside 40-400 mL", "LV EF 5.0% outside 10-85%",
                                                 "myocardial mass 310.0 g outside 30-300 g"]
    assert check_function(None, float("nan"), None) == []  # unknown values are not checked


def test_without_spacing_the_heart_share_of_the_pixels_decides():
    """0.3% of the pixels is the edge: 29 heart pixels of 10 000 are flagged, 30 are not."""
    labels = np.zeros((1, 100, 100), np.uint8)
    labels.flat[:10], labels.flat[10:20], labels.flat[20:29] = 3, 2, 1
    assert check_prediction(labels) == [
        "heart (RV+MYO+LV) implausibly small: 0.29% of the pixels, under 0.3% (no spacing: mL unknown)"]
    labels.flat[29] = 1
    assert check_prediction(labels) == []
    tiny = np.zeros((10, 128, 128), np.uint8)
    tiny[5, 60, 60:62], tiny[5, 61, 60:62], tiny[5, 62, 60] = 3, 2, 1  # 5 of 163 840 pixels
    assert check_prediction(tiny) == [
        "heart (RV+MYO+LV) implausibly small: 0.0031% of the pixels, under 0.3% (no spacing: mL unknown)"]


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match=r"\(Z, H, W\) label map, got shape \(128, 128\)"):
        check_prediction(np.zeros((128, 128), np.uint8))
    with pytest.raises(TypeError, match="integer label map, got dtype float32"):
        check_prediction(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="spacing must be 3 positive finite numbers"):
        check_prediction(synthetic_heart(), (8.0, 0.0, 1.5))


def test_no_real_acdc_ground_truth_is_flagged():
    """Every ground truth of ACDC's HDF5 volumes (``$CMR_ACDC_DIR/*.h5``, spacings in ``../spacing.csv``) passes,
    with and without its spacing, and the thresholds sit at most at half of the real minima."""
    import h5py
    import pandas as pd

    from conftest import real_dir

    folder = real_dir("CMR_ACDC_DIR")
    files = sorted(folder.glob("*.h5"))
    if not files:
        pytest.skip(f"CMR_ACDC_DIR={folder} holds no *.h5: this test reads ACDC's HDF5 volumes")
    spacing_csv = folder.parent / "spacing.csv"
    if not spacing_csv.is_file():
        pytest.fail(f"{spacing_csv}: missing; the spacings of {folder.name} are read from it")
    spacings = pd.read_csv(spacing_csv).set_index("file")
    measured, flagged, patients = [], {}, {}
    for path in files:
        with h5py.File(path, "r") as f:
            label = f["label"][()]
        row = spacings.loc[path.name]
        spacing = (row["spacing_z_mm"], row["spacing_y_mm"], row["spacing_x_mm"])
        assert set(np.unique(label)) == {0, 1, 2, 3}, path.name
        found = check_prediction(label, spacing) + check_prediction(label)
        if found:
            flagged[path.name] = found
        voxel_ml, stack_cm = np.prod(spacing) / 1000, label.shape[0] * spacing[0] / 10
        heart, left = (label > 0).sum() * voxel_ml, np.isin(label, (2, 3)).sum() * voxel_ml
        lv = (label == 3).sum() * voxel_ml
        measured.append((heart, left, heart / stack_cm, left / stack_cm, (label > 0).mean(), lv, lv / stack_cm))
        patients.setdefault(path.name.split("_")[0], []).append((path.name, lv, (label == 2).sum() * voxel_ml))
    assert not flagged, f"{len(flagged)} of {len(files)} real ground truths flagged: {dict(list(flagged.items())[:5])}"
    minima = np.min(measured, axis=0)
    thresholds = (plausibility.MIN_HEART_ML, plausibility.MIN_LEFT_HEART_ML, plausibility.MIN_HEART_ML_PER_CM,
                  plausibility.MIN_LEFT_HEART_ML_PER_CM, plausibility.MIN_HEART_SHARE, plausibility.MIN_LV_ML,
                  plausibility.MIN_LV_ML_PER_CM)
    assert (minima >= 2 * np.array(thresholds)).all(), f"real minima {minima} against thresholds {thresholds}"
    # every patient's EDV, EF and mass at ED (the lower frame number is ED) lie in the physiological ranges
    outside = {}
    for patient, frames in patients.items():
        (_, edv, myo_ed), (_, esv, _) = sorted(frames)
        found = check_function(edv, 100 * (edv - esv) / edv, myo_ed * 1.05)
        if found:
            outside[patient] = found
    assert len(patients) == len(files) // 2 and not outside, outside
