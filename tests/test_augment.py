"""cmr_utils.augment: the cross-centre augmentations (scale as a range, contrast, brightness, noise, blur) and the
guarantee that with them off a seed augments exactly as before they existed."""
import math

import pytest
import torch
import torch.nn.functional as F

from cmr_utils.augment import _gaussian_blur, augment_batch
from cmr_utils.report import _augment

OFF = {"contrast": 0, "brightness": 0, "noise": 0, "blur": 0}


def old_augment_batch(image, label, *, flips=False, rotation_deg=0.0, scale=0.0, gamma=0.0, crop=0, generator=None):
    """A verbatim copy of augment_batch before contrast, brightness, noise, blur and scale pairs (validation left out):
    the reference that the new code must reproduce bit for bit with them off."""
    b, device = image.shape[0], image.device

    def uniform(low, high):
        return low + (high - low) * torch.rand(b, generator=generator, device="cpu").to(device)

    if flips:
        flip_x, flip_y = uniform(0, 1) < 0.5, uniform(0, 1) < 0.5
        image = torch.where(flip_x[:, None, None, None], image.flip(-1), image)
        label = torch.where(flip_x[:, None, None], label.flip(-1), label)
        image = torch.where(flip_y[:, None, None, None], image.flip(-2), image)
        label = torch.where(flip_y[:, None, None], label.flip(-2), label)
    if rotation_deg > 0 or scale > 0 or crop:
        angle = uniform(-rotation_deg, rotation_deg) * (math.pi / 180)
        zoom = uniform(1 - scale, 1 + scale)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros(b, 2, 3, device=device, dtype=torch.float32)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        shape = list(image.shape)
        if crop:
            h, w = shape[2:]
            theta[:, 0, :2] *= crop / w
            theta[:, 1, :2] *= crop / h
            theta[:, 0, 2] = uniform(-(1 - crop / w), 1 - crop / w)
            theta[:, 1, 2] = uniform(-(1 - crop / h), 1 - crop / h)
            shape[2:] = [crop, crop]
        grid = F.affine_grid(theta, shape, align_corners=False)
        image = F.grid_sample(image.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        label = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)[:, 0].to(label.dtype)
    if gamma > 0:
        log_g = uniform(math.log(1 - gamma), -math.log(1 - gamma))
        image = image.clamp(0, 1) ** torch.exp(log_g)[:, None, None, None]
    return image, label


def disks(b=4, size=64, radius=10):
    """Centred disks: label 1 inside (image 0.6), 0 outside (image 0.2), plus a faint gradient so flips show."""
    yy, xx = torch.meshgrid(torch.arange(size) - (size - 1) / 2, torch.arange(size) - (size - 1) / 2, indexing="ij")
    label = (yy ** 2 + xx ** 2 <= radius ** 2).long()[None].repeat(b, 1, 1)
    image = (0.2 + 0.4 * label.float() + 0.1 * (xx + yy + size) / (2 * size))[:, None]
    return image, label


def total_variation(image):
    return (image[..., 1:, :] - image[..., :-1, :]).abs().sum() + (image[..., :, 1:] - image[..., :, :-1]).abs().sum()


@pytest.mark.parametrize("settings", [
    {}, {"flips": True}, {"flips": True, "rotation_deg": 15, "scale": 0.1, "gamma": 0.3},
    {"rotation_deg": 0, "scale": 0.2}, {"flips": True, "rotation_deg": 15, "scale": 0.1, "gamma": 0.3, "crop": 32},
])
def test_new_keys_off_give_the_old_augmentation_bit_for_bit(settings):
    image, label = disks(b=5)
    image = (image + 0.05 * torch.rand(image.shape, generator=torch.Generator().manual_seed(9))).clamp(0, 1)
    for seed in range(3):
        old_gen, new_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        old = old_augment_batch(image, label, **settings, generator=old_gen)
        new = augment_batch(image, label, **settings, **OFF, generator=new_gen)
        assert torch.equal(old[0], new[0]) and torch.equal(old[1], new[1])
        assert torch.equal(torch.rand(3, generator=old_gen), torch.rand(3, generator=new_gen))  # same stream after


