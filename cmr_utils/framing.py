"""The framing test: the same labelled scans framed as other centres frame them, segmented and scored.

Scans differ between centres in how much of the thorax they show. From labelled volumes this module builds the
framings that occur in practice (``FRAMINGS``) and scores a segmenter on each beside the original framing:

- ``heart crop k×``: a square around the heart, centred on the bounding box of its labels over the whole volume,
  of side k times the box's longer side (in mm where the spacing is known), cut from the slice (clipped at its
  edges): what a centre that stores crops around the heart gives (k = 1 touches the heart's outer edge);
- ``padded k× field``: the slice zero-padded around to k times its height and width: a wider field of view.

Each framed volume keeps its voxel spacing; the segmenter sees it as a new scan (``TrainedRun.segment``: the
run's preprocessing, the heart located first in fields larger than the training window) and is scored with ACDC's
3D Dice on the framed volume's own grid. ``python -m cmr_utils.framing`` (``make framing``) runs it for one run
on the validation or test patients of its workspace.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from . import metrics
from .readers import CardiacVolume, DataError


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """3D Dice of two masks; 1 where both are empty (as ``metrics.structure_scores``)."""
    tp = np.count_nonzero(pred & truth)
    return float(metrics.overlap_scores(tp, np.count_nonzero(pred) - tp, np.count_nonzero(truth) - tp, empty=1.0)[1])


def heart_box(label: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), end exclusive: the bounding box of every labelled voxel of a volume (Z, H, W)."""
    ys, xs = np.nonzero(np.asarray(label).max(axis=0))
    if ys.size == 0:
        raise DataError("heart_box: the volume has no labelled voxel; a crop around the heart needs one")
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def crop_around_heart(vol: CardiacVolume, factor: float) -> CardiacVolume:
    """``vol`` cut to a square (in mm where the spacing is known) around its heart, ``factor`` times the heart's
    bounding box's longer side, centred on the box and clipped at the slice's edges."""
    y0, y1, x0, x1 = heart_box(vol.label)
    sy, sx = (1.0, 1.0) if vol.spacing is None else vol.spacing[1:]
    side_mm = factor * max((y1 - y0) * sy, (x1 - x0) * sx)
    h, w = vol.image.shape[1:]
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    half_y, half_x = side_mm / sy / 2, side_mm / sx / 2
    ya, yb = max(0, math.floor(cy - half_y)), min(h, math.ceil(cy + half_y))
    xa, xb = max(0, math.floor(cx - half_x)), min(w, math.ceil(cx + half_x))
    return replace(vol, image=np.ascontiguousarray(vol.image[:, ya:yb, xa:xb]),
                   label=np.ascontiguousarray(vol.label[:, ya:yb, xa:xb]))


def pad_field(vol: CardiacVolume, factor: float) -> CardiacVolume:
    """``vol`` zero-padded around each slice to ``factor`` times its height and width (centred)."""
    z, h, w = vol.image.shape
    ph, pw = round(factor * h) - h, round(factor * w) - w
    pads = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2))
    return replace(vol, image=np.pad(vol.image, pads), label=np.pad(vol.label, pads))


FRAMINGS: dict[str, Callable[[CardiacVolume], CardiacVolume]] = {
    "original": lambda vol: vol,
    "heart crop 1.0×": partial(crop_around_heart, factor=1.0),
    "heart crop 1.25×": partial(crop_around_heart, factor=1.25),
    "heart crop 1.5×": partial(crop_around_heart, factor=1.5),
    "padded 1.5× field": partial(pad_field, factor=1.5),
    "padded 2× field": partial(pad_field, factor=2.0),
}


