"""Tests of cmr_utils.explain (Seg-Grad-CAM and the numbers for explanations) and cmr_utils.inference.predict, on tiny
synthetic data."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import segmentation_models_pytorch as smp  # noqa: E402
import torch  # noqa: E402
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from torch import nn  # noqa: E402

from cmr_utils import explain, inference  # noqa: E402
from cmr_utils.explain import faithfulness  # noqa: E402

SIZE = 64  # the FPN needs multiples of 32; at 64 px encoder.layer4 is 2x2, enough for a CAM


def synthetic_heart(n: int, size: int = SIZE, seed: int = 0):
    """Images (n, size, size) and labels: an LV disc, a MYO ring around it, an RV blob beside it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images = np.zeros((n, size, size), np.float32)
    labels = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        cy, cx = size // 2 + rng.integers(-3, 4), size // 2 + rng.integers(-3, 4)
        r = np.hypot(yy - cy, xx - cx)
        labels[i][np.hypot(yy - cy, xx - cx - size // 4) < size // 7] = 1
        labels[i][(r >= size // 8) & (r < size // 5)] = 2
        labels[i][r < size // 8] = 3
        images[i] = np.select([labels[i] == 3, labels[i] == 2, labels[i] == 1], [0.9, 0.3, 0.7], 0.1)
        images[i] = np.clip(images[i] + rng.normal(0, 0.03, images[i].shape), 0, 1)
    return images, labels


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def model(one_thread):
    torch.manual_seed(0)
    return smp.FPN("resnet18", encoder_weights=None, in_channels=1, classes=4).eval()


@pytest.fixture(scope="module")
def data():
    return synthetic_heart(3)


# ------------------------------------------------------------------ Seg-Grad-CAM


def test_cam_shape_range_and_zero_for_empty_region(model, data):
    images, labels = data
    masks = labels == 1
    masks[1] = False  # slice 1: empty region
    cams = explain.seg_grad_cam(model, images, 1, masks=masks)
    assert cams.shape == images.shape and cams.dtype == np.float32
    assert np.isfinite(cams).all() and cams.min() >= 0 and cams.max() <= 1
    assert np.all(cams[1] == 0)
    assert cams[0].max() > 0.99 and cams[2].max() > 0.99  # min-max scaled where there is a target


def test_cam_equals_plain_pytorch_grad_cam(model, data):
    images, labels = data
    masks = (labels == 2).astype(np.float32)
    ours = explain.seg_grad_cam(model, images, 2, masks=masks)
    reference = GradCAM(model=model, target_layers=[model.encoder.layer4])(
        input_tensor=torch.from_numpy(images[:, None]),
        targets=[SemanticSegmentationTarget(2, m) for m in masks],
    )
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    model.zero_grad(set_to_none=True)  # the reference call leaves weight gradients behind


def test_cam_default_region_is_the_prediction_and_batches_agree(model, data):
    images, _ = data
    predicted, _ = inference.predict(model, images)
    category = int(np.bincount(predicted.ravel(), minlength=4)[1:].argmax()) + 1  # a predicted class
    default = explain.seg_grad_cam(model, images, category, batch_size=2)
    given = explain.seg_grad_cam(model, images, category, masks=predicted == category, batch_size=3)
    np.testing.assert_allclose(default, given, atol=1e-4)  # batch size changes float rounding only
    assert default.any()


def test_cam_runs_under_no_grad_and_inference_mode_and_leaves_model_as_it_was(model, data):
    images, labels = data
    masks = labels == 3
    expected = explain.seg_grad_cam(model, images[:2], 3, masks=masks[:2])
    for p in model.encoder.parameters():
        p.requires_grad_(False)  # a frozen encoder must be explainable too
    model.decoder.train()  # a mixed mode must survive
    head = model.segmentation_head[0].weight
    head.grad = torch.full_like(head, 7.0)  # a gradient left by a training step must survive
    try:
        with torch.inference_mode():
            tensor_input = torch.from_numpy(images[:2, None])
            in_inference = explain.seg_grad_cam(model, tensor_input, 3, masks=masks[:2])
        model.decoder.eval()
        with torch.no_grad():
            in_no_grad = explain.seg_grad_cam(model, images[:2], 3, masks=masks[:2])
        model.decoder.train()
        explain.seg_grad_cam(model, images[:1], 3, masks=masks[:1])
        assert model.decoder.training and not model.encoder.training
        assert not any(p.requires_grad for p in model.encoder.parameters())
        assert all(p.requires_grad for p in model.decoder.parameters())
        assert torch.equal(head.grad, torch.full_like(head, 7.0))
        assert all(p.grad is None for p in model.parameters() if p is not head)
    finally:
        head.grad = None
        for p in model.encoder.parameters():
            p.requires_grad_(True)
        model.eval()
    np.testing.assert_array_equal(in_inference, expected)
    np.testing.assert_array_equal(in_no_grad, expected)
    with torch.inference_mode():
        rho = explain.sanity_check_randomised(model, images[:1], 3, layer="encoder.layer3", masks=masks[:1])
    assert rho.shape == (1,) and -1 <= rho[0] <= 1
    with torch.inference_mode():
        inference_model = smp.FPN("resnet18", encoder_weights=None, in_channels=1, classes=4).eval()
    with pytest.raises(ValueError, match="inference"):
        explain.seg_grad_cam(inference_model, images[:1], 3, masks=masks[:1])


def test_cam_checks_its_inputs(model, data):
    images, labels = data
    with pytest.raises(ValueError, match="category"):
        explain.seg_grad_cam(model, images, 4, masks=labels == 1)
    with pytest.raises(ValueError, match="masks"):
        explain.seg_grad_cam(model, images, 1, masks=(labels == 1)[:2])
    with pytest.raises(ValueError, match="images"):
        explain.seg_grad_cam(model, images[0], 1)
    with pytest.raises(ValueError, match="unknown layer"):
        explain.seg_grad_cam(model, images, 1, layer="encoder.layer9")


def test_logits_wrapper_unwraps_dict_and_tuple_outputs():
    class DictModel(nn.Module):
        def forward(self, x):
            return {"out": x.repeat(1, 4, 1, 1), "aux": x}

    class TupleModel(nn.Module):
        def forward(self, x):
            return (x.repeat(1, 4, 1, 1) * 2, x)

    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(inference.LogitsWrapper(DictModel())(x), x.repeat(1, 4, 1, 1))
    torch.testing.assert_close(inference.LogitsWrapper(TupleModel())(x), x.repeat(1, 4, 1, 1) * 2)
    with pytest.raises(ValueError, match="key"):
        inference.LogitsWrapper(DictModel(), key="logits")(x)


def test_resolve_layer_finds_layers_and_lists_candidates(model):
    assert explain.resolve_layer(model) is model.encoder.layer4
    assert explain.resolve_layer(inference.LogitsWrapper(model), "decoder.p5") is model.decoder.p5
    with pytest.raises(ValueError) as error:
        explain.resolve_layer(model, "encoder.layer5")
    assert "encoder.layer3" in str(error.value) and "decoder" in str(error.value)


def test_predict_gives_argmax_labels(model, data):
    images, _ = data
    labels, logits = inference.predict(model, images, batch_size=2, return_logits=True)
    assert labels.dtype == np.uint8 and labels.shape == images.shape
    assert logits.shape == (3, 4, SIZE, SIZE)
    np.testing.assert_array_equal(labels, logits.argmax(axis=1))
    assert inference.predict(model, images)[1] is None


def test_predict_rejects_bad_input_with_clear_errors(model, data):
    images, _ = data
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        inference.predict(model, images, batch_size=0)
    with pytest.raises(ValueError, match=r"images must have shape \(N, H, W\)"):
        inference.predict(model, images[0])
    with pytest.raises(ValueError, match="empty"):
        inference.predict(model, images[:0])
    with pytest.raises(ValueError, match="NaN"):
        inference.predict(model, np.full_like(images, np.nan))
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        inference.predict(model, images.tolist())


# ------------------------------------------------------------------ numbers with known answers


def test_energy_inside_known_answers():
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    assert explain.energy_inside(mask.astype(float), mask) == 1.0
    assert explain.energy_inside((~mask).astype(float), mask) == 0.0
    cam = np.zeros((4, 4))
    cam[1, 1], cam[2, 2], cam[0, 0] = 1.0, 0.5, 0.5  # 1.5 of 2.0 inside
    assert explain.energy_inside(cam, mask) == pytest.approx(0.75)
    assert np.isnan(explain.energy_inside(np.zeros((4, 4)), mask))
    assert np.isnan(explain.energy_inside(cam, np.zeros((4, 4), bool)))
    stack = explain.energy_inside(np.stack([mask.astype(float), cam]), np.stack([mask, mask]))
    np.testing.assert_allclose(stack, [1.0, 0.75])


def test_energy_in_ring_known_answers():
    mask = np.zeros((11, 11), bool)
    mask[5, 5] = True
    assert explain.ring_around(mask, 1).sum() == 8 and explain.ring_around(mask, 2).sum() == 24
    block = np.zeros((11, 11))
    block[4:7, 4:7] = 1.0  # the pixel and its 8 neighbours
    assert explain.energy_in_ring(block, mask, width=1) == pytest.approx(8 / 9)
    far = np.zeros((11, 11))
    far[5, 7] = 1.0  # two pixels away: outside a 1-px ring, inside a 2-px one
    assert explain.energy_in_ring(far, mask, width=1) == 0.0
    assert explain.energy_in_ring(far, mask, width=2) == 1.0
    # slices of a stack are dilated separately
    stack = explain.energy_in_ring(np.stack([block, block]), np.stack([mask, np.zeros_like(mask)]), width=1)
    assert stack[0] == pytest.approx(8 / 9) and np.isnan(stack[1])


def test_pointing_hit_known_answers():
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = True
    cam = np.zeros((5, 5))
    cam[0, 0] = 1.0
    assert explain.pointing_hit(cam, mask) is True
    outside = np.zeros((5, 5))
    outside[4, 4] = 1.0
    assert explain.pointing_hit(outside, mask) is False
    tie = outside.copy()
    tie[0, 0] = 1.0  # two maxima, one inside
    assert explain.pointing_hit(tie, mask) is True
    assert np.isnan(explain.pointing_hit(np.zeros((5, 5)), mask))
    assert np.isnan(explain.pointing_hit(cam, np.zeros((5, 5), bool)))
    rates = explain.pointing_hit(np.stack([cam, outside, np.zeros((5, 5))]), np.stack([mask] * 3))
    np.testing.assert_array_equal(rates, [1.0, 0.0, np.nan])


def test_cam_rank_correlation_matches_spearman():
    rng = np.random.default_rng(1)
    a, b = rng.random((2, 3, 6, 6))
    b[0] = np.round(b[0], 1)  # ties
    rho = explain.cam_rank_correlation(a, b)
    for i in range(3):
        assert rho[i] == pytest.approx(spearmanr(a[i].ravel(), b[i].ravel()).statistic)
    assert explain.cam_rank_correlation(a[0], a[0]) == pytest.approx(1.0)
    assert explain.cam_rank_correlation(a[0], -a[0]) == pytest.approx(-1.0)
    assert np.isnan(explain.cam_rank_correlation(a[0], np.zeros((6, 6))))


# ------------------------------------------------------------------ deletion / insertion


class IdentityLogits(nn.Module):
    """Class-1 logits equal the image, others zero: the score is the image's sum over the region, so the
    most relevant pixels are the brightest ones inside it (a known answer for faithfulness)."""

    def forward(self, x):
        zeros = torch.zeros_like(x)
        return torch.cat([zeros, x, zeros, zeros], dim=1)


def test_deletion_insertion_endpoints_equal_the_baseline_score(model, data):
    images, labels = data
    image, region = images[0], labels[0] == 3
    cam = explain.seg_grad_cam(model, images[:1], 3, masks=region[None])[0]
    for baseline in ("blur", "mean"):
        result = explain.deletion_insertion(model, image, 3, cam, region, steps=4, baseline=baseline)
        base = faithfulness._baseline_image(image, baseline, 5.0)
        _, logits = inference.predict(model, np.stack([image, base]), return_logits=True)
        unperturbed, baseline_score = (logits[:, 3] * region).sum(axis=(1, 2))
        np.testing.assert_allclose(result["fractions"], [0, 0.25, 0.5, 0.75, 1.0])
        for curve in ("deletion", "random_deletion"):
            assert result[curve][0] == pytest.approx(unperturbed, rel=1e-4)
            assert result[curve][-1] == pytest.approx(baseline_score, rel=1e-4)
        for curve in ("insertion", "random_insertion"):
            assert result[curve][0] == pytest.approx(baseline_score, rel=1e-4)
            assert result[curve][-1] == pytest.approx(unperturbed, rel=1e-4)
        assert abs(result["deletion_curve"][0]) == pytest.approx(1.0)
        assert np.isfinite(result["deletion_auc"]) and np.isfinite(result["insertion_auc"])
        if baseline == "mean":
            np.testing.assert_allclose(base, image.mean())


def test_deletion_insertion_faithful_cam_beats_random_order():
    image = np.random.default_rng(2).random((16, 16)).astype(np.float32)
    region = np.zeros((16, 16), bool)
    region[4:12, 4:12] = True
    cam = image * region  # exactly each pixel's contribution to the score
    result = explain.deletion_insertion(IdentityLogits(), image, 1, cam, region, steps=8, baseline="mean")
    assert result["deletion_auc"] < result["random_deletion_auc"]
    assert result["insertion_auc"] > result["random_insertion_auc"]
    assert result["score_unperturbed"] == pytest.approx(image[region].sum(), rel=1e-5)
    assert result["deletion_curve"][0] == pytest.approx(1.0)
    # the same seed gives the same random reference; an empty region gives NaN AUCs
    again = explain.deletion_insertion(IdentityLogits(), image, 1, cam, region, steps=8, baseline="mean")
    np.testing.assert_array_equal(again["random_deletion"], result["random_deletion"])
    empty = explain.deletion_insertion(IdentityLogits(), image, 1, cam, np.zeros_like(region), steps=2)
    assert np.isnan(empty["deletion_auc"]) and np.all(empty["deletion"] == 0)
    with pytest.raises(ValueError, match="baseline"):
        explain.deletion_insertion(IdentityLogits(), image, 1, cam, region, baseline="zeros")


# ------------------------------------------------------------------ sanity check


def test_randomised_copy_changes_weights_only_in_the_copy(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = torch.random.get_rng_state()
    copy_a = explain.randomised_copy(model, seed=3)
    copy_b = explain.randomised_copy(model, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    weight = "encoder.layer4.0.conv1.weight"
    assert not torch.equal(copy_a.state_dict()[weight], before[weight])
    assert torch.equal(copy_a.state_dict()[weight], copy_b.state_dict()[weight])  # seeded
    assert not copy_a.training


def test_sanity_check_correlations(model, data, monkeypatch):
    images, labels = data
    masks = labels == 3
    # encoder.layer3 (4x4 at 64 px): the untrained model's layer4 CAM of the LV can be all zero (NaN rho)
    rho = explain.sanity_check_randomised(model, images[:2], 3, layer="encoder.layer3", seed=0, masks=masks[:2])
    assert rho.shape == (2,) and np.all((rho >= -1) & (rho <= 1))
    assert np.all(rho < 0.999)  # the random model explains differently
    # with an "identical" randomised model, the CAMs coincide: correlation 1
    monkeypatch.setattr(faithfulness, "randomised_copy", lambda m, seed=0: m)
    same = explain.sanity_check_randomised(model, images[:2], 3, layer="encoder.layer3", seed=0, masks=masks[:2])
    np.testing.assert_allclose(same, 1.0)


# ------------------------------------------------------------------ selecting slices


def test_select_slices_known_scores_with_nans_and_ties():
    scores = [0.5, np.nan, 0.9, 0.1, 0.9, 0.3, 0.7, 0.5, 0.2, 0.6, 0.4]
    # ascending valid: 3(.1) 8(.2) 5(.3) 10(.4) 0(.5) 7(.5) 9(.6) 6(.7) 2(.9) 4(.9); median rank 4.5
    chosen = explain.select_slices(scores, n_best=3, n_worst=2, n_median=2)
    np.testing.assert_array_equal(chosen["best"], [2, 4, 6])
    np.testing.assert_array_equal(chosen["worst"], [3, 8])
    np.testing.assert_array_equal(chosen["median"], [0, 7])
    chosen = explain.select_slices(scores, n_best=1, n_worst=1, n_median=3)
    np.testing.assert_array_equal(chosen["median"], [10, 0, 7])  # ranks 3, 4, 5 around 4.5


def test_select_slices_with_few_slices_and_errors():
    chosen = explain.select_slices([0.2, 0.9, np.nan, 0.5])
    assert [list(chosen[g]) for g in ("best", "worst", "median")] == [[1], [0], [3]]
    two = explain.select_slices([0.3, 0.8])
    assert list(two["best"]) == [1] and list(two["worst"]) == [0] and len(two["median"]) == 0
    with pytest.raises(ValueError, match="no valid"):
        explain.select_slices([np.nan, np.nan])
    with pytest.raises(ValueError, match="no valid"):
        explain.select_slices([])
    with pytest.raises(ValueError, match="n_best"):
        explain.select_slices([0.1], n_best=-1)


# ------------------------------------------------------------------ drawing


def test_overlay_is_float_rgb_and_red_where_the_cam_is_high():
    image = np.full((8, 8), 0.2, np.float32)
    cam = np.zeros((8, 8), np.float32)
    cam[:4] = 1.0
    rgb = explain.overlay(image, cam)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0 and rgb.max() <= 1
    assert rgb[0, 0, 0] > rgb[0, 0, 2] and rgb[7, 7, 2] > rgb[7, 7, 0]  # jet: red high, blue low
    with pytest.raises(ValueError, match="image"):
        explain.overlay(image * 10, cam)


def test_plots_have_the_expected_panels(model, data):
    import matplotlib.pyplot as plt

    images, labels = data
    rows = explain.build_rows(model, images, labels, [0, 2], titles=["p1 slice 0", "p1 slice 2"],
                              region="ground_truth")
    assert len(rows) == 2 and set(rows[0].cams) == {1, 2, 3}
    figure = explain.plot_explanations(rows)
    assert len(figure.axes) == 2 * 6
    assert "p1 slice 0" in figure.axes[0].get_title() and figure.axes[5].get_title() == "CAM LV"
    side_by_side = explain.plot_initialisations(
        images[0], labels[0],
        {"random": rows[0].prediction, "simsiam": rows[1].prediction, "swav": rows[0].prediction},
        {"random": rows[0].cams, "simsiam": rows[1].cams, "swav": rows[0].cams},
        title=explain.row_title("p1", 0, 0.91234),
    )
    assert len(side_by_side.axes) == 3 * 6
    assert side_by_side.axes[6].get_ylabel() == "simsiam"
    assert "score 0.912" in side_by_side.axes[0].get_title()
    plt.close("all")
