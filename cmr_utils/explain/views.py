"""Stage 05's figures and numbers over the sweep's runs. Each figure function returns a ``plots.Drawn`` (the figure
and its alternative text); ``cmr_utils.figures`` names the file each is saved as.

``images`` (N, H, W) and ``truth`` (N, H, W) are the prepared test slices, ``meta`` their rows (patient, slice,
phase); ``region`` is what Seg-Grad-CAM explains: ``prediction`` (each model's predicted mask) or ``ground_truth``.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from ..inference import predict
from ..metrics import STRUCTURES
from ..plots import Drawn
from .cam import seg_grad_cam
from .figures import build_rows, plot_explanations, plot_initialisations, row_title
from .numbers import explanation_numbers

GROUPS = ("best", "median", "worst")


def slice_title(meta: pd.DataFrame, index: int, score: float | None = None) -> str:
    row = meta.iloc[index]
    return row_title(row["patient"], int(row["slice"]), score, row["phase"])


def best_median_worst(model, images, truth, meta: pd.DataFrame, scores, groups: Mapping[str, np.ndarray], *,
                      init: str, layer: str, region: str = "prediction") -> Drawn:
    """One row per selected slice (``groups``: ``explain.select_slices`` of the per-slice ``scores``), best first:
    image, ground truth, prediction and the CAM of each structure on ``layer``."""
    order = [(group, int(i)) for group in GROUPS for i in groups[group]]
    titles = [f"{group}: " + slice_title(meta, i, scores[i]) for group, i in order]
    fig = plot_explanations(build_rows(model, images, truth, [i for _, i in order], titles, layer=layer, region=region))
    fig.suptitle(f"{init}: best / median / worst test slices", y=1.0)
    return Drawn(fig, f"Seg-Grad-CAM of the {init} model (all labels) on its best, median and worst test slices by "
                      f"Dice: {len(order)} rows ({'; '.join(titles)}), each showing the image, the ground truth, the "
                      f"prediction and the CAM on {layer} for RV, MYO and LV.")


def shared_medians(selected: Mapping[str, Mapping[str, np.ndarray]]) -> list[int]:
    """Each initialisation's (first) median slice, once each, in the initialisations' order."""
    return list(dict.fromkeys(int(groups["median"][0]) for groups in selected.values() if len(groups["median"])))


def across_initialisations(models: Mapping[str, object], images, truth, meta: pd.DataFrame, index: int, *,
                           layer: str, region: str = "prediction") -> Drawn:
    """Test slice ``index`` explained by every model of ``models`` ({init: model}), one row each."""
    x = images[index:index + 1]
    masks = {c: (truth[index:index + 1] == c) if region == "ground_truth" else None for c in STRUCTURES}
    preds = {init: predict(m, x)[0][0] for init, m in models.items()}
    cams = {init: {c: seg_grad_cam(m, x, c, layer=layer, masks=masks[c])[0] for c in STRUCTURES}
            for init, m in models.items()}
    title = slice_title(meta, index)
    fig = plot_initialisations(images[index], truth[index], preds, cams, title)
    return Drawn(fig, f"Test slice {title} explained by each initialisation ({', '.join(models)}), one row each: the "
                      "image, the ground truth, that model's prediction and its Seg-Grad-CAM for RV, MYO and LV.")


def montage_selection(provider, selected: Mapping[str, Mapping[str, np.ndarray]]) -> list[tuple[int, str, str]]:
    """(index, structure, init) for each initialisation's best slice and the (up to two) structures its model
    predicts there (MYO where it predicts none)."""
    montage = []
    for init, groups in selected.items():
        index = int(groups["best"][0])
        predicted = provider.prediction(init, index)
        shown = [name for code, name in STRUCTURES.items() if (predicted == code).any()][:2] or ["MYO"]
        montage += [(index, name, init) for name in shown]
    return montage


def viewer_montage(provider, montage: list[tuple[int, str, str]], layer: str) -> Drawn:
    """The slice viewer (``cmr_utils.viewer``) drawn statically, one row per (index, structure, init)."""
    from ..viewer import static_montage

    fig = static_montage(provider, montage, layer=layer)
    return Drawn(fig, "The slice viewer drawn statically, one row per initialisation's best test slice and structure ("
                      + "; ".join(f"{init}: slice {index}, {name}" for index, name, init in montage)
                      + "): the image, the ground truth, the prediction and the Seg-Grad-CAM overlay.")


def evenly_spaced(n: int, most: int) -> np.ndarray:
    """Up to ``most`` indices of ``range(n)``, evenly spaced, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(most, n)).round().astype(int))


def numbers_over_runs(runs: pd.DataFrame, finetune_dir, images, truth, *, layers, region: str, steps: int,
                      max_slices: int, device: str = "cpu") -> pd.DataFrame:
    """``explanation_numbers`` of every run (its selected model; rows: name, init, seed, precision) on up to
    ``max_slices`` evenly spaced slices, for every layer (faithfulness on the first), with the pixels each CAM
    explains (``report.explained_regions``) and columns init, seed, layer; ``slice`` indexes ``images``. Each model
    predicts as stage 04 scored it: in bf16 where it trained in bf16 and ``device`` runs it."""
    from ..finetune import load_trained_model
    from ..report import explained_regions
    from ..training import predicts_in_bf16

    picks = evenly_spaced(len(images), max_slices)
    tables = []
    for run in runs.itertuples():
        model = load_trained_model(finetune_dir(run.name)).to(device)
        bf16 = predicts_in_bf16(getattr(run, "precision", None), device)
        explained = truth[picks] if region == "ground_truth" else predict(model, images[picks], bf16=bf16)[0]
        for layer in layers:
            numbers = explanation_numbers(model, images[picks], truth[picks], layer=layer, region=region, steps=steps,
                                          faithfulness=layer == layers[0], bf16=bf16)
            numbers = numbers.merge(explained_regions(explained, truth[picks]), on=["slice", "structure"])
            tables.append(numbers.assign(init=run.init, seed=run.seed, layer=layer, slice=picks[numbers["slice"]]))
    return pd.concat(tables, ignore_index=True)
