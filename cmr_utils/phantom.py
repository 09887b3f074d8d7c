"""The built-in synthetic cardiac MRI dataset: the compendium's default data when no data path is given.

Two datasets, each written in the layout of the public release it stands in for, with real NIfTI headers:

- ``write_acdc_phantom``      short-axis cine MRI in the official ACDC layout (``patientNNN/`` with the 4D
  cine, the ED and ES frames, their ground truth and ``Info.cfg``); labels 0 background, 1 RV, 2 MYO, 3 LV.
- ``write_decathlon_phantom`` 3D left-atrium MRI in the Medical Segmentation Decathlon Task02_Heart layout
  (``imagesTr/``, ``labelsTr/``, ``dataset.json``); labels 0 background, 1 left atrium.
- ``ensure_phantom``          both under one root, generated only if missing, atomically.

On disk, images are int16 (intensities roughly 0..1500, like a scanner's), labels uint8. Arrays are made in the
project's (Z, Y, X) convention and written transposed to NIfTI's (X, Y, Z[, T]). The anatomy is drawn in pixel
units scaled to the image size, and the pixel size follows from a field of view of 180 to 230 mm: a heart's size in
mm varies with its group and about ±12 % between patients, not with the scanner's matrix.

Everything is deterministic: patient ``i`` of seed ``s`` depends on ``(s, i)`` only, so the same arguments give
byte-identical files and a larger ``n_patients`` extends a smaller set rather than changing it.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["ACDC_GROUPS", "FORMAT_VERSION", "PHANTOM_MARKER", "write_acdc_phantom", "write_decathlon_phantom",
           "ensure_phantom"]

ACDC_GROUPS = ("NOR", "DCM", "HCM", "MINF", "RV")  # patients cycle through them in this order
PHANTOM_MARKER = "phantom.json"  # provenance file at the top of each generated dataset
FORMAT_VERSION = 2  # bump when the generator's output changes: it names the phantom's folder (paths.phantom_dir)
_ACDC_STREAM, _DECATHLON_STREAM = 0xACDC, 0xDEC  # keep the two datasets' random streams apart

# Tissue classes of the image (labels are separate: only RV, MYO and LV are labelled).
_AIR, _SOFT, _FAT, _LUNG, _LIVER, _BONE, _WALL, _MYO, _BLOOD = range(9)
_N_TISSUES = 9

# Per group: LV cavity radius at the base in ED, myocardial thickness (both in px for a 120 px field of view),
# LV cavity ES/ED radius ratio (ejection fraction ~ 1 - ratio**2), RV thickness relative to the LV's outer
# radius, RV ES/ED thickness ratio (the crescent also shortens: RV ejection fraction ~ 1 - ratio).
_GROUP_HEART = {
    "NOR": (13.0, 5.0, 0.63, 0.60, 0.45),
    "DCM": (17.0, 4.0, 0.90, 0.55, 0.70),
    "HCM": (11.0, 8.0, 0.52, 0.55, 0.45),
    "MINF": (15.0, 4.5, 0.80, 0.60, 0.55),
    "RV": (12.0, 5.0, 0.65, 1.00, 0.75),
}
_MIN_MYO_PX = 3.0  # the ring stays >= 3 px thick so the LV cavity never touches the RV or the background


# ----------------------------------------------------------------------------------------------- validation
def _check_int(value, name: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be >= {minimum}{upper}, got {value}")
    return int(value)


def _check_folder(folder, name: str = "folder") -> Path:
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(folder).__name__}")
    return Path(folder)


def _prepare_empty_folder(folder: Path) -> None:
    """Create ``folder``; refuse to mix a new dataset into existing files."""
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(f"folder {str(folder)!r} exists and is not a directory")
        if any(folder.iterdir()):
            raise ValueError(f"folder {str(folder)!r} is not empty; the phantom is only written into a new "
                             "or empty folder")
    folder.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------------------ shared drawing
def _ellipse(along, across, semi_along, semi_across):
    """Inside test of an ellipse in rotated coordinates; semi-axes broadcast against the coordinates."""
    return (along / semi_along) ** 2 + (across / semi_across) ** 2 <= 1.0


def _finish_image(tissue_intensity, rng, noise_range=(0.015, 0.04), scale_range=(600.0, 1400.0)):
    """Partial volume, smooth multiplicative bias field, Rician noise, scanner scale; returns int16.

    ``tissue_intensity`` is float32 (..., Z, Y, X); the bias field is fixed over the leading (time) axes.
    """
    n_z, n_y, n_x = tissue_intensity.shape[-3:]
    sigma = (0.0,) * (tissue_intensity.ndim - 2) + (0.7, 0.7)  # in-plane partial volume only
    image = ndimage.gaussian_filter(tissue_intensity, sigma=sigma)

    z = np.linspace(-1.0, 1.0, n_z, dtype=np.float32)[:, None, None]
    y = np.linspace(-1.0, 1.0, n_y, dtype=np.float32)[None, :, None]
    x = np.linspace(-1.0, 1.0, n_x, dtype=np.float32)[None, None, :]
    c = rng.uniform(-0.1, 0.1, size=6).astype(np.float32)
    log_bias = c[0] * x + c[1] * y + c[2] * x * y + c[3] * x * x + c[4] * y * y + c[5] * z
    image = image * np.exp(log_bias)

    # Rician: the magnitude of a complex signal with Gaussian noise on both channels.
    noise_sigma = np.float32(rng.uniform(*noise_range))
    real = image + noise_sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = noise_sigma * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real * real + imaginary * imaginary)

    scale = rng.uniform(*scale_range)
    return np.clip(np.rint(image * scale), 0, np.iinfo(np.int16).max).astype(np.int16)


def _smooth_texture(rng, shape, amplitude=0.06, sigma=3.0):
    """Static multiplicative tissue texture, 1 +- ``amplitude``."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=(0.0, sigma, sigma))
    field /= np.abs(field).max() + 1e-6
    return 1.0 + amplitude * field


