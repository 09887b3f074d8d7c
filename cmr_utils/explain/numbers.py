"""The explanation numbers of a model on a set of slices, and their summary over seeds (stage 05's tables)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from torch import nn

from ..inference import predict
from ..structures import STRUCTURES  # (1 RV, 2 MYO, 3 LV)
from .cam import DEFAULT_LAYER, seg_grad_cam
from .faithfulness import deletion_insertion, sanity_check_randomised
from .measures import energy_in_ring, energy_inside, pointing_hit


def explanation_numbers(model: nn.Module, images: np.ndarray, ground_truth: np.ndarray, layer: str = DEFAULT_LAYER,
                        region: str = "prediction", steps: int = 10, ring_width: int = 3, seed: int = 0,
                        faithfulness: bool = True, bf16: bool = False) -> pd.DataFrame:
    """One row per (slice, structure) with the explanation numbers of ``model`` on ``images``.

    Columns: ``slice`` (position in ``images``), ``structure``, ``energy_inside`` and ``energy_ring`` (share of
    CAM energy inside the ground-truth structure and in a ``ring_width``-pixel ring around it),
    ``pointing_hit``, ``sanity_rho`` (Spearman correlation with the CAM of the same architecture with
    randomised weights), and with ``faithfulness`` the deletion / insertion AUCs (most relevant first, and
    the random-order reference). Slices where the structure is absent from the ground truth get NaN
    localisation numbers; where the CAM's region is empty, the CAM is zero and its numbers NaN.

    ``bf16``: the model's predictions (the predicted region and the deletion / insertion curves, most of the cost)
    under bf16 autocast, as stage 04 scores a run that trained in bf16 (``training.predicts_in_bf16``); the CAMs
    themselves are computed in fp32.
    """
    if region not in ("prediction", "ground_truth"):
        raise ValueError(f"explain.target: expected 'prediction' or 'ground_truth', got {region!r}")
    images = np.asarray(images, dtype=np.float32)
    ground_truth = np.asarray(ground_truth)
    predicted, _ = predict(model, images, bf16=bf16)
    rows = []
    for category, name in STRUCTURES.items():
        truth = ground_truth == category
        target = truth if region == "ground_truth" else predicted == category
        cams = seg_grad_cam(model, images, category, masks=target, layer=layer)
        inside, ring = energy_inside(cams, truth), energy_in_ring(cams, truth, ring_width)
        hits = pointing_hit(cams, truth)
        rho = sanity_check_randomised(model, images, category, layer=layer, seed=seed, masks=target)
        for k in range(len(images)):
            row = {"slice": k, "structure": name, "energy_inside": inside[k], "energy_ring": ring[k],
                   "pointing_hit": hits[k], "sanity_rho": rho[k]}
            if faithfulness:
                curves = ({} if not target[k].any() or not cams[k].any() else
                          deletion_insertion(model, images[k], category, cams[k], target[k], steps=steps, seed=seed,
                                             bf16=bf16))
                for key in ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc"):
                    row[key] = curves.get(key, np.nan)
            rows.append(row)
    return pd.DataFrame(rows)


XAI_METRICS = ("energy_inside", "energy_ring", "pointing_hit", "deletion_auc", "random_deletion_auc",
               "insertion_auc", "random_insertion_auc", "sanity_rho")


def summarise_numbers(numbers: pd.DataFrame) -> pd.DataFrame:
    """Per initialisation, layer and metric: the mean over slices and structures for each seed, then the mean
    over seeds with the SD over seeds, and the SD over slices (pooled over seeds)."""
    import pandas as pd

    rows = []
    for (init, layer), g in numbers.groupby(["init", "layer"], sort=True):
        for metric in XAI_METRICS:
            if metric not in g or g[metric].isna().all():
                continue
            per_seed = g.groupby("seed")[metric].mean()
            rows.append({"init": init, "layer": layer, "metric": metric, "mean": per_seed.mean(),
                         "sd_seeds": per_seed.std(ddof=1) if len(per_seed) > 1 else np.nan,
                         "sd_slices": g[metric].std(ddof=1), "n": int(g[metric].notna().sum()),
                         "seeds": len(per_seed)})
    return pd.DataFrame(rows, columns=["init", "layer", "metric", "mean", "sd_seeds", "sd_slices", "n", "seeds"])
