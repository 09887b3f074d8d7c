"""Is a predicted label map plausibly a heart? A check that flags a prediction which missed the heart.

A model shown a scan unlike its training data (framed differently, another contrast) can return a nearly
empty mask; written as it is, it would look like a result. ``check_prediction(labels, spacing)`` returns what
is implausible about a label map (Z, H, W) in ACDC's convention (0 background, 1 RV, 2 MYO, 3 LV), one short
phrase with the measured value per finding; an empty list means plausible. It is a plausibility check, not a
quality score: a prediction that passes may still be wrong, one that fails is certainly not to be trusted.

Findings: no heart at all (no foreground voxel); no LV cavity; no myocardium; and, where the voxel spacing
(z, y, x) mm is known, a heart (RV+MYO+LV), a left ventricle (LV+MYO) or an LV cavity implausibly small in mL (a
contrast-inverted scan gives a few voxels of LV inside a plausible heart); where it is not, a heart implausibly
small as a share of the volume's pixels.

``check_function(lv_edv, lv_ef, myo_mass)`` checks a patient's values from the ED and ES frames against
physiological ranges (``PHYSIOLOGICAL_RANGES``): those of the adult literature, widened where a real ACDC ground
truth lies outside (every one of ACDC's 80 HDF5 patients passes; ``tests/test_plausibility.py`` checks it when
``CMR_ACDC_DIR`` is set).

**Calibration.** The thresholds are about a quarter of the smallest value in the ground truth of ACDC's 160
training volumes (``ACDC_training_volumes/*.h5`` with ``spacing.csv``; every one has all three structures),
rounded down, so that no real ground truth is flagged (``tests/test_plausibility.py`` checks every volume when
``CMR_ACDC_DIR`` names that folder). **Partial stacks**: a scan may hold only a few slices of the heart, whose
volume is then a fraction of a whole heart's. The mL rules therefore expect the smaller of the whole-heart
minimum and a minimum per cm of the stack's extent (slices x slice spacing), whose real minimum counts every
slice of the stack, those above and below the heart included; a 1-slice stack of 8 mm thus expects at least
3.2 mL of heart rather than 30. The pixel share does not grow with the number of slices and needs no such rule.
"""
from __future__ import annotations

import math

import numpy as np

from .structures import STRUCTURE_LABELS

# heart (RV+MYO+LV) of a whole stack, mL: ACDC's smallest is 123.7 mL (patient094, ES); a quarter, rounded down
MIN_HEART_ML = 30.0
# left ventricle (LV cavity + myocardium) of a whole stack, mL: ACDC's smallest is 66.3 mL (patient094, ES)
MIN_LEFT_HEART_ML = 15.0
# heart per cm of the stack's extent (Z x slice spacing), mL/cm, for partial stacks: ACDC's smallest 17.0 (patient063)
MIN_HEART_ML_PER_CM = 4.0
# left ventricle (LV+MYO) per cm of the stack's extent, mL/cm: ACDC's smallest is 12.3 (patient063, ES)
MIN_LEFT_HEART_ML_PER_CM = 3.0
# LV cavity of a whole stack, mL: ACDC's smallest is 19.4 mL (patient030, ES)
MIN_LV_ML = 4.0
# LV cavity per cm of the stack's extent, mL/cm: ACDC's smallest is 1.9 (patient030, ES)
MIN_LV_ML_PER_CM = 0.4
# heart's share of the volume's pixels, used without spacing: ACDC's smallest is 1.35% (patient037, ES)
MIN_HEART_SHARE = 0.003

# A patient's values outside these (low, high) are flagged. Adult references (Kawel-Turkbey et al., JCMR 17:29, 2015)
# widened to the diseased hearts of ACDC (Bernard et al. 2018: dilated, hypertrophic, infarcted, abnormal RV):
PHYSIOLOGICAL_RANGES = {
    "LV EDV": (40.0, 400.0, "mL"),  # normal 100-250 mL; ACDC's ground truth 51-374 mL (small hearts to dilated)
    "LV EF": (10.0, 85.0, "%"),  # normal 55-75 %; ACDC's ground truth 10.7-81.9 % (failing to hyperdynamic)
    "myocardial mass": (30.0, 300.0, "g"),  # at ED, 1.05 g/mL; normal 70-200 g; ACDC's ground truth 36.8-272 g
}

