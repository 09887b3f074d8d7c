"""Locating the heart in a wide field, and the framings of the framing test."""
import numpy as np
import pytest
import torch

from cmr_utils.framing import FRAMINGS, crop_around_heart, framing_scores, framing_table, heart_box, pad_field
from cmr_utils.inference import heart_window, predict_field, predict_probabilities
from cmr_utils.readers import CardiacVolume, DataError


def test_heart_window_known_answers():
    fg = np.zeros((3, 100, 120), bool)
    fg[1:3, 60:80, 90:110] = True  # the heart: rows 60-80, columns 90-110
    fg[0, 5:7, 5:7] = True  # a small false positive elsewhere
    assert heart_window(fg, 40) == (40, 70)  # the centred window (30, 40) moved just enough to hold the heart
    assert heart_window(fg, 64) == (18, 46)  # centred (18, 28) already holds rows 60-80; columns moved to end at 110
    centred = np.zeros((2, 100, 120), bool)
    centred[:, 40:60, 50:70] = True
    assert heart_window(centred, 40) == (30, 40)  # a heart inside the centred window: it stays where training put it
    wide = np.zeros((1, 100, 120), bool)
    wide[0, 10:90, 20:40] = True  # taller than the window: centred on the heart's box
    assert heart_window(wide, 40) == (30, 20)  # and moved across to hold columns 20-40
    assert heart_window(np.zeros((2, 100, 120), bool), 40) == (30, 40)  # no heart: the field's centre


def test_heart_window_takes_the_component_reaching_into_the_centred_window():
    fg = np.zeros((2, 100, 120), bool)
    fg[:, 5:95, 95:118] = True  # chest wall called heart at the field's edge: the largest component
    fg[:, 40:60, 45:75] = True  # the heart, inside the centred window (30, 40)
    assert heart_window(fg, 40) == (30, 40)  # it stays where training put it
    edge_only = np.zeros_like(fg)
    edge_only[:, 5:95, 95:118] = True
    edge_only[0, 2:4, 2:4] = True  # a speck in a corner: neither reaches into the centred window
    assert heart_window(edge_only, 40) == (30, 78)  # the largest then: centred on its rows, its columns held


class PixelwiseModel(torch.nn.Module):
    """Logits that depend on each pixel alone: 'heart' (class 3) where the image is bright."""

    def forward(self, x):
        return torch.cat([1 - 2 * x, 0 * x, 0 * x, 4 * x - 2], dim=1)


def test_predict_field_locates_the_heart_and_predicts_its_window():
    images = np.zeros((2, 150, 201), np.float32)
    images[:, 100:120, 150:180] = 1.0  # a bright 'heart' off-centre
    model = PixelwiseModel().eval()
    probs = predict_field(model, images, 64, batch_size=3, flips=True)
    assert probs.shape == (2, 4, 150, 201) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert np.array_equal(probs.argmax(1) == 3, images > 0.5)  # the heart was inside the predicted window
    y, x = heart_window(images > 0.5, 64)
    assert (y, x) == (56, 116)  # the centred window (43, 68), moved to hold rows 100-120 and columns 150-180
    outside = np.ones((150, 201), bool)
    outside[y:y + 64, x:x + 64] = False
    assert (probs[:, 0][:, outside] == 1).all()  # background outside the window, as trained
    one = predict_field(model, images[:, :64, :64], 64)  # a field of exactly the window: that window
    assert np.array_equal(one, predict_probabilities(model, images[:, :64, :64]))
    with pytest.raises(ValueError, match="H, W >= 64"):
        predict_field(model, images[:, :50], 64)


def volume(h=120, w=100, spacing=(8.0, 1.5, 1.5), patient="p1"):
    label = np.zeros((3, h, w), np.uint8)
    label[:, 40:70, 30:50] = 3
    label[:, 35:75, 50:60] = 2
    label[:, 45:65, 60:70] = 1
    image = label * 0.3 + 0.1
    return CardiacVolume(patient, "ED", image.astype(np.float32), label, spacing, "test", None)


def test_framings_known_answers():
    vol = volume()
    assert heart_box(vol.label) == (35, 75, 30, 70)
    crop = crop_around_heart(vol, 1.0)  # the box's longer side (40 px = 60 mm), centred on the box: 40 x 40
    assert crop.image.shape == (3, 40, 40) and np.count_nonzero(crop.label) == np.count_nonzero(vol.label)
    assert crop.spacing == vol.spacing and crop.patient == "p1"
    assert crop_around_heart(vol, 1.5).image.shape == (3, 60, 60)
    wide = crop_around_heart(vol, 4.0)  # clipped at the slice's edges
    assert wide.image.shape == (3, 120, 100)
    padded = pad_field(vol, 2.0)
    assert padded.image.shape == (3, 240, 200) and np.array_equal(padded.label[:, 60:180, 50:150], vol.label)
    assert padded.image[:, :60].max() == 0
    with pytest.raises(DataError, match="no labelled voxel"):
        crop_around_heart(CardiacVolume("p", "ED", vol.image, np.zeros_like(vol.label), None, "t", None), 1.0)


def test_framing_scores_of_an_oracle_and_of_a_segmenter_that_misses():
    vols = [volume(), volume(140, 90, patient="p2")]
    oracle = framing_scores(lambda v: v.label, vols)
    assert set(oracle["framing"]) == set(FRAMINGS) and (oracle["dice"] == 1.0).all()
    table = framing_table(oracle)
    assert list(table.index) == list(FRAMINGS) and (table["vs original"] == 0).all() and (table["volumes"] == 2).all()
    # a segmenter that finds the heart only when the field is at least 100 px (what pixel geometry amounts to)
    missing = framing_table(framing_scores(lambda v: v.label if v.image.shape[1] >= 100 else 0 * v.label, vols))
    assert missing.loc["heart crop 1.0×", "dice"] == 0 and missing.loc["padded 2× field", "dice"] == 1.0
