"""The field-of-view geometry, both ways: original slice -> model grid -> original grid."""
import numpy as np
import pytest

from cmr_utils.geometry import SliceGeometry, one_hot
from cmr_utils.readers import open_source


def dice(a, b, k):
    a, b = a == k, b == k
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_numbers_known_answers():
    g = SliceGeometry(100, 120, "pad", 0.8, 64)
    assert (g.side, g.crop, g.origin) == (120, 96, (2, 12)) and g.spacing_factor == pytest.approx(96 / 64)
    g = SliceGeometry(100, 120, "crop", 0.8, 64)
    assert (g.side, g.crop, g.origin) == (100, 80, (10, 20)) and g.spacing_factor == pytest.approx(80 / 64)
    g = SliceGeometry(100, 120, "pad", 1.0, 60)
    assert (g.crop, g.origin, g.spacing_factor) == (120, (-10, 0), 2.0)
    assert SliceGeometry.from_manifest({"resize": "crop", "image_size": 32}, 10, 20) == SliceGeometry(10, 20, "crop", 1.0, 32)
    with pytest.raises(ValueError, match="field_of_view"):
        SliceGeometry(10, 10, "pad", 1.2, 32)
    with pytest.raises(ValueError, match="resize: expected 'pad' or 'crop'"):
        SliceGeometry(10, 10, "stretch", 1.0, 32)
    with pytest.raises(ValueError, match="prob_stack: expected shape"):
        SliceGeometry(10, 10, "pad", 1.0, 32).to_native(np.zeros((2, 4, 16, 16), np.float32))


def test_field_of_view_crops_and_enlarges():
    """fov 0.5 at size = half the side: the central quarter at full resolution, a block outside it is lost
    forward and comes back as background (probability 1) backward."""
    label = np.zeros((2, 40, 40), np.uint8)
    label[:, 15:25, 15:25] = 3  # centre: kept
    label[:, 1:5, 1:5] = 1  # corner: outside the field of view
    image = label / 3.0
    g = SliceGeometry(40, 40, "pad", 0.5, 20)
    img, lab = g.to_model(image, label)
    assert img.shape == lab.shape == (2, 20, 20) and g.spacing_factor == 1.0
    assert np.array_equal(lab, label[:, 10:30, 10:30]) and not (lab == 1).any()
    probs = g.to_native(one_hot(lab))
    assert probs.shape == (2, 4, 40, 40)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert (probs[:, 0, :10] == 1).all() and (probs[:, 1:, :10] == 0).all()  # outside: background
    back = probs.argmax(1)
    assert np.array_equal(back == 3, label == 3) and not (back == 1).any()


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_native_shape_is_exact_for_odd_sizes(mode):
    rng = np.random.default_rng(0)
    for h, w in [(101, 77), (77, 101), (64, 64), (33, 130)]:
        for fov in (1.0, 0.8, 0.37):
            g = SliceGeometry(h, w, mode, fov, 32)
            img, lab = g.to_model(rng.random((3, h, w)).astype(np.float32), rng.integers(0, 4, (3, h, w)))
            assert img.shape == lab.shape == (3, 32, 32)
            assert g.to_native(one_hot(lab)).shape == (3, 4, h, w)
            assert g.labels_to_native(g.label_probabilities(rng.integers(0, 4, (3, h, w)))).shape == (3, h, w)


def test_crop_mode_margins_are_background():
    label = np.zeros((1, 20, 40), np.uint8)
    label[:, 5:15, 2:6] = 2  # in the left margin that crop mode cuts off
    label[:, 8:12, 18:22] = 3
    g = SliceGeometry(20, 40, "crop", 1.0, 20)
    _, lab = g.to_model(label.astype(np.float32), label)
    back = g.labels_to_native(one_hot(lab))
    assert back.shape == (1, 20, 40) and not (back == 2).any() and np.array_equal(back == 3, label == 3)


@pytest.fixture(scope="module")
def phantom_volumes(phantom_sources):
    return list(open_source(phantom_sources[0]).volumes())


def test_phantom_structures_lie_within_the_central_field_of_view(phantom_volumes):
    for vol in phantom_volumes:
        _, h, w = vol.label.shape
        for mode in ("pad", "crop"):
            g = SliceGeometry(h, w, mode, 0.8, 64)
            (y0, x0), c = g.origin, g.crop
            inside = np.zeros((h, w), bool)
            inside[max(0, y0):y0 + c, max(0, x0):x0 + c] = True
            assert not (vol.label[:, ~inside]).any(), (vol.patient, vol.phase, mode)