RV, MYO, LV = (STRUCTURE_LABELS[name] for name in ("RV", "MYO", "LV"))


def _num(value: float) -> str:
    """A measured value, readable: 1 decimal from 1 up, 2 significant digits below (0.09, not 0.1 or 0.0)."""
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"


def _check_spacing(spacing) -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive finite numbers (z, y, x) mm or None, got {spacing}")
    return spacing


def _minimum_ml(whole: float, per_cm: float, stack_cm: float) -> tuple[float, str]:
    """The smallest plausible volume of a stack ``stack_cm`` long, and how it reads in a finding."""
    if per_cm * stack_cm < whole:
        return per_cm * stack_cm, f"under {_num(per_cm * stack_cm)} mL for a stack of {_num(stack_cm)} cm"
    return whole, f"under {_num(whole)} mL"


def check_prediction(labels, spacing=None) -> list[str]:
    """What is implausible about ``labels`` (Z, H, W) in ACDC's labels (1 RV, 2 MYO, 3 LV), with spacing
    (z, y, x) mm or None: a list of short findings with the measured values, empty when plausible."""
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty (Z, H, W) label map, got shape {labels.shape}")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be an integer label map, got dtype {labels.dtype}")
    spacing = _check_spacing(spacing)
    counts = np.bincount(labels.ravel().clip(0, 4), minlength=5)  # anything above 3 is not a heart label
    heart, left = int(counts[RV] + counts[MYO] + counts[LV]), int(counts[MYO] + counts[LV])
    if heart == 0:
        return ["no heart predicted (no RV, MYO or LV voxel)"]
    findings = []
    if counts[LV] == 0:
        findings.append("no LV cavity predicted")
    if counts[MYO] == 0:
        findings.append("no myocardium predicted")
    if spacing is not None:
        voxel_ml = math.prod(spacing) / 1000.0
        stack_cm = labels.shape[0] * spacing[0] / 10.0
        minimum, expected = _minimum_ml(MIN_HEART_ML, MIN_HEART_ML_PER_CM, stack_cm)
        if heart * voxel_ml < minimum:
            findings.append(f"heart (RV+MYO+LV) implausibly small: {_num(heart * voxel_ml)} mL, {expected}")
        minimum, expected = _minimum_ml(MIN_LEFT_HEART_ML, MIN_LEFT_HEART_ML_PER_CM, stack_cm)
        if left and left * voxel_ml < minimum:
            findings.append(f"left ventricle (LV+MYO) implausibly small: {_num(left * voxel_ml)} mL, {expected}")
        minimum, expected = _minimum_ml(MIN_LV_ML, MIN_LV_ML_PER_CM, stack_cm)
        heart_too_small = any("implausibly small" in finding for finding in findings)  # says it already
        if counts[LV] and counts[LV] * voxel_ml < minimum and not heart_too_small:
            findings.append(f"LV cavity implausibly small: {_num(counts[LV] * voxel_ml)} mL, {expected}")
    else:
        share = heart / labels.size
        if share < MIN_HEART_SHARE:
            findings.append(f"heart (RV+MYO+LV) implausibly small: {_num(100 * share)}% of the pixels, "
                            f"under {_num(100 * MIN_HEART_SHARE)}% (no spacing: mL unknown)")
    return findings


def check_function(lv_edv: float | None = None, lv_ef: float | None = None,
                   myo_mass: float | None = None) -> list[str]:
    """What lies outside ``PHYSIOLOGICAL_RANGES`` among a patient's LV end-diastolic volume (mL), LV ejection
    fraction (%) and myocardial mass at ED (g): short findings with the values; None or NaN is not checked (a
    source without spacing has no mL, a patient without ED and ES no EF)."""
    findings = []
    for name, value in (("LV EDV", lv_edv), ("LV EF", lv_ef), ("myocardial mass", myo_mass)):
        if value is None or not math.isfinite(float(value)):
            continue
        low, high, unit = PHYSIOLOGICAL_RANGES[name]
        if not low <= float(value) <= high:
            sep = "" if unit == "%" else " "
            findings.append(f"{name} {_num(float(value))}{sep}{unit} outside {low:g}-{high:g}{sep}{unit}")
    return findings
