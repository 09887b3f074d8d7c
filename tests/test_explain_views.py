"""Tests of cmr_utils.explain.views, stage 05's figures (each with its alternative text) and slice choices, on a
small untrained FPN and synthetic hearts (tests/test_explain.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pytorch_grad_cam")
smp = pytest.importorskip("segmentation_models_pytorch")
torch = pytest.importorskip("torch")

from test_explain import model, synthetic_heart  # noqa: E402,F401  model: test_explain's untrained FPN fixture

from cmr_utils import plots, viewer  # noqa: E402
from cmr_utils.explain import views  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def data():
    images, labels = synthetic_heart(3)
    meta = pd.DataFrame({"patient": ["p1", "p1", "p2"], "slice": [0, 1, 0], "phase": ["ED", "ES", "ED"]})
    return images, labels, meta


def test_best_median_worst_draws_a_row_per_chosen_slice_and_says_which(model, data):
    images, labels, meta = data
    groups = {"best": np.array([2]), "median": np.array([0]), "worst": np.array([1])}
    drawn = views.best_median_worst(model, images, labels, meta, np.array([0.5, 0.1, 0.9]), groups, init="random",
                                    layer="encoder.layer4", region="ground_truth")
    assert isinstance(drawn, plots.Drawn) and len(drawn.figure.axes) == 3 * 6
    assert ("3 rows (best: p2 ED slice 0 | score 0.900; median: p1 ED slice 0 | score 0.500; worst: p1 ES slice 1 | "
            "score 0.100)") in drawn.alt and "the CAM on encoder.layer4" in drawn.alt


def test_across_initialisations_has_a_row_per_model(model, data):
    images, labels, meta = data
    drawn = views.across_initialisations({"random": model, "simsiam": model}, images, labels, meta, 1,
                                         layer="encoder.layer4")
    assert len(drawn.figure.axes) == 2 * 6 and drawn.figure.axes[6].get_ylabel() == "simsiam"
    assert drawn.alt.startswith("Test slice p1 ES slice 1 explained by each initialisation (random, simsiam)")


def test_slice_choices_known_answers(data):
    selected = {"random": {"best": [2], "median": np.array([1])}, "simsiam": {"best": [0], "median": np.array([1])},
                "swav": {"best": [0], "median": np.array([], int)}}
    assert views.shared_medians(selected) == [1]
    assert views.evenly_spaced(10, 4).tolist() == [0, 3, 6, 9] and views.evenly_spaced(3, 10).tolist() == [0, 1, 2]
    images, labels, meta = data
    only_lv = np.where(labels == 3, 3, 0).astype(np.uint8)
    provider = viewer.SliceProvider(images, labels, meta,
                                    predictions={"random": labels, "simsiam": only_lv, "swav": np.zeros_like(labels)},
                                    cam_fn=lambda init, layer, index, category: np.zeros(images.shape[1:], np.float32))
    assert views.montage_selection(provider, selected) == [(2, "RV", "random"), (2, "MYO", "random"),
                                                           (0, "LV", "simsiam"), (0, "MYO", "swav")]


def test_viewer_montage_says_what_each_row_shows(model, data):
    images, labels, meta = data
    provider = viewer.SliceProvider(images, labels, meta, models={"random": model}, layers=["encoder.layer4"])
    drawn = views.viewer_montage(provider, [(0, "LV", "random"), (2, "RV", "random")], "encoder.layer4")
    assert len(drawn.figure.axes) == 2 * 4
    assert "(random: slice 0, LV; random: slice 2, RV)" in drawn.alt