@pytest.mark.parametrize("mode", ["pad", "crop"])
@pytest.mark.parametrize("fov", [1.0, 0.8])
def test_phantom_round_trip_reproduces_the_labels(phantom_volumes, mode, fov):
    """Labels -> model grid -> one-hot -> original grid reproduces the labels (exact shape, Dice > 0.97 per
    structure) where the model grid is at least as fine as the slice (160 px). On a coarser grid (64, 128 px)
    hard labels lose up to a model pixel at every edge (measured on this phantom: Dice 0.86-0.99), so
    there the area-averaged label probabilities (a perfect model at that resolution) are the exact test."""
    for vol in phantom_volumes:
        z, h, w = vol.label.shape
        g = SliceGeometry(h, w, mode, fov, 160)
        _, lab = g.to_model(vol.image / vol.image.max(), vol.label)
        hard = g.labels_to_native(one_hot(lab))
        assert hard.shape == vol.label.shape and hard.dtype == np.uint8
        for k in (1, 2, 3):
            assert dice(hard, vol.label, k) > 0.97, (vol.patient, vol.phase, k)
        for size in (64, 128):
            g = SliceGeometry(h, w, mode, fov, size)
            soft = g.labels_to_native(g.label_probabilities(vol.label))
            assert soft.shape == vol.label.shape
            for k in (1, 2, 3):
                assert dice(soft, vol.label, k) > 0.97, (vol.patient, vol.phase, size, k)


def test_resize_volume_is_the_geometry(phantom_volumes):
    from cmr_utils.prepare import resize_volume

    vol = phantom_volumes[0]
    _, h, w = vol.image.shape
    image = vol.image / vol.image.max()
    img, lab, factor = resize_volume(image, vol.label, 64, "pad", 0.8)
    g = SliceGeometry(h, w, "pad", 0.8, 64)
    ref_img, ref_lab = g.to_model(image, vol.label)
    assert np.array_equal(img, ref_img) and np.array_equal(lab, ref_lab) and factor == g.spacing_factor


def test_real_acdc_within_field_of_view_and_round_trip():
    from conftest import real_dir

    source = open_source(real_dir("CMR_ACDC_DIR"))
    for vol in source.volumes(source.patients()[:3]):
        _, h, w = vol.label.shape
        g = SliceGeometry(h, w, "pad", 0.8, 128)
        (y0, x0), c = g.origin, g.crop
        inside = np.zeros((h, w), bool)
        inside[max(0, y0):y0 + c, max(0, x0):x0 + c] = True
        assert not vol.label[:, ~inside].any()
        soft = g.labels_to_native(g.label_probabilities(vol.label))
        assert soft.shape == vol.label.shape
        for k in (1, 2, 3):
            assert dice(soft, vol.label, k) > 0.98, (vol.patient, vol.phase, k)


# ---------------------------------------------------------------------------------------------- physical geometry
def test_physical_numbers_known_answers():
    from cmr_utils.geometry import PhysicalGeometry, canvas_window, geometry_for

    g = PhysicalGeometry(200, 180, 1.5, 1.5, 2.0, 128)
    assert g.resampled_shape == (150, 135) and g.canvas_shape == (150, 135)
    assert g.model_spacing() == pytest.approx((2.0, 2.0))
    small = PhysicalGeometry(100, 80, 1.0, 1.0, 2.0, 64)  # a 100 x 80 mm field: smaller than the 128 mm window
    assert small.resampled_shape == (50, 40) and small.canvas_shape == (64, 64)
    canvas = np.arange(150 * 135).reshape(1, 150, 135)
    assert np.array_equal(canvas_window(canvas, 128), canvas[:, 11:139, 3:131])
    assert isinstance(geometry_for({"geometry": "physical", "target_spacing": 2.0, "image_size": 128, "resize": "pad"},
                                   200, 180, (8.0, 1.5, 1.5)), PhysicalGeometry)
    # no spacing, or a manifest from before physical geometry: pixel geometry
    assert isinstance(geometry_for({"geometry": "physical", "target_spacing": 2.0, "image_size": 128, "resize": "pad"},
                                   200, 180, None), SliceGeometry)
    assert isinstance(geometry_for({"image_size": 128, "resize": "pad"}, 200, 180, (8.0, 1.5, 1.5)), SliceGeometry)
    with pytest.raises(ValueError, match="target_spacing: expected a positive number"):
        PhysicalGeometry(10, 10, 1.0, 1.0, 0.0, 32)
    with pytest.raises(ValueError, match="prob_stack: expected shape"):
        g.to_native(np.zeros((2, 4, 64, 64), np.float32))


