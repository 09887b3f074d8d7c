"""Tests of cmr_utils.metrics against hand-computed answers on tiny label maps."""
import math

import numpy as np
import pytest
import torch
from scipy import stats as st

import segmentation_models_pytorch as smp

from cmr_utils import metrics


def three_slices():
    """Three 4x4 slices (pred, target); the counts below are worked out by hand.

    Slice 0: RV only. target RV = 2x2 block; pred adds (1,3) and misses (2,2) -> RV tp 3, fp 1, fn 1.
    Slice 1: target LV 2x2 block + MYO at (0,0); pred LV top row of the block + MYO at (0,0),(0,1)
             -> LV tp 2, fp 0, fn 2; MYO tp 1, fp 1, fn 0.
    Slice 2: background only in both.
    """
    target = np.zeros((3, 4, 4), dtype=np.uint8)
    pred = np.zeros((3, 4, 4), dtype=np.uint8)
    target[0, 1:3, 1:3] = 1
    pred[0, 1, 1:4] = 1
    pred[0, 2, 1] = 1
    target[1, 1:3, 1:3] = 3
    target[1, 0, 0] = 2
    pred[1, 1, 1:3] = 3
    pred[1, 0, 0:2] = 2
    return pred, target


# --------------------------------------------------------------------------------------------------
# IoU and Dice from counts (the one place both are computed)


def test_overlap_scores_hand_values_and_the_empty_convention():
    # tp 3 fp 1 fn 1 -> IoU 3/5, Dice 6/8; tp 0 fp 2 fn 0 -> 0, 0; nothing anywhere -> the caller's value
    tp, fp, fn = np.array([3, 0, 0]), np.array([1, 2, 0]), np.array([1, 0, 0])
    for empty in (1.0, math.nan):
        iou, dice = metrics.overlap_scores(tp, fp, fn, empty=empty)
        assert iou.dtype == dice.dtype == np.float64
        np.testing.assert_array_equal(iou, [0.6, 0.0, empty])
        np.testing.assert_array_equal(dice, [0.75, 0.0, empty])
    iou, dice = metrics.overlap_scores(6, 2, 3, empty=math.nan)  # plain numbers: 0-d arrays
    assert float(iou) == 6 / 11 and float(dice) == 12 / 17


def test_overlap_scores_on_torch_counts_stay_torch_and_agree_with_numpy():
    counts = np.array([[3, 0, 0], [1, 2, 0], [1, 0, 0]])
    as_numpy = metrics.overlap_scores(*counts, empty=1.0)
    as_torch = metrics.overlap_scores(*torch.from_numpy(counts).float(), empty=1.0)
    for a, b in zip(as_numpy, as_torch):
        assert isinstance(b, torch.Tensor) and b.dtype == torch.float64
        np.testing.assert_array_equal(a, b.numpy())


def test_overlap_scores_equal_smps_iou_and_f1_up_to_float32():
    rng = np.random.default_rng(0)
    tp, fp, fn, tn = (torch.from_numpy(rng.integers(0, 10_000, (50, 3))) for _ in range(4))
    iou, dice = metrics.overlap_scores(tp, fp, fn, empty=math.nan)
    np.testing.assert_allclose(iou, smp.metrics.iou_score(tp, fp, fn, tn), rtol=1e-6)
    np.testing.assert_allclose(dice, smp.metrics.f1_score(tp, fp, fn, tn), rtol=1e-6)


def test_overlap_scores_bad_counts():
    with pytest.raises(ValueError, match="same shape"):
        metrics.overlap_scores([1, 2], [1], [0, 0], empty=1.0)
    with pytest.raises(ValueError, match="non-negative"):
        metrics.overlap_scores([1], [-1], [0], empty=1.0)
    with pytest.raises(TypeError, match="empty must be a number"):
        metrics.overlap_scores([1], [0], [0], empty=None)


