"""Tests of cmr_utils.viewer: the CAM viewer redraws on widget changes, headless (Agg backend)."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402

from cmr_utils import viewer  # noqa: E402
from cmr_utils.viewer import CamViewer, SliceProvider, static_montage  # noqa: E402

SIZE = 64


def stack():
    """Six 64 px slices: patient A has ED slices 0-2 and ES slices 0-1, patient B one ED slice.

    Image i is constant i/10 so the drawn image tells which slice was drawn; the ground truth has an RV
    square, a MYO ring and an LV square."""
    meta = pd.DataFrame({
        "patient": ["A", "A", "A", "A", "A", "B"],
        "phase": ["ED", "ED", "ED", "ES", "ES", "ED"],
        "slice": [0, 1, 2, 0, 1, 0],
    })
    images = np.stack([np.full((SIZE, SIZE), i / 10, np.float32) for i in range(len(meta))])
    labels = np.zeros(images.shape, np.uint8)
    labels[:, 8:20, 8:20] = 1
    labels[:, 24:48, 24:48] = 2
    labels[:, 30:42, 30:42] = 3
    return images, labels, meta


class RecordingCam:
    """A fake CAM function: a known CAM per (index, category), and a log of its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, init, layer, index, category):
        self.calls.append((init, layer, index, category))
        cam = np.zeros((SIZE, SIZE), np.float32)
        cam[category * 10:category * 10 + 5] = (index + 1) / 10
        return cam


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture()
def fake_viewer():
    images, labels, meta = stack()
    cam_fn = RecordingCam()
    provider = SliceProvider(images, labels, meta, predictions={"random": labels, "swav": labels * 0},
                             cam_fn=cam_fn)
    yield CamViewer(provider), cam_fn
    plt.close("all")


def test_viewer_builds_and_draws_the_first_slice(fake_viewer):
    view, cam_fn = fake_viewer
    assert view.state == {"patient": "A", "phase": "ED", "slice": 0, "index": 0, "structure": "LV",
                          "init": "random", "layer": "encoder.layer4"}
    assert view.n_redraws == 1 and cam_fn.calls == [("random", "encoder.layer4", 0, 3)]
    assert len(view.last_figure.axes) == 4
    assert set(view.last_arrays) == {"image", "ground_truth", "prediction", "cam"}
    np.testing.assert_array_equal(view.last_arrays["image"], 0.0)
    assert view.widget.children[-1] is view.output


def test_moving_the_slice_slider_redraws_that_slice(fake_viewer):
    view, _ = fake_viewer
    view.slice.value = 2
    assert view.state["index"] == 2 and view.n_redraws == 2
    np.testing.assert_allclose(view.last_arrays["image"], 0.2)
    assert view.last_arrays["cam"].max() == pytest.approx(0.3)
    assert "A ED slice 2" in view.last_figure.axes[0].get_title()


def test_slice_range_follows_patient_and_phase(fake_viewer):
    view, _ = fake_viewer
    view.phase.value = "ES"
    assert list(view.slice.options) == [0, 1] and view.state["index"] in (3, 4)
    view.slice.value = 1
    redraws = view.n_redraws
    view.patient.value = "B"  # phase ES -> ED and slice 1 -> 0 follow
    assert view.n_redraws == redraws + 1  # one redraw for the whole cascade
    assert list(view.phase.options) == ["ED"] and list(view.slice.options) == [0]
    assert view.state["index"] == 5
    np.testing.assert_allclose(view.last_arrays["image"], 0.5)


def test_structure_and_init_changes_recompute_and_cache_the_cam(fake_viewer):
    view, cam_fn = fake_viewer
    view.structure.value = "RV"
    assert cam_fn.calls[-1] == ("random", "encoder.layer4", 0, 1)
    assert view.last_arrays["cam"][10:15].max() > 0 and view.last_arrays["cam"][30:35].max() == 0
    view.init.value = "swav"
    assert cam_fn.calls[-1] == ("swav", "encoder.layer4", 0, 1)
    np.testing.assert_array_equal(view.last_arrays["prediction"], 0)
    view.layer.value = "encoder.layer3"
    assert cam_fn.calls[-1] == ("swav", "encoder.layer3", 0, 1)
    n_calls = len(cam_fn.calls)
    view.layer.value = "encoder.layer4"
    view.init.value = "random"
    view.structure.value = "LV"  # all seen before: served from the cache
    assert len(cam_fn.calls) == n_calls
    assert ("random", "encoder.layer4", 0, 3) in view.provider.cam_cache


def test_viewer_with_a_model_computes_seg_grad_cam_per_structure():
    torch.manual_seed(0)
    model = smp.FPN("resnet18", encoder_weights=None, in_channels=1, classes=4).eval()
    images, labels, meta = stack()
    images = images + np.random.default_rng(0).random(images.shape).astype(np.float32) * 0.5
    provider = SliceProvider(images[:2], labels[:2], meta.iloc[:2], models={"random": model},
                             region="ground_truth", layers=["encoder.layer3"])
    view = CamViewer(provider)
    lv_cam = view.last_arrays["cam"]
    view.structure.value = "MYO"
    myo_cam = view.last_arrays["cam"]
    assert lv_cam.shape == myo_cam.shape == (SIZE, SIZE)
    assert 0 <= myo_cam.min() and myo_cam.max() <= 1 and not np.array_equal(lv_cam, myo_cam)
    assert set(provider.cam_cache) == {("random", "encoder.layer3", 0, 3), ("random", "encoder.layer3", 0, 2)}
    assert view.last_arrays["prediction"].dtype == np.uint8
    plt.close("all")


def test_static_montage_has_four_panels_per_selection():
    images, labels, meta = stack()
    provider = SliceProvider(images, labels, meta, predictions={"random": labels}, cam_fn=RecordingCam())
    figure = static_montage(provider, [(0, "LV", "random"), (3, 2, "random"), (5, "RV", "random")])
    assert len(figure.axes) == 12
    assert "B ED slice 0 | RV | random" in figure.axes[8].get_title()
    with pytest.raises(ValueError, match="structure"):
        static_montage(provider, [(0, "AORTA", "random")])
    plt.close("all")


def test_provider_checks_its_inputs():
    images, labels, meta = stack()
    with pytest.raises(ValueError, match="cam_fn"):
        SliceProvider(images, labels, meta, predictions={"random": labels})
    with pytest.raises(ValueError, match="columns"):
        SliceProvider(images, labels, meta.drop(columns="phase"), predictions={"random": labels},
                      cam_fn=RecordingCam())
    with pytest.raises(ValueError, match="one row per image"):
        SliceProvider(images, labels, meta.iloc[:3], predictions={"random": labels}, cam_fn=RecordingCam())
    with pytest.raises(ValueError, match="at least one"):
        SliceProvider(images, labels, meta, cam_fn=RecordingCam())
    provider = SliceProvider(images, labels, meta, predictions={"random": labels},
                             cam_fn=lambda *args: np.zeros((8, 8)))
    with pytest.raises(ValueError, match="shape"):
        provider.cam("random", "encoder.layer4", 0, "LV")
    with pytest.raises(ValueError, match="init"):
        provider.prediction("imagenet", 0)
    assert viewer.STRUCTURE_CATEGORY == {"RV": 1, "MYO": 2, "LV": 3}