def _save_nifti(array: np.ndarray, path: Path, spacing_xyz, frame_ms: float | None = None) -> None:
    """Write a (Z, Y, X) or (T, Z, Y, X) array as NIfTI data (X, Y, Z[, T]) with a diagonal affine."""
    data = array.T  # a view; reverses the axes: (Z, Y, X) -> (X, Y, Z), (T, Z, Y, X) -> (X, Y, Z, T)
    affine = np.diag([*map(float, spacing_xyz), 1.0])
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)  # scanner coordinates, as in the public releases
    image.set_sform(affine, code=1)
    header = image.header
    header.set_data_dtype(data.dtype)
    if data.ndim == 4:
        header.set_zooms((*map(float, spacing_xyz), float(frame_ms)))
        header.set_xyzt_units("mm", "msec")
    else:
        header.set_zooms(tuple(map(float, spacing_xyz)))
        header.set_xyzt_units("mm")
    nib.save(image, path)


def _write_marker(folder: Path, description: dict) -> None:
    (folder / PHANTOM_MARKER).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------- ACDC phantom
def _cardiac_phase(n_frames: int, es_index: int) -> np.ndarray:
    """Contraction per frame: 0 at ED (frame 0), 1 at ES, smoothly back towards 0 at the end of the cycle."""
    t = np.arange(n_frames, dtype=np.float64)
    systole = 0.5 * (1.0 - np.cos(np.pi * t / es_index))
    diastole = 0.5 * (1.0 + np.cos(np.pi * (t - es_index) / (n_frames - es_index)))
    return np.where(t <= es_index, systole, diastole)