def test_the_new_draws_come_after_the_old_ones():
    """With contrast, brightness, noise and blur on, the flips and the warp are those of the same seed without them:
    the labels are identical."""
    image, label = disks(b=6)
    settings = {"flips": True, "rotation_deg": 20, "scale": 0.2, "gamma": 0.3}
    _, plain = augment_batch(image, label, **settings, generator=torch.Generator().manual_seed(4))
    out, lab = augment_batch(image, label, **settings, contrast=0.3, brightness=0.1, noise=0.05, blur=1.0,
                             generator=torch.Generator().manual_seed(4))
    assert torch.equal(lab, plain)


def test_a_scale_pair_of_one_changes_nothing():
    image, label = disks()
    out, lab = augment_batch(image, label, scale=[1, 1], generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, image) and torch.equal(lab, label)


@pytest.mark.parametrize("scale", [0.1, [0.9, 1.1], (0.7, 1.4)])
def test_number_and_pair_scales_keep_the_label_classes(scale):
    image, label = disks(b=8)
    label = label * 3  # classes 0 and 3: nearest sampling must not invent 1 or 2
    out, lab = augment_batch(image, label, scale=scale, generator=torch.Generator().manual_seed(1))
    assert set(lab.unique().tolist()) == {0, 3} and lab.dtype == label.dtype
    assert out.shape == image.shape and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("zoom", [1.4, 0.7])
def test_a_fixed_pair_zooms_by_its_factor_and_a_zoom_above_one_enlarges(zoom):
    """scale [z, z] is a zoom of exactly z; the disk's area scales by z squared (grows for z > 1)."""
    image, label = disks(b=2, size=96, radius=14)
    _, lab = augment_batch(image, label, scale=[zoom, zoom], generator=torch.Generator().manual_seed(0))
    ratio = lab.sum((1, 2)).float() / label.sum((1, 2)).float()
    assert torch.allclose(ratio, torch.full((2,), zoom ** 2), rtol=0.05), ratio


def test_a_fixed_pair_is_the_number_scales_zoom_of_the_same_value():
    """The same semantics for both forms: a number scale whose draw was z warps as the pair [z, z] does."""
    image, label = disks(b=1, size=64, radius=12)
    s, seed = 0.4, 5
    g = torch.Generator().manual_seed(seed)
    torch.rand(1, generator=g)  # the rotation's draw (rotation 0)
    z = float(1 - s + 2 * s * torch.rand(1, generator=g))
    assert abs(z - 1) > 0.1  # a real zoom
    out_n, lab_n = augment_batch(image, label, scale=s, generator=torch.Generator().manual_seed(seed))
    out_p, lab_p = augment_batch(image, label, scale=[z, z], generator=torch.Generator().manual_seed(seed))
    assert torch.equal(lab_n, lab_p) and torch.allclose(out_n, out_p, atol=1e-5)
    assert (lab_n.sum() > label.sum()) == (z > 1)


def test_a_pair_draws_zooms_log_uniformly_within_it():
    """[0.5, 2]: every zoom within the range, half of them below one (log-uniform: median 1; uniform would be 1.25)."""
    image, label = disks(b=200, size=64, radius=8)
    _, lab = augment_batch(image, label, scale=[0.5, 2.0], generator=torch.Generator().manual_seed(0))
    zoom = (lab.sum((1, 2)).float() / label.sum((1, 2)).float()).sqrt()
    assert zoom.min() > 0.45 and zoom.max() < 2.1
    assert abs(float(zoom.median()) - 1) < 0.12, float(zoom.median())
    assert 0.4 < float((zoom < 1).float().mean()) < 0.6


@pytest.mark.parametrize("key,value", [("contrast", 0.5), ("brightness", 0.2), ("noise", 0.1), ("blur", 2.0)])
def test_intensity_transforms_change_the_image_only_and_keep_it_in_unit_range(key, value):
    image, label = disks(b=6)
    out, lab = augment_batch(image, label, flips=True, **{key: value}, generator=torch.Generator().manual_seed(2))
    ref, ref_lab = augment_batch(image, label, flips=True, generator=torch.Generator().manual_seed(2))
    assert torch.equal(lab, ref_lab)  # labels untouched
    assert not torch.equal(out, ref)
    assert out.shape == image.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(image, disks(b=6)[0])  # the input is left as it was
    # clamping: extreme settings stay in [0, 1]
    out, _ = augment_batch(image, label, **{key: {"contrast": 1, "brightness": 1, "noise": 1, "blur": 10}[key]},
                           generator=torch.Generator().manual_seed(2))
    assert out.min() >= 0 and out.max() <= 1


