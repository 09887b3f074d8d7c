"""Stage 04's scoring of one run's predictions, and stage 06's explanation numbers, on known cases."""
import numpy as np
import pandas as pd
import pytest

from cmr_utils.evaluate import ef_agreement_table, score_predictions


def two_volumes():
    """Patient p1, ED (2 slices) and ES (2 slices), spacing known: an LV disc, a MYO ring, an RV block."""
    yy, xx = np.mgrid[:32, :32]
    d = np.hypot(yy - 16, xx - 16)
    ed = np.select([d < 6, d < 8, (xx < 6) & (abs(yy - 16) < 8)], [3, 2, 1], 0).astype(np.uint8)
    es = np.select([d < 4, d < 7, (xx < 5) & (abs(yy - 16) < 6)], [3, 2, 1], 0).astype(np.uint8)
    truth = np.stack([ed, ed, es, es])
    slices = pd.DataFrame({"patient": ["p1"] * 4, "phase": ["ED", "ED", "ES", "ES"], "slice": [0, 1, 0, 1],
                           "spacing_z": 8.0, "spacing_y": 1.5, "spacing_x": 1.5})
    return truth, slices


def test_perfect_prediction_scores_one_and_agrees_on_ef():
    truth, slices = two_volumes()
    scored = score_predictions(truth.copy(), truth, slices)
    assert scored["split_iou"] == 1.0
    assert (scored["per_slice"]["iou"] == 1.0).all() and (scored["per_slice"]["dice"] == 1.0).all()
    pv = scored["per_volume"]
    assert len(pv) == 6 and (pv["dice"] == 1.0).all() and (pv["hd95"] == 0.0).all() and set(pv["hd95_unit"]) == {"mm"}
    ef = scored["ef"].set_index("structure")
    lv_ed, lv_es = (truth[:2] == 3).sum(), (truth[2:] == 3).sum()
    assert ef.loc["LV", "ef_true"] == pytest.approx(100 * (lv_ed - lv_es) / lv_ed)
    assert ef.loc["LV", "ef_pred"] == ef.loc["LV", "ef_true"] and set(ef.index) == {"LV", "RV"}


def test_empty_prediction_scores_zero_and_leaves_ef_undefined():
    truth, slices = two_volumes()
    scored = score_predictions(np.zeros_like(truth), truth, slices)
    assert scored["split_iou"] == 0.0 and (scored["per_volume"]["dice"] == 0.0).all()
    assert scored["per_volume"]["hd95"].isna().all()
    assert scored["ef"]["ef_pred"].isna().all() and scored["ef"]["ef_true"].notna().all()
    table = ef_agreement_table(scored["ef"].assign(init="random"))
    assert list(table["n"]) == [0, 0] and list(table["undefined"]) == [1, 1]


def test_unknown_spacing_gives_pixels():
    truth, slices = two_volumes()
    slices[["spacing_z", "spacing_y", "spacing_x"]] = np.nan
    shifted = np.roll(truth, 2, axis=2)
    pv = score_predictions(shifted, truth, slices)["per_volume"]
    assert set(pv["hd95_unit"]) == {"px"} and pv.loc[pv["structure"] == "LV", "hd95"].max() == pytest.approx(2.0)


def test_explanation_numbers_and_summary():
    import torch

    from cmr_utils.explain import explanation_numbers, summarise_numbers
    from cmr_utils.models import build_segmentation_model

    torch.manual_seed(0)
    model = build_segmentation_model("random").eval()
    truth, _ = two_volumes()
    images = (truth / 3.0).astype(np.float32)
    numbers = explanation_numbers(model, images[:2], truth[:2], layer="encoder.layer3", region="ground_truth", steps=3)
    assert len(numbers) == 2 * 3 and set(numbers["structure"]) == {"RV", "MYO", "LV"}
    for column in ("energy_inside", "energy_ring", "sanity_rho"):
        values = numbers[column].dropna()
        assert ((values >= -1) & (values <= 1)).all()
    assert set(numbers["pointing_hit"].dropna()) <= {0.0, 1.0}
    both = pd.concat([numbers.assign(seed=0), numbers.assign(seed=1)]).assign(init="random", layer="encoder.layer3")
    summary = summarise_numbers(both).set_index("metric")
    assert summary.loc["energy_inside", "mean"] == pytest.approx(numbers["energy_inside"].mean())
    assert summary.loc["energy_inside", "sd_seeds"] == 0.0 and summary.loc["energy_inside", "seeds"] == 2