def test_every_module_reads_the_one_structure_map():
    from cmr_utils import fpn, plausibility, structures, viewer
    from cmr_utils.readers import ACDC_LABELS

    assert structures.STRUCTURES == {1: "RV", 2: "MYO", 3: "LV"} and structures.N_CLASSES == fpn.N_CLASSES == 4
    assert metrics.STRUCTURES is structures.STRUCTURES and ACDC_LABELS is structures.STRUCTURES
    assert viewer.STRUCTURE_CATEGORY == {"RV": 1, "MYO": 2, "LV": 3}
    assert (plausibility.RV, plausibility.MYO, plausibility.LV) == (1, 2, 3)
    assert structures.structure_label("LV") == structures.structure_label(np.int64(3)) == 3  # name or label
    with pytest.raises(ValueError, match=r"structure must be one of \['LV', 'MYO', 'RV'\], got 'rv'"):
        structures.structure_label("rv")


# --------------------------------------------------------------------------------------------------
# slice_stats and the study's IoU


def test_slice_stats_hand_counts():
    pred, target = three_slices()
    tp, fp, fn, tn = metrics.slice_stats(pred, target)
    for counts in (tp, fp, fn, tn):
        assert counts.dtype == np.int64 and counts.shape == (3, 4)
    np.testing.assert_array_equal(tp, [[11, 3, 0, 0], [10, 0, 1, 2], [16, 0, 0, 0]])
    np.testing.assert_array_equal(fp, [[1, 1, 0, 0], [2, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(fn, [[1, 1, 0, 0], [1, 0, 0, 2], [0, 0, 0, 0]])
    np.testing.assert_array_equal(tn, [[3, 11, 16, 16], [3, 16, 14, 12], [0, 16, 16, 16]])


def test_slice_stats_accepts_torch():
    pred, target = three_slices()
    from_numpy = metrics.slice_stats(pred, target)
    from_torch = metrics.slice_stats(torch.from_numpy(pred).long(), torch.from_numpy(target))
    for a, b in zip(from_numpy, from_torch):
        np.testing.assert_array_equal(a, b)
        assert isinstance(b, np.ndarray)


def test_study_iou_pooled_vs_per_slice():
    pred, target = three_slices()
    stats = metrics.slice_stats(pred, target)
    # pooled over slices and foreground classes: tp 3+3, fp 1+1, fn 1+2
    assert metrics.study_iou(*stats) == pytest.approx(6 / 11)
    per_slice = metrics.study_iou_per_slice(*stats)
    np.testing.assert_allclose(per_slice[:2], [3 / 5, 3 / 6])
    assert np.isnan(per_slice[2])  # empty union -> NaN by our choice
    # smp's default counts the empty slice as 1.0: micro-imagewise mean = (0.6 + 0.5 + 1) / 3
    per_slice_smp = metrics.study_iou_per_slice(*stats, zero_division=1.0)
    np.testing.assert_allclose(per_slice_smp, [0.6, 0.5, 1.0])
    smp_imagewise = smp.metrics.iou_score(*(torch.from_numpy(s[:, 1:]) for s in stats),
                                          reduction="micro-imagewise")
    assert float(smp_imagewise) == pytest.approx(0.7)
    assert per_slice_smp.mean() == pytest.approx(0.7)


def test_study_iou_ignores_background_and_is_nan_without_foreground():
    empty = np.zeros((2, 4, 4), dtype=np.uint8)
    assert math.isnan(metrics.study_iou(*metrics.slice_stats(empty, empty)))
    # a perfect background-only prediction must not inflate a bad foreground one
    target = empty.copy()
    target[0, 0, 0] = 3
    assert metrics.study_iou(*metrics.slice_stats(empty, target)) == 0.0


def test_slice_stats_bad_inputs():
    pred, target = three_slices()
    with pytest.raises(ValueError, match="same shape"):
        metrics.slice_stats(pred[:2], target)
    with pytest.raises(ValueError, match="0..3"):
        metrics.slice_stats(pred + 1, target)
    with pytest.raises(TypeError, match="integer"):
        metrics.slice_stats(pred.astype(np.float32), target)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        metrics.slice_stats(pred[0], target[0])
    with pytest.raises(ValueError, match="n_classes"):
        metrics.slice_stats(pred, target, n_classes=1)
    tp, fp, fn, tn = metrics.slice_stats(pred, target)
    with pytest.raises(ValueError, match="same shape"):
        metrics.study_iou(tp, fp, fn, tn[:2])
    with pytest.raises(TypeError, match="integer counts"):
        metrics.study_iou(tp.astype(float), fp, fn, tn)


# --------------------------------------------------------------------------------------------------
# per-slice Dice


def test_dice_per_slice_hand_values():
    pred, target = three_slices()
    np.testing.assert_allclose(metrics.dice_per_slice(pred, target, 1), [0.75, np.nan, np.nan])
    np.testing.assert_allclose(metrics.dice_per_slice(pred, target, "LV"), [np.nan, 2 / 3, np.nan])
    np.testing.assert_allclose(metrics.dice_per_slice(pred, target, "MYO"), [np.nan, 2 / 3, np.nan])


def test_dice_per_slice_one_side_empty_is_zero():
    target = np.zeros((2, 4, 4), dtype=np.uint8)
    pred = target.copy()
    target[0, 0, 0] = 2  # only in the ground truth
    pred[1, 3, 3] = 2  # only in the prediction
    np.testing.assert_array_equal(metrics.dice_per_slice(pred, target, 2), [0.0, 0.0])


def test_mean_foreground_dice_per_slice():
    pred, target = three_slices()
    # slice 0: RV only (0.75); slice 1: MYO and LV (2/3 each); slice 2: nothing
    np.testing.assert_allclose(metrics.mean_foreground_dice_per_slice(pred, target), [0.75, 2 / 3, np.nan])
    # a structure missed entirely counts as 0 in the mean
    pred2 = pred.copy()
    pred2[0][pred2[0] == 1] = 0
    pred2[0, 3, 3] = 3  # LV predicted where there is none
    np.testing.assert_allclose(metrics.mean_foreground_dice_per_slice(pred2, target)[0], 0.0)


def test_dice_bad_structure():
    pred, target = three_slices()
    with pytest.raises(ValueError, match="structure"):
        metrics.dice_per_slice(pred, target, 4)
    with pytest.raises(ValueError, match="structure"):
        metrics.dice_per_slice(pred, target, "AORTA")
    with pytest.raises(TypeError, match="structure"):
        metrics.dice_per_slice(pred, target, 1.0)


# --------------------------------------------------------------------------------------------------
# structure_scores and hd95


def test_structure_scores_perfect():
    target = np.zeros((3, 12, 12), dtype=np.uint8)
    target[:, 2:5, 2:5] = 1
    target[:, 6:10, 6:10] = 2
    target[:, 7:9, 7:9] = 3
    scores = metrics.structure_scores(target.copy(), target, spacing=(10.0, 1.5, 1.5))
    assert set(scores) == {"RV", "MYO", "LV"}
    for name in ("RV", "MYO", "LV"):
        assert scores[name] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "hd95_unit": "mm"}


def test_structure_scores_hand_4x4():
    pred, target = three_slices()
    scores = metrics.structure_scores(pred[0], target[0])  # a single (H, W) slice
    assert scores["RV"]["dice"] == pytest.approx(0.75)
    assert scores["RV"]["iou"] == pytest.approx(3 / 5)
    assert scores["RV"]["hd95_unit"] == "px"


def test_structure_scores_empty_combinations():
    target = np.zeros((2, 8, 8), dtype=np.uint8)
    pred = target.copy()
    # RV: empty in both. MYO: only predicted. LV: only in the ground truth. (3 cases in one volume)
    pred[0, 1:3, 1:3] = 2
    target[1, 4:6, 4:6] = 3
    scores = metrics.structure_scores(pred, target)
    assert scores["RV"]["dice"] == 1.0 and scores["RV"]["iou"] == 1.0 and math.isnan(scores["RV"]["hd95"])
    for name in ("MYO", "LV"):
        assert scores[name]["dice"] == 0.0 and scores[name]["iou"] == 0.0
        assert math.isnan(scores[name]["hd95"])
    # fourth case, both non-empty (and disjoint): dice 0, finite hd95
    pred[1, 4:6, 0:2] = 3
    lv = metrics.structure_scores(pred, target)["LV"]
    assert lv["dice"] == 0.0 and lv["iou"] == 0.0 and lv["hd95"] > 0


def test_hd95_parallel_planes_anisotropic():
    spacing = (10.0, 1.5, 0.7)
    # planes x = 2 and x = 6 over the same (z, y) patch: every surface distance is 4 steps along x
    target = np.zeros((6, 8, 9), dtype=np.uint8)
    pred = target.copy()
    target[1:5, 2:6, 2] = 3
    pred[1:5, 2:6, 6] = 3
    assert metrics.structure_scores(pred, target, spacing)["LV"]["hd95"] == pytest.approx(4 * 0.7)
    px = metrics.structure_scores(pred, target)["LV"]
    assert px["hd95"] == pytest.approx(4.0) and px["hd95_unit"] == "px"
    # planes z = 1 and z = 3: 2 slices apart -> 20 mm, 2 px
    target = np.zeros((6, 8, 9), dtype=np.uint8)
    pred = target.copy()
    target[1, 2:6, 2:7] = 1
    pred[3, 2:6, 2:7] = 1
    assert metrics.structure_scores(pred, target, spacing)["RV"]["hd95"] == pytest.approx(20.0)
    assert metrics.structure_scores(pred, target)["RV"]["hd95"] == pytest.approx(2.0)


def test_hd95_percentile_of_pooled_distances():
    # target: one voxel at x = 0; pred: a line x = 1..4 on the same row.
    # pred -> target distances 1, 2, 3, 4; target -> pred distance 1. Pooled sorted [1, 1, 2, 3, 4]:
    # 95th percentile (linear) = 3 + 0.8 * (4 - 3) = 3.8 steps; with x spacing 0.5 mm -> 1.9 mm
    target = np.zeros((1, 5, 6), dtype=bool)
    pred = target.copy()
    target[0, 2, 0] = True
    pred[0, 2, 1:5] = True
    assert metrics.hd95(pred, target) == pytest.approx(3.8)
    assert metrics.hd95(pred, target, spacing=(10.0, 1.0, 0.5)) == pytest.approx(1.9)
    assert metrics.hd95(target, pred) == pytest.approx(3.8)  # symmetric


def _brute_force_hd95(pred, target, spacing):
    """Independent reference: surfaces from explicit 6-neighbour checks, all pairwise distances."""
    def surface_points(mask):
        padded = np.pad(mask, 1, constant_values=False)
        inner = np.ones_like(mask)
        for axis in range(3):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis=axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)

    p, t = surface_points(pred), surface_points(target)
    distances = np.sqrt(((p[:, None, :] - t[None, :, :]) ** 2).sum(-1))
    return np.percentile(np.concatenate([distances.min(1), distances.min(0)]), 95)


def test_hd95_shifted_cube_matches_brute_force():
    target = np.zeros((8, 10, 12), dtype=bool)
    target[1:5, 2:6, 2:6] = True
    pred = np.roll(target, shift=(1, 0, 3), axis=(0, 1, 2))  # shifted one slice and three columns
    spacing = (5.0, 1.0, 0.5)
    expected = _brute_force_hd95(pred, target, spacing)
    assert expected > 0
    assert metrics.hd95(pred, target, spacing) == pytest.approx(expected)
    assert metrics.hd95(pred, target) == pytest.approx(_brute_force_hd95(pred, target, (1, 1, 1)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_small_masks_in_a_large_volume_and_at_its_edges(seed):
    """hd95 works on the masks' bounding box: irregular masks far inside a volume and masks touching its faces
    (where the outside counts as background) give the all-pairs answer."""
    rng = np.random.default_rng(seed)
    volume = (6, 40, 48)
    pred, target = np.zeros(volume, dtype=bool), np.zeros(volume, dtype=bool)
    pred[1:4, 10:16, 20:27] = rng.random((3, 6, 7)) < 0.7  # inside, ragged
    target[2:5, 12:19, 22:30] = rng.random((3, 7, 8)) < 0.7
    edge_pred, edge_target = pred.copy(), target.copy()
    edge_pred[0, 0:3, 40:48] = True  # touches the first slice, the top row and the last column
    edge_target[5, 37:40, 0:4] = True  # the last slice, the bottom row, the first column
    spacing = (8.0, 1.25, 1.25)
    for p, t in ((pred, target), (edge_pred, edge_target), (edge_pred, target)):
        assert metrics.hd95(p, t, spacing) == pytest.approx(_brute_force_hd95(p, t, spacing))


def test_structure_scores_bad_inputs():
    volume = np.zeros((2, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="3 values"):
        metrics.structure_scores(volume, volume, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        metrics.structure_scores(volume, volume, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="same shape"):
        metrics.structure_scores(volume, volume[:1])
    with pytest.raises(TypeError, match="boolean"):
        metrics.hd95(volume, volume)


# --------------------------------------------------------------------------------------------------
# volumes and ejection fraction


def test_structure_volume():
    labels = np.zeros((2, 6, 6), dtype=np.uint8)
    labels[0, :2, :2] = 3  # 4 voxels
    labels[1, 0, 0] = 3  # 1 voxel
    labels[1, 5, 5] = 1
    assert metrics.structure_volume(labels, 3) == 5.0
    assert metrics.structure_volume(labels, "LV", spacing=(10.0, 1.5, 1.5)) == pytest.approx(5 * 22.5 / 1000)
    assert metrics.structure_volume(labels == 3, None, spacing=(10.0, 1.5, 1.5)) == pytest.approx(0.1125)
    assert metrics.structure_volume(torch.from_numpy(labels), "RV") == 1.0
    with pytest.raises(TypeError, match="boolean mask"):
        metrics.structure_volume(labels, None)
    with pytest.raises(TypeError, match="label map"):
        metrics.structure_volume(labels == 3, 3)
    with pytest.raises(ValueError, match="3 values"):
        metrics.structure_volume(labels, 3, spacing=(1.0, 1.0))


def test_ejection_fraction():
    assert metrics.ejection_fraction(100, 40) == pytest.approx(60.0)
    # a ratio: voxel counts and ml agree
    assert metrics.ejection_fraction(2000, 800) == pytest.approx(metrics.ejection_fraction(2000 * 0.0225, 800 * 0.0225))
    assert metrics.ejection_fraction(50, 60) == pytest.approx(-20.0)
    with pytest.raises(ValueError, match="edv"):
        metrics.ejection_fraction(0, 0)
    with pytest.raises(ValueError, match="esv"):
        metrics.ejection_fraction(100, -1)
    with pytest.raises(ValueError, match="edv"):
        metrics.ejection_fraction(float("nan"), 10)
    with pytest.raises(TypeError, match="edv"):
        metrics.ejection_fraction("100", 10)


def test_ef_agreement_known_pairs():
    true_ef = [50.0, 60.0, 70.0, 40.0]
    pred_ef = [52.0, 58.0, 75.0, 41.0]
    # differences 2, -2, 5, 1: bias 1.5; squared deviations 0.25 + 12.25 + 12.25 + 0.25 = 25 -> sd sqrt(25/3)
    result = metrics.ef_agreement(true_ef, pred_ef)
    sd = math.sqrt(25 / 3)
    assert result["n"] == 4
    assert result["bias"] == pytest.approx(1.5)
    assert result["sd_diff"] == pytest.approx(sd)
    assert result["loa_low"] == pytest.approx(1.5 - 1.96 * sd)
    assert result["loa_high"] == pytest.approx(1.5 + 1.96 * sd)
    assert result["mae"] == pytest.approx(2.5)
    assert result["pearson_r"] == pytest.approx(st.pearsonr(true_ef, pred_ef).statistic)


def test_ef_agreement_edge_cases():
    shifted = metrics.ef_agreement([40.0, 50.0, 60.0], [43.0, 53.0, 63.0])
    assert shifted["bias"] == pytest.approx(3.0) and shifted["sd_diff"] == pytest.approx(0.0)
    assert shifted["loa_low"] == pytest.approx(3.0) and shifted["pearson_r"] == pytest.approx(1.0)
    assert math.isnan(metrics.ef_agreement([40.0, 50.0], [41.0, 52.0])["pearson_r"])  # n < 3
    assert math.isnan(metrics.ef_agreement([40.0, 50.0, 60.0], [55.0, 55.0, 55.0])["pearson_r"])  # constant
    single = metrics.ef_agreement([40.0], [45.0])
    assert single["bias"] == 5.0 and math.isnan(single["sd_diff"]) and math.isnan(single["loa_high"])
    with pytest.raises(ValueError, match="equal length"):
        metrics.ef_agreement([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        metrics.ef_agreement([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        metrics.ef_agreement([], [])