def test_contrast_scales_about_the_mean_and_brightness_shifts():
    image, label = disks(b=8)  # values 0.2-0.7: no clamping at these strengths
    out, _ = augment_batch(image, label, contrast=0.3, generator=torch.Generator().manual_seed(0))
    mean, out_mean = image.mean((1, 2, 3)), out.mean((1, 2, 3))
    assert torch.allclose(out_mean, mean, atol=1e-5)
    factor = (out - out_mean[:, None, None, None]).std((1, 2, 3)) / (image - mean[:, None, None, None]).std((1, 2, 3))
    assert factor.min() >= 0.7 - 1e-4 and factor.max() <= 1.3 + 1e-4 and factor.std() > 0.01  # per image
    out, _ = augment_batch(image, label, brightness=0.2, generator=torch.Generator().manual_seed(0))
    shift = out - image
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # one offset per image
    assert shift.abs().max() <= 0.2 + 1e-6 and shift[:, 0, 0, 0].std() > 0.01


def test_noise_has_a_per_image_sigma_up_to_its_value():
    image = torch.full((16, 1, 64, 64), 0.5)
    label = torch.zeros(16, 64, 64, dtype=torch.long)
    out, lab = augment_batch(image, label, noise=0.1, generator=torch.Generator().manual_seed(0))
    sigma = (out - image).std((1, 2, 3))
    assert sigma.max() < 0.1 * 1.05 and sigma.min() >= 0 and sigma.std() > 0.01
    assert torch.equal(lab, label)
    again, _ = augment_batch(image, label, noise=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # the generator draws the noise too


def test_blur_smooths_and_its_kernel_is_a_gaussian_of_the_given_sigma():
    image, label = disks(b=6)
    image = (image + 0.1 * torch.rand(image.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    out, lab = augment_batch(image, label, blur=2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lab, label)
    for i in range(6):
        assert total_variation(out[i]) < total_variation(image[i])
    # sigma zero: the identity; a constant image stays constant (normalised kernel, replicated edges)
    assert torch.equal(_gaussian_blur(image, torch.zeros(6), 2.0), image)
    flat = torch.full((2, 1, 16, 16), 0.3)
    assert torch.allclose(_gaussian_blur(flat, torch.tensor([1.0, 3.0]), 3.0), flat, atol=1e-6)
    # an impulse spreads with the variance sigma^2 along each axis (truncated at 3 sigma: a little less)
    impulse = torch.zeros(2, 1, 41, 41)
    impulse[:, :, 20, 20] = 1
    response = _gaussian_blur(impulse, torch.tensor([1.0, 2.0]), 2.0)
    x = torch.arange(41.0) - 20
    assert torch.allclose(response.sum((1, 2, 3)), torch.ones(2), atol=1e-5)
    variance = (response[:, 0].sum(1) * x ** 2).sum(1)
    assert torch.allclose(variance, torch.tensor([1.0, 4.0]), rtol=0.03), variance


@pytest.mark.parametrize("kwargs,message", [
    ({"scale": [1.2, 0.8]}, r"scale must be .* pair \[low, high\] with 0 < low <= high.*got \[1.2, 0.8\]"),
    ({"scale": [0, 1.2]}, r"scale must be"),
    ({"scale": [0.8]}, r"scale must be"),
    ({"scale": "wide"}, r"scale must be"),
    ({"scale": -0.1}, r"scale must be"),
    ({"contrast": -0.1}, r"contrast must be a number in \[0, 1\], got -0.1"),
    ({"brightness": 2}, r"brightness must be"),
    ({"noise": True}, r"noise must be"),
    ({"blur": -1}, r"blur must be"),
])
def test_bad_values_are_named(kwargs, message):
    image, label = disks(b=1)
    with pytest.raises(ValueError, match=message):
        augment_batch(image, label, **kwargs)


def test_the_report_describes_the_new_keys():
    base = {"flips": True, "rotation_deg": 0, "scale": 0, "gamma": 0, "crop": 0, "whole_epochs": 0, **OFF}
    assert _augment(base) == "flips only"
    text = _augment({**base, "scale": [0.7, 1.4], "contrast": 0.25, "brightness": 0.1, "noise": 0.05, "blur": 1})
    assert text == ("flips, scaling 0.7–1.4×, contrast ±25 %, brightness ±0.1, Gaussian noise σ up to 0.05, "
                    "Gaussian blur σ up to 1 px")
    assert _augment({**base, "scale": 0.1}) == "flips, scaling ±10 %"