def _acdc_patient(rng: np.random.Generator, group: str, n_frames: int) -> dict:
    """One patient: cine (T, Z, Y, X) int16, labels (T, Z, Y, X) uint8, header and Info.cfg values."""
    n_z = int(rng.integers(6, 11))
    n_y, n_x = int(rng.integers(100, 141)), int(rng.integers(100, 141))
    # the field of view in mm, the pixel size from it: the anatomy (drawn in pixels, scaled to the matrix) then has
    # about the same size in mm in every patient but for its group and U(0.88, 1.12), as hearts do
    spacing_xy = round(float(rng.uniform(180.0, 230.0)) / min(n_y, n_x), 4)
    slice_mm = round(float(rng.uniform(5.0, 10.0)), 1)
    es_index = int(np.clip(round(rng.uniform(0.35, 0.45) * n_frames), 1, n_frames - 2))
    frame_ms = round(60000.0 / rng.uniform(55.0, 90.0) / n_frames, 2)
    height_cm, weight_kg = float(rng.integers(150, 196)), float(rng.integers(50, 111))

    # --- heart geometry per (frame, slice); shapes (T, Z) then (T, Z, 1, 1) to broadcast over pixels
    scale = min(n_y, n_x) / 120.0 * rng.uniform(0.88, 1.12)
    lv_radius, myo_px, lv_ratio, rv_rel, rv_ratio = (
        p * rng.uniform(0.92, 1.08) for p in _GROUP_HEART[group])
    lv_ratio, rv_ratio = min(lv_ratio, 0.93), min(rv_ratio, 0.95)
    ellipticity = rng.uniform(1.0, 1.12)
    rv_extent = rng.uniform(0.70, 0.85)  # fraction of base->apex where the RV is still cut; apex has none
    theta = np.pi + 0.3 + rng.uniform(-0.5, 0.5)  # direction LV -> RV: image left, slightly up
    centre = np.array([n_y * (0.45 + rng.uniform(-0.05, 0.05)), n_x * (0.53 + rng.uniform(-0.05, 0.05))])
    drift = rng.uniform(-3.0, 3.0, size=2) * scale  # the long axis is not exactly through-plane

    u = np.linspace(0.0, 1.0, n_z)  # 0 base .. 1 apex
    phase = _cardiac_phase(n_frames, es_index)[:, None]  # (T, 1)
    r_ed = lv_radius * scale * (0.45 + 0.55 * np.sqrt(1.0 - 0.9 * u**2))  # (Z,)
    a_ed, b_ed = r_ed * np.sqrt(ellipticity), r_ed / np.sqrt(ellipticity)
    d_ed = np.maximum(_MIN_MYO_PX, myo_px * scale * (1.0 - 0.2 * u))
    shrink = 1.0 - (1.0 - lv_ratio) * phase  # (T, 1)
    a, b = a_ed * shrink, b_ed * shrink  # (T, Z)
    # Myocardial area is conserved through the cycle, so the wall thickens as the cavity shrinks:
    # solve (a + d)(b + d) = (a_ed + d_ed)(b_ed + d_ed) for d.
    outer_area = (a_ed + d_ed) * (b_ed + d_ed)
    d = 0.5 * (-(a + b) + np.sqrt((a + b) ** 2 + 4.0 * (outer_area - a * b)))
    a_out, b_out = a + d, b + d
    r_out = 0.5 * (a_out + b_out)

    in_rv = u <= rv_extent
    rv_profile = np.where(in_rv, np.maximum(0.35, np.sqrt(np.clip(1.0 - (u / rv_extent) ** 2, 0.0, 1.0))), 0.0)
    rv_thickness = rv_rel * r_out[0] * rv_profile * (1.0 - (1.0 - rv_ratio) * phase)  # (T, Z)
    # RV ellipse: reaches r_out + thickness in front of the LV and 0.3 r_out behind its centre, so that
    # outside the myocardium it is a crescent wrapped around the septum.
    front, back = r_out + rv_thickness, 0.3 * r_out
    rv_semi_along, rv_offset = 0.5 * (front + back), 0.5 * (front - back)
    rv_semi_across = r_out * (1.45 - 0.5 * (1.0 - rv_ratio) * phase)  # the crescent also shortens in systole

    # --- pixel coordinates rotated into the heart frame (along = towards the RV), per slice
    yy = np.arange(n_y, dtype=np.float32)[None, :, None]
    xx = np.arange(n_x, dtype=np.float32)[None, None, :]
    cy = (centre[0] + drift[0] * u).astype(np.float32)[:, None, None]
    cx = (centre[1] + drift[1] * u).astype(np.float32)[:, None, None]
    dy, dx = yy - cy, xx - cx  # (Z, Y, X)
    cos_t, sin_t = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    along, across = dx * cos_t + dy * sin_t, -dx * sin_t + dy * cos_t

    def per_pixel(values):  # (T, Z) -> (T, Z, 1, 1) float32
        return np.asarray(values, dtype=np.float32)[:, :, None, None]

    lv = _ellipse(along, across, per_pixel(a), per_pixel(b))
    epicardium = _ellipse(along, across, per_pixel(a_out), per_pixel(b_out))
    rv_ellipse = _ellipse(along - per_pixel(rv_offset), across, per_pixel(rv_semi_along), per_pixel(rv_semi_across))
    rv_present = per_pixel(np.broadcast_to(in_rv, a.shape)) > 0
    rv = rv_ellipse & ~epicardium & rv_present
    # Unlabelled heart wall (RV free wall, pericardium): a thin dark rim around both ventricles.
    wall = _ellipse(along, across, per_pixel(a_out + 1.2), per_pixel(b_out + 1.2)) | (
        _ellipse(along - per_pixel(rv_offset), across, per_pixel(rv_semi_along + 1.5),
                 per_pixel(rv_semi_across + 1.5)) & rv_present)
    # Papillary muscles: myocardium-dark dots inside the cavity, opposite the RV, labelled LV as in ACDC.
    papillary = np.zeros_like(lv)
    in_mid = per_pixel(np.broadcast_to((u >= 0.2) & (u <= 0.75), a.shape)) > 0
    for angle in (np.pi - 0.7, np.pi + 0.7):
        offset_along, offset_across = 0.55 * np.cos(angle), 0.55 * np.sin(angle)
        papillary |= _ellipse(along - per_pixel(offset_along * a), across - per_pixel(offset_across * b),
                              per_pixel(0.17 * a), per_pixel(0.17 * a)) & in_mid

    labels = np.zeros(lv.shape, dtype=np.uint8)
    labels[rv] = 1
    labels[epicardium & ~lv] = 2
    labels[lv] = 3

    # --- surroundings (static through the cycle)
    tissue_static = _chest_tissue(rng, n_z, n_y, n_x, u)
    tissue = np.broadcast_to(tissue_static, labels.shape).copy()
    tissue[wall] = _WALL
    tissue[rv] = _BLOOD
    tissue[labels == 2] = _MYO
    tissue[lv] = _BLOOD
    tissue[papillary & lv] = _MYO

    intensity = _tissue_intensities(rng)
    lut = np.broadcast_to(intensity, (n_frames, _N_TISSUES)).copy()
    lut[:, _BLOOD] *= 1.0 + 0.03 * np.cos(2.0 * np.pi * np.arange(n_frames) / n_frames)  # inflow varies
    image = lut[np.arange(n_frames)[:, None, None, None], tissue].astype(np.float32)
    image *= _smooth_texture(rng, (n_z, n_y, n_x))
    cine = _finish_image(image, rng)
    return {
        "cine": cine, "labels": labels, "spacing": (spacing_xy, spacing_xy, slice_mm), "frame_ms": frame_ms,
        "es_index": es_index, "height_cm": height_cm, "weight_kg": weight_kg,
    }


