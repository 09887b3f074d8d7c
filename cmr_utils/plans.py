"""A trained run's ``plans.json``: everything its model needs to predict, so that the run folder alone is the model.

Stage 03 (``cmr_utils.finetune.train_segmentation``) writes it beside ``model.pt`` when the run trains, as
nnU-Net's model folder carries its ``plans.json``; ``cmr_utils.predict_scans.open_run`` reads nothing else (no
workspace, no profile, no prepared data). It records:

- ``preprocessing``: what stage 01 did to a volume before the model saw it (``Preprocessing``): geometry (physical
  at ``target_spacing`` mm, or pixel), ``image_size``, ``resize``, ``field_of_view`` and the intensity
  percentiles that ``cmr_utils.prepare.normalise_volume`` scaled to [0, 1] (stage 01's manifest records them);
- ``predict``: test-time flips (the profile's ``evaluate.test_time_flips`` when the run trained);
- ``labels``: the label map of the model's output channels (ACDC's: 0 background, 1 RV, 2 MYO, 3 LV);
- ``model``: the factory's build arguments (``cmr_utils.models.build_segmentation_model``): architecture,
  encoder, input channels, classes, and the initialisation it was trained from (the weights are ``model.pt``);
- ``training``: the recipe (loss, optimiser, schedule, augmentation), epochs, batch size, learning rate, seed,
  precision (bf16-trained runs predict in bf16 where the device runs it natively);
- ``versions``: Python and the packages that made it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .files import write_json_atomic
from .provenance import package_versions

PLANS_FILE = "plans.json"
PLANS_VERSION = 1
ARCHITECTURE = {"architecture": "FPN", "encoder": "resnet18"}  # what cmr_utils.models builds, the only one
LABELS = {0: "background", 1: "RV", 2: "MYO", 3: "LV"}  # the model's output channels (ACDC's labels)


@dataclass(frozen=True)
class Preprocessing:
    """What stage 01 did to a volume before the model saw it."""

    image_size: int
    resize: str
    field_of_view: float
    normalise_low: float  # the intensity percentiles scaled to [0, 1] (``normalise_volume``)
    normalise_high: float
    geometry: str = "pixel"  # physical: resampled to target_spacing mm (cmr_utils.geometry)
    target_spacing: float | None = None

    @classmethod
    def from_manifest(cls, manifest: dict, where: str = "manifest.json") -> "Preprocessing":
        """The preprocessing a prepared folder's manifest records (``cmr_utils.prepare.prepare_dataset``)."""
        if "normalise_percentiles" not in manifest:
            raise ValueError(f"{where}: no normalise_percentiles; the prepared data predates stage 01 recording its "
                             "normalisation: rerun stage 01 (make prepare)")
        low, high = (float(p) for p in manifest["normalise_percentiles"])
        return cls(int(manifest["image_size"]), manifest["resize"], float(manifest.get("field_of_view", 1.0)),
                   low, high, manifest.get("geometry", "pixel"), manifest.get("target_spacing"))

    def geometry_of(self, vol):
        """The geometry a volume (``CardiacVolume``) is seen in: physical where the run was trained so and the
        volume has spacing (a warning says when a physical run must fall back to the scan's own field of view)."""
        import warnings

        from .geometry import geometry_for

        if self.geometry == "physical" and vol.spacing is None:
            warnings.warn(f"{vol.path}: no voxel spacing; this run was trained at {self.target_spacing} mm per pixel, "
                          "so the scan is seen relative to its own field of view (pixel geometry) and a heart framed "
                          "unlike the training scans may be missed: give the files their spacing", stacklevel=3)
        return geometry_for(self.as_dict(), *vol.image.shape[1:], vol.spacing)

    def to_model(self, vol) -> tuple[np.ndarray, object]:
        """The volume normalised to [0, 1] as stage 01 did it, and the geometry to put it on the model's grid."""
        from .prepare import normalise_volume

        return normalise_volume(vol.image, self.normalise_low, self.normalise_high), self.geometry_of(vol)

    def as_dict(self) -> dict:
        return asdict(self)


def run_plans(preprocessing: Preprocessing, *, test_time_flips: bool, init: str, n_classes: int,
              in_channels: int, training: dict) -> dict:
    """The ``plans.json`` record of a run (module docstring)."""
    if n_classes != len(LABELS):
        raise ValueError(f"n_classes: the label map has {len(LABELS)} classes ({LABELS}), got {n_classes}")
    return {"plans_version": PLANS_VERSION, "preprocessing": preprocessing.as_dict(),
            "predict": {"test_time_flips": bool(test_time_flips)},
            "labels": {str(k): v for k, v in LABELS.items()},
            "model": {**ARCHITECTURE, "in_channels": in_channels, "n_classes": n_classes, "init": init},
            "training": training, "versions": package_versions()}


def write_plans(run_dir: str | Path, plans: dict) -> Path:
    path = Path(run_dir) / PLANS_FILE
    write_json_atomic(path, plans)
    return path


def read_plans(run_dir: str | Path) -> dict:
    """A run folder's plans, checked: a clear error for a folder that is not a run, a run that did not train, or
    one trained before runs carried their plans (retrain it)."""
    run_dir = Path(run_dir)
    path, result = run_dir / PLANS_FILE, run_dir / "result.json"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    if result.is_file():  # a run that did not train has no model, whatever files an earlier training left
        try:
            status = json.loads(result.read_text()).get("status")
        except json.JSONDecodeError:
            status = None
        if status not in (None, "ok"):
            raise ValueError(f"{result}: run {run_dir.name} has status {status!r}, no model")
    if not path.is_file():
        if not result.is_file():
            raise FileNotFoundError(f"{run_dir}: not a trained run folder (no {PLANS_FILE}, no result.json)")
        raise FileNotFoundError(f"{path}: missing; run {run_dir.name} was trained before runs recorded what they "
                                "need to predict: retrain it (make finetune, or delete the run folder and rerun "
                                "stage 03)")
    try:
        plans = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    missing = [k for k in ("preprocessing", "predict", "labels", "model", "training") if k not in plans]
    if missing or plans.get("plans_version") != PLANS_VERSION:
        raise ValueError(f"{path}: expected plans version {PLANS_VERSION} with preprocessing, predict, labels, model "
                         f"and training; got version {plans.get('plans_version')!r}, missing {missing}")
    model = plans["model"]
    if {k: model.get(k) for k in ARCHITECTURE} != ARCHITECTURE:
        raise ValueError(f"{path}: a {model.get('architecture')}-{model.get('encoder')} model; this version of "
                         f"cmr_utils builds {ARCHITECTURE['architecture']}-{ARCHITECTURE['encoder']} only")
    if {int(k): v for k, v in plans["labels"].items()} != LABELS:
        raise ValueError(f"{path}: label map {plans['labels']}; prediction writes ACDC's labels {LABELS}")
    return plans