def framing_scores(segment: Callable[[CardiacVolume], np.ndarray], volumes, framings=None) -> pd.DataFrame:
    """3D Dice per (framing, patient, phase, structure) of ``segment`` (a volume -> its label map on the volume's
    grid) on every labelled volume of ``volumes`` in every framing (default ``FRAMINGS``)."""
    framings = FRAMINGS if framings is None else framings
    rows = []
    for vol in volumes:
        if vol.label is None:
            continue
        for name, frame in framings.items():
            framed = frame(vol)
            pred = np.asarray(segment(framed), dtype=np.uint8)
            for k, structure in metrics.STRUCTURES.items():
                rows.append({"framing": name, "patient": vol.patient, "phase": vol.phase, "structure": structure,
                             "shape": "x".join(map(str, framed.image.shape[1:])),
                             "dice": dice(pred == k, framed.label == k)})
    if not rows:
        raise DataError("framing_scores: no labelled volume to score")
    return pd.DataFrame(rows)


def framing_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean Dice over structures and volumes per framing (the order of ``scores``), with the difference to
    ``original`` where it is there."""
    order = list(dict.fromkeys(scores["framing"]))
    per_volume = scores.groupby(["framing", "patient", "phase"], sort=False)["dice"].mean()
    table = per_volume.groupby(level="framing", sort=False).agg(["mean", "min", "count"]).reindex(order)
    table.columns = ["dice", "worst volume", "volumes"]
    if "original" in table.index:
        table["vs original"] = table["dice"] - table.loc["original", "dice"]
    return table


def framing_test(runs: pd.DataFrame, profile: str, data: str, split: str = "test", device: str = "cpu") -> pd.DataFrame:
    """``framing_scores`` of every run of ``runs`` (rows with name, init, budget, seed) on the ``split`` patients
    of the workspace, each run as ``make predict`` would use it (``open_run``); one row per run, framing,
    patient, phase and structure."""
    from .predict_scans import open_run

    if runs.empty:
        return pd.DataFrame(columns=["framing", "patient", "phase", "structure", "shape", "dice", "run", "init",
                                     "budget", "seed"])
    volumes = list(split_volumes(profile, data, split))
    scores = [framing_scores(open_run(run.name, profile, data, device=device).segment, volumes)
              .assign(run=run.name, init=run.init, budget=run.budget, seed=run.seed) for run in runs.itertuples()]
    return pd.concat(scores, ignore_index=True)


def framing_by_init(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean 3D Dice (over RV, MYO, LV, volumes and seeds) per initialisation and framing, a column per framing,
    and the worst framing's difference to the original."""
    if scores.empty:
        return pd.DataFrame(columns=["init", *FRAMINGS, "worst vs original"])
    per_volume = scores.groupby(["init", "framing", "seed", "patient", "phase"], sort=False)["dice"].mean()
    table = per_volume.groupby(level=["init", "framing"], sort=False).mean().unstack("framing")
    table = table[list(dict.fromkeys(scores["framing"]))]
    worst = table.drop(columns="original").min(axis=1) - table["original"]
    return table.assign(**{"worst vs original": worst}).reset_index()


def split_volumes(profile: str, data: str, split: str):
    """The labelled volumes of the ``split`` patients of a workspace (as stage 01 split them)."""
    from .evaluate import labelled_source
    from .paths import workspace
    from .prepare import Prepared

    prepared = Prepared.open(workspace(profile, data).prepared)
    table = prepared.split_table()
    patients = sorted(table.loc[table["split"] == split, "patient"])
    if not patients:
        raise DataError(f"{prepared.folder}: no patient in split {split!r}")
    return labelled_source(prepared).volumes(patients)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="{init}-{budget}-s{seed}, e.g. random-all-s0")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--data", default="", help="the DATA= the run was trained on (empty: the phantom)")
    parser.add_argument("--split", default="val", choices=("val", "test"),
                        help="whose patients (choose on val; the test split reports)")
    parser.add_argument("--output", default=None, help="CSV of per-volume, per-structure Dice (optional)")
    args = parser.parse_args(argv)
    try:
        from .predict_scans import open_run

        trained = open_run(args.run, args.profile, args.data)
        scores = framing_scores(trained.segment, split_volumes(args.profile, args.data, args.split))
    except (ValueError, FileNotFoundError) as err:  # DataError included
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        scores.to_csv(args.output, index=False)
    print(f"{args.run} ({args.profile}), {args.split} split, mean 3D Dice over RV, MYO, LV:")
    print(framing_table(scores).to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