def test_physical_geometry_sees_one_size_in_mm_whatever_the_pixel_size():
    """A 60 mm disk imaged at 0.7 mm and at 1.8 mm per pixel covers the same number of model pixels (the disk's
    area in mm^2 / target^2), on the training window and on the canvas, and maps back to itself."""
    from cmr_utils.geometry import PhysicalGeometry, canvas_window

    areas = []
    for spacing in (0.7, 1.8):
        n = round(300 / spacing)  # a 300 mm field
        yy, xx = np.mgrid[:n, :n]
        label = ((((yy + 0.5) * spacing - 160) ** 2 + ((xx + 0.5) * spacing - 140) ** 2) < 30 ** 2)[None]
        label = label.astype(np.uint8) * 3
        g = PhysicalGeometry(n, n, spacing, spacing, 2.5, 96)
        _, window = g.to_model(label / 3.0, label)
        areas.append(np.count_nonzero(window == 3))
        canvas = g.label_probabilities(label, on_canvas=True)
        assert canvas.shape[-2:] == g.canvas_shape == (120, 120)
        assert np.allclose(canvas_window(canvas, 96), g.label_probabilities(label))
        back = g.labels_to_native(canvas)
        assert back.shape == label.shape and dice(back, label, 3) > 0.98
    expected = np.pi * 30 ** 2 / 2.5 ** 2
    assert areas == pytest.approx([expected, expected], rel=0.03)


def test_framing_changes_the_scale_in_pixel_geometry_not_in_physical(phantom_volumes):
    """The framing test on the phantom, without a model: the heart's area on the model's input (the canvas) in a
    tight crop around the heart and in a field padded to twice its size, against the original framing. Physical
    geometry keeps it within 5 % (resampling rounds the field to whole pixels); pixel geometry (the compendium before
    physical geometry: the scan's own field of view) more than doubles the tightly cropped heart and shrinks the padded one to a quarter."""
    from cmr_utils.framing import crop_around_heart, pad_field
    from cmr_utils.geometry import PhysicalGeometry

    def heart_area(vol, physical):
        z, h, w = vol.label.shape
        g = PhysicalGeometry(h, w, *vol.spacing[1:], 2.0, 64) if physical else SliceGeometry(h, w, "pad", 0.8, 64)
        probs = g.label_probabilities(vol.label, on_canvas=True)
        return float(probs[:, 1:].sum())

    for vol in phantom_volumes[:4]:
        framings = {"crop": crop_around_heart(vol, 1.25), "padded": pad_field(vol, 2.0)}
        assert framings["crop"].image.shape[1] < 0.7 * vol.image.shape[1]
        original = {True: heart_area(vol, True), False: heart_area(vol, False)}
        for name, framed in framings.items():
            assert heart_area(framed, True) == pytest.approx(original[True], rel=0.05), (vol.patient, name)
        assert heart_area(framings["crop"], False) > 2 * original[False]
        assert heart_area(framings["padded"], False) < 0.3 * original[False]


def test_runs_base_to_apex_known_answers():
    """A slice axis along the heart's long axis (left, anterior, inferior in RAS) runs base to apex, the opposite
    axis apex to base; a stack along a patient axis (axial, sagittal, coronal), a missing or degenerate affine:
    unknown."""
    from cmr_utils.geometry import APEX_RAS, runs_base_to_apex

    def affine(step):
        a = np.eye(4)
        a[:3, 2] = step
        return a

    tilted = 10 * (APEX_RAS + np.array([0.2, 0.0, 0.1]))  # an oblique stack, 10 mm apart, off the mean axis
    assert runs_base_to_apex(affine(tilted)) is True
    assert runs_base_to_apex(affine(-tilted)) is False
    for axis in np.eye(3):
        assert runs_base_to_apex(affine(8 * axis)) is None and runs_base_to_apex(affine(-8 * axis)) is None
    assert runs_base_to_apex(None) is None and runs_base_to_apex(affine(np.zeros(3))) is None