def _tissue_intensities(rng: np.random.Generator) -> np.ndarray:
    """bSSFP-like mean intensity per tissue class, varied per patient (contrast and brightness)."""
    intensity = np.zeros(_N_TISSUES, dtype=np.float32)
    intensity[_SOFT] = rng.uniform(0.22, 0.35)
    intensity[_FAT] = rng.uniform(0.65, 0.85)
    intensity[_LUNG] = rng.uniform(0.02, 0.07)
    intensity[_LIVER] = rng.uniform(0.30, 0.45)
    intensity[_BONE] = rng.uniform(0.35, 0.55)
    intensity[_MYO] = rng.uniform(0.16, 0.30)
    intensity[_WALL] = intensity[_MYO] * rng.uniform(0.9, 1.1)
    intensity[_BLOOD] = rng.uniform(0.80, 1.00)
    return intensity


def _chest_tissue(rng: np.random.Generator, n_z: int, n_y: int, n_x: int, u: np.ndarray) -> np.ndarray:
    """Tissue classes (Z, Y, X) of a short-axis chest without the heart: body, fat, lungs, liver, spine, aorta."""
    yy = np.arange(n_y, dtype=np.float32)[:, None]
    xx = np.arange(n_x, dtype=np.float32)[None, :]
    by, bx = n_y * rng.uniform(0.50, 0.56), n_x * rng.uniform(0.47, 0.53)
    ry, rx = n_y * rng.uniform(0.40, 0.46), n_x * rng.uniform(0.45, 0.49)
    fat = rng.uniform(2.5, 5.0)
    muscle = rng.uniform(3.0, 6.0)
    body = _ellipse(yy - by, xx - bx, ry, rx)
    inside_fat = _ellipse(yy - by, xx - bx, ry - fat, rx - fat)
    inside_wall = _ellipse(yy - by, xx - bx, ry - fat - muscle, rx - fat - muscle)

    slice_map = np.full((n_y, n_x), _AIR, dtype=np.uint8)
    slice_map[body] = _FAT
    slice_map[inside_fat] = _SOFT
    for side in (-1.0, 1.0):
        lung = _ellipse(yy - (by - 0.08 * n_y), xx - (bx + side * 0.25 * n_x), 0.28 * n_y, 0.15 * n_x)
        slice_map[lung & inside_wall] = _LUNG
    spine_r = 0.06 * min(n_y, n_x)
    spine_y = by + ry - fat - muscle - spine_r
    slice_map[_ellipse(yy - spine_y, xx - bx, spine_r, spine_r)] = _BONE
    aorta_r = 0.035 * min(n_y, n_x)
    slice_map[_ellipse(yy - (spine_y - spine_r - aorta_r), xx - (bx + 0.06 * n_x), aorta_r, aorta_r)] = _BLOOD

    tissue = np.broadcast_to(slice_map, (n_z, n_y, n_x)).copy()
    # The liver dome rises into the apical slices.
    liver_size = (0.6 + 0.6 * u).astype(np.float32)[:, None, None]
    liver = _ellipse(yy - (by + 0.22 * n_y), xx - (bx - 0.18 * n_x), 0.18 * n_y * liver_size, 0.25 * n_x * liver_size)
    tissue[liver & inside_wall & (tissue != _BONE)] = _LIVER
    return tissue


def write_acdc_phantom(folder, n_patients: int = 20, seed: int = 0, n_frames: int = 12) -> Path:
    """Write a synthetic cine dataset in the official ACDC NIfTI layout into ``folder``; return the folder.

    ``patientNNN/`` holds ``patientNNN_4d.nii.gz`` (data (X, Y, Z, T)), ``patientNNN_frameFF.nii.gz`` and
    ``patientNNN_frameFF_gt.nii.gz`` for ED (frame 01) and ES, and ``Info.cfg``. ``folder`` must be new or empty.
    """
    folder = _check_folder(folder)
    n_patients = _check_int(n_patients, "n_patients", 1, 999)
    seed = _check_int(seed, "seed", 0)
    n_frames = _check_int(n_frames, "n_frames", 3, 99)
    _prepare_empty_folder(folder)

    for number in range(1, n_patients + 1):
        group = ACDC_GROUPS[(number - 1) % len(ACDC_GROUPS)]
        patient = _acdc_patient(np.random.default_rng([seed, _ACDC_STREAM, number]), group, n_frames)
        name = f"patient{number:03d}"
        patient_dir = folder / name
        patient_dir.mkdir()
        spacing = patient["spacing"]
        _save_nifti(patient["cine"], patient_dir / f"{name}_4d.nii.gz", spacing, patient["frame_ms"])
        for index in (0, patient["es_index"]):
            stem = f"{name}_frame{index + 1:02d}"  # ACDC frames are 1-based
            _save_nifti(patient["cine"][index], patient_dir / f"{stem}.nii.gz", spacing)
            _save_nifti(patient["labels"][index], patient_dir / f"{stem}_gt.nii.gz", spacing)
        (patient_dir / "Info.cfg").write_text(
            f"ED: 1\nES: {patient['es_index'] + 1}\nGroup: {group}\nHeight: {patient['height_cm']:.1f}\n"
            f"NbFrame: {n_frames}\nWeight: {patient['weight_kg']:.1f}\n")
    _write_marker(folder, {"generator": "cmr_utils.phantom.write_acdc_phantom", "format_version": FORMAT_VERSION,
                           "n_patients": n_patients, "seed": seed, "n_frames": n_frames})
    return folder


# -------------------------------------------------------------------------------------- Decathlon phantom
def _decathlon_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One axial 3D volume (Z, Y, X) int16 with its left-atrium label (Z, Y, X) uint8."""
    n_z, n_y, n_x = int(rng.integers(36, 45)), int(rng.integers(72, 89)), int(rng.integers(72, 89))
    s = min(n_y, n_x) / 80.0 * rng.uniform(0.9, 1.1)
    zz = np.arange(n_z, dtype=np.float32)[:, None, None]
    yy = np.arange(n_y, dtype=np.float32)[None, :, None]
    xx = np.arange(n_x, dtype=np.float32)[None, None, :]
    zc = n_z * rng.uniform(0.45, 0.55)

    def ellipsoid(centre, radii):
        (cz, cy, cx), (rz, ry, rx) = centre, radii
        return ((zz - cz) / rz) ** 2 + ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0

    by, bx = n_y * rng.uniform(0.5, 0.54), n_x * rng.uniform(0.48, 0.52)
    ry, rx = 0.42 * n_y, 0.47 * n_x
    body = np.broadcast_to(_ellipse(yy - by, xx - bx, ry, rx), (n_z, n_y, n_x))
    inside_fat = np.broadcast_to(_ellipse(yy - by, xx - bx, ry - 2.5, rx - 2.5), body.shape)
    inside_wall = np.broadcast_to(_ellipse(yy - by, xx - bx, ry - 6.0, rx - 6.0), body.shape)
    tissue = np.full(body.shape, _AIR, dtype=np.uint8)
    tissue[body] = _FAT
    tissue[inside_fat] = _SOFT
    for side in (-1.0, 1.0):
        lung = ellipsoid((zc, by - 0.05 * n_y, bx + side * 0.26 * n_x), (0.7 * n_z, 0.30 * n_y, 0.16 * n_x))
        tissue[lung & inside_wall] = _LUNG
    spine_r, aorta_r = 0.07 * min(n_y, n_x), 0.04 * min(n_y, n_x)
    spine_y = by + ry - 6.0 - spine_r
    tissue[np.broadcast_to(_ellipse(yy - spine_y, xx - bx, spine_r, spine_r), body.shape)] = _BONE
    aorta = _ellipse(yy - (spine_y - 0.8 * spine_r), xx - (bx + spine_r + aorta_r + 1.0), aorta_r, aorta_r)
    tissue[np.broadcast_to(aorta, body.shape)] = _BLOOD

    # Ventricles: the LV (anterior, patient's left = image right) with its myocardium, the RV in front.
    lv_centre = (zc - 0.12 * n_z, by - 0.12 * n_y + rng.uniform(-2, 2), bx + 0.12 * n_x + rng.uniform(-2, 2))
    lv_radii = np.array([8.0, 9.0, 10.0]) * s * rng.uniform(0.9, 1.1)
    tissue[ellipsoid(lv_centre, lv_radii + 3.0 * s)] = _MYO
    tissue[ellipsoid(lv_centre, lv_radii)] = _BLOOD
    rv_centre = (zc - 0.1 * n_z, by - 0.22 * n_y, bx - 0.06 * n_x)
    tissue[ellipsoid(rv_centre, np.array([7.0, 5.0, 11.0]) * s + 1.0)] = _WALL
    tissue[ellipsoid(rv_centre, np.array([7.0, 5.0, 11.0]) * s)] = _BLOOD

    # Left atrium: a lumpy ellipsoid behind the ventricles with four pulmonary-vein stubs, drawn last.
    la_centre = np.array([zc + 0.05 * n_z, by + 0.08 * n_y, bx + rng.uniform(-2, 2)])
    la_radii = np.array([9.0, 7.0, 10.0]) * s * rng.uniform(0.9, 1.1, size=3)
    offset = [(zz - la_centre[0]) / la_radii[0], (yy - la_centre[1]) / la_radii[1], (xx - la_centre[2]) / la_radii[2]]
    rho = np.sqrt(offset[0] ** 2 + offset[1] ** 2 + offset[2] ** 2)
    direction = [o / np.maximum(rho, 1e-6) for o in offset]
    lumps = rng.uniform(-0.12, 0.12, size=4)
    surface = (1.0 + lumps[0] * direction[0] * direction[2] + lumps[1] * direction[1] * direction[2]
               + lumps[2] * (direction[2] ** 2 - direction[1] ** 2) + lumps[3] * direction[0])
    atrium = rho <= surface
    wall = rho <= surface * (1.0 + 1.2 / la_radii.mean())
    for dz, dx in ((-0.5, -1.0), (0.5, -1.0), (-0.5, 1.0), (0.5, 1.0)):
        vein_centre = la_centre + np.array([dz * 0.6 * la_radii[0], 0.7 * la_radii[1], dx * 0.75 * la_radii[2]])
        atrium |= ellipsoid(vein_centre, np.array([1.6, 4.0, 1.8]) * s)
    tissue[wall] = _WALL
    tissue[atrium] = _BLOOD
    label = atrium.astype(np.uint8)

    image = _tissue_intensities(rng)[tissue] * _smooth_texture(rng, tissue.shape)
    return _finish_image(image.astype(np.float32), rng, scale_range=(300.0, 900.0)), label


def write_decathlon_phantom(folder, n_cases: int = 4, seed: int = 0) -> Path:
    """Write a synthetic left-atrium dataset in the Decathlon Task02_Heart layout into ``folder``; return it.

    ``imagesTr/la_NNN.nii.gz`` and ``labelsTr/la_NNN.nii.gz`` (data (X, Y, Z), 1.25 x 1.25 x 1.37 mm) and
    ``dataset.json``. ``folder`` must be new or empty.
    """
    folder = _check_folder(folder)
    n_cases = _check_int(n_cases, "n_cases", 1, 999)
    seed = _check_int(seed, "seed", 0)
    _prepare_empty_folder(folder)
    (folder / "imagesTr").mkdir()
    (folder / "labelsTr").mkdir()

    spacing = (1.25, 1.25, 1.37)  # the Task02_Heart voxel size
    training = []
    for number in range(1, n_cases + 1):
        image, label = _decathlon_case(np.random.default_rng([seed, _DECATHLON_STREAM, number]))
        file_name = f"la_{number:03d}.nii.gz"
        _save_nifti(image, folder / "imagesTr" / file_name, spacing)
        _save_nifti(label, folder / "labelsTr" / file_name, spacing)
        training.append({"image": f"./imagesTr/{file_name}", "label": f"./labelsTr/{file_name}"})
    dataset = {
        "name": "Left Atrium",
        "description": "Synthetic left atrium MRI phantom (cmr_utils.phantom), Decathlon Task02_Heart layout",
        "reference": "cmr_utils.phantom: synthetic, contains no patient data",
        "licence": "CC0 1.0",
        "release": f"phantom {FORMAT_VERSION}",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "left atrium"},
        "numTraining": n_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=4) + "\n")
    _write_marker(folder, {"generator": "cmr_utils.phantom.write_decathlon_phantom",
                           "format_version": FORMAT_VERSION, "n_cases": n_cases, "seed": seed})
    return folder


# ------------------------------------------------------------------------------------ atomic generation
def _process_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) means something else on Windows: assume alive, keep the folder
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove_dead_partials(target: Path) -> None:
    """Remove ``.<name>.partial-<pid>-*`` folders left by generator processes that no longer run."""
    for partial in target.parent.glob(f".{target.name}.partial-*"):
        pid_text = partial.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if not pid_text.isdigit() or not _process_alive(int(pid_text)):
            shutil.rmtree(partial, ignore_errors=True)


def _check_marker(folder: Path, expected: dict) -> None:
    marker = folder / PHANTOM_MARKER
    found = json.loads(marker.read_text()) if marker.is_file() else None
    if found != expected:
        raise ValueError(f"{str(folder)!r} exists but is not the phantom asked for (expected {expected}, found "
                         f"{found}); delete it to regenerate, or pass another root")


def _ensure_dataset(target: Path, write, expected: dict) -> Path:
    """Generate ``target`` with ``write(folder)`` unless present: into a sibling temp folder, then renamed."""
    if target.exists():
        _check_marker(target, expected)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(target)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write(partial)
        try:
            os.rename(partial, target)  # atomic on one file system: the dataset appears complete or not at all
        except OSError:
            if not target.is_dir():  # not a lost race with another generator: a real error
                raise
            shutil.rmtree(partial)  # another process finished first; use its copy
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _check_marker(target, expected)
    return target


def ensure_phantom(root, n_patients: int = 20, n_extra: int = 4, seed: int = 0,
                   n_frames: int = 12) -> tuple[Path, Path]:
    """Return (root/"acdc", root/"decathlon"), generating each phantom only if missing, atomically.

    An existing folder is reused only if its ``phantom.json`` matches the arguments; otherwise ValueError.
    """
    root = _check_folder(root, "root")
    n_patients = _check_int(n_patients, "n_patients", 1, 999)
    n_extra = _check_int(n_extra, "n_extra", 1, 999)
    seed = _check_int(seed, "seed", 0)
    n_frames = _check_int(n_frames, "n_frames", 3, 99)
    acdc = _ensure_dataset(
        root / "acdc", lambda folder: write_acdc_phantom(folder, n_patients=n_patients, seed=seed, n_frames=n_frames),
        {"generator": "cmr_utils.phantom.write_acdc_phantom", "format_version": FORMAT_VERSION,
         "n_patients": n_patients, "seed": seed, "n_frames": n_frames})
    decathlon = _ensure_dataset(
        root / "decathlon", lambda folder: write_decathlon_phantom(folder, n_cases=n_extra, seed=seed),
        {"generator": "cmr_utils.phantom.write_decathlon_phantom", "format_version": FORMAT_VERSION,
         "n_cases": n_extra, "seed": seed})
    return acdc, decathlon
