"""Drawing explanations: CAM overlays, and figures of image | ground truth | prediction | CAM per structure.

:func:`build_rows` computes what a figure shows (predictions and CAMs of chosen slices);
:func:`plot_explanations` and :func:`plot_initialisations` draw it. Label maps use the project's structure
colours (``cmr_utils.plots.LABEL_COLOURS``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from torch import nn

from ..inference import predict
from ..structures import STRUCTURES  # (1 RV, 2 MYO, 3 LV)
from .cam import DEFAULT_LAYER, seg_grad_cam


def overlay(image: np.ndarray, cam: np.ndarray, image_weight: float = 0.5) -> np.ndarray:
    """The CAM as a jet heat map over the grey image: (H, W, 3) float32 RGB in [0, 1].

    Uses ``pytorch_grad_cam.utils.image.show_cam_on_image`` (which wants a float RGB image in [0, 1]
    and returns uint8; converted back to float here).
    """
    from pytorch_grad_cam.utils.image import show_cam_on_image

    image = np.asarray(image, dtype=np.float32)
    cam = np.asarray(cam, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"image must be one grey slice (H, W), got shape {image.shape}")
    if cam.shape != image.shape:
        raise ValueError(f"cam must have the image's shape {image.shape}, got {cam.shape}")
    for name, array in (("image", image), ("cam", cam)):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{name} must be finite with values in [0, 1]")
    rgb = np.repeat(image[..., None], 3, axis=2)
    return show_cam_on_image(rgb, cam, use_rgb=True, image_weight=image_weight).astype(np.float32) / 255.0


def label_colormap():
    """Matplotlib colormap and norm for label maps 0..3 (background, RV, MYO, LV)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    from ..plots import LABEL_COLOURS  # one colour per structure across every figure

    colours = [(0.0, 0.0, 0.0)] + [LABEL_COLOURS[k] for k in sorted(STRUCTURES)]
    cmap = ListedColormap(colours)
    return cmap, BoundaryNorm(np.arange(-0.5, len(colours)), cmap.N)


@dataclass
class ExplanationRow:
    """One slice to draw: the image, its ground truth and prediction, and one CAM per structure."""

    image: np.ndarray
    ground_truth: np.ndarray
    prediction: np.ndarray
    cams: dict[int, np.ndarray] = field(default_factory=dict)  # category -> (H, W) CAM
    title: str = ""


def row_title(patient: str, slice_index: int, score: float | None = None, phase: str | None = None) -> str:
    """A row title like ``patient001 ED slice 4 | score 0.912``."""
    parts = [str(patient)] + ([str(phase)] if phase else []) + [f"slice {slice_index}"]
    text = " ".join(parts)
    return text if score is None or np.isnan(score) else f"{text} | score {score:.3f}"


def build_rows(
    model: nn.Module,
    images: np.ndarray,
    ground_truth: np.ndarray,
    indices: Sequence[int],
    titles: Sequence[str] | None = None,
    layer: str = DEFAULT_LAYER,
    categories: Sequence[int] = tuple(STRUCTURES),
    region: str = "prediction",
) -> list[ExplanationRow]:
    """Rows for :func:`plot_explanations`: predictions and CAMs of ``model`` for the slices ``indices``.

    ``region`` is the CAM's target region: ``"prediction"`` (the model's predicted mask) or
    ``"ground_truth"``.
    """
    if region not in ("prediction", "ground_truth"):
        raise ValueError(f"region must be 'prediction' or 'ground_truth', got {region!r}")
    images = np.asarray(images, dtype=np.float32)
    ground_truth = np.asarray(ground_truth)
    if images.ndim != 3 or ground_truth.shape != images.shape:
        raise ValueError(
            f"images and ground_truth must be (N, H, W) of one shape, got {images.shape} and {ground_truth.shape}"
        )
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("indices is empty")
    if min(indices) < 0 or max(indices) >= len(images):
        raise ValueError(f"indices must lie in [0, {len(images)}), got {indices}")
    titles = list(titles) if titles is not None else [f"slice {i}" for i in indices]
    if len(titles) != len(indices):
        raise ValueError(f"titles must have one entry per index ({len(indices)}), got {len(titles)}")
    chosen = images[indices]
    predictions, _ = predict(model, chosen)
    cams = {}
    for category in categories:
        masks = (ground_truth[indices] == category) if region == "ground_truth" else None
        cams[category] = seg_grad_cam(model, chosen, category, masks=masks, layer=layer)
    return [
        ExplanationRow(chosen[k], ground_truth[i], predictions[k], {c: cams[c][k] for c in categories}, titles[k])
        for k, i in enumerate(indices)
    ]


def plot_explanations(rows: Sequence[ExplanationRow], row_labels: Sequence[str] | None = None, panel_size: float = 2.0):
    """Figure with one row per slice: image | ground truth | prediction | CAM overlay per structure.

    The CAM columns follow the categories of the first row's ``cams`` (named RV, MYO, LV). Row titles
    go above the image panel; ``row_labels`` (e.g. initialisation names) label the rows on the left.
    """
    import matplotlib.pyplot as plt

    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty: nothing to plot")
    if not all(isinstance(row, ExplanationRow) for row in rows):
        raise TypeError("rows must be ExplanationRow objects")
    categories = list(rows[0].cams)
    if any(list(row.cams) != categories for row in rows):
        raise ValueError("all rows must have CAMs for the same categories")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"row_labels must have one entry per row ({len(rows)}), got {len(row_labels)}")
    cmap, norm = label_colormap()
    n_columns = 3 + len(categories)
    figure, axes = plt.subplots(
        len(rows), n_columns, figsize=(panel_size * n_columns, panel_size * len(rows)), squeeze=False
    )
    headers = ["image", "ground truth", "prediction"] + [f"CAM {STRUCTURES.get(c, c)}" for c in categories]
    for r, row in enumerate(rows):
        axes[r, 0].imshow(row.image, cmap="gray", vmin=0, vmax=1)
        axes[r, 1].imshow(row.ground_truth, cmap=cmap, norm=norm, interpolation="nearest")
        axes[r, 2].imshow(row.prediction, cmap=cmap, norm=norm, interpolation="nearest")
        for k, category in enumerate(categories):
            axes[r, 3 + k].imshow(overlay(row.image, row.cams[category]))
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{row.title}\n{headers[c]}" if c == 0 and row.title else headers[c], fontsize=8)
        if row_labels is not None:
            axes[r, 0].set_ylabel(row_labels[r], fontsize=9)
    figure.tight_layout()
    return figure


def plot_initialisations(
    image: np.ndarray,
    ground_truth: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    cams: Mapping[str, Mapping[int, np.ndarray]],
    title: str = "",
    panel_size: float = 2.0,
):
    """Several initialisations side by side for one shared slice: one row per initialisation
    (``predictions`` and ``cams`` keyed by its name), columns as in :func:`plot_explanations`."""
    if not predictions:
        raise ValueError("predictions is empty: nothing to plot")
    if set(predictions) != set(cams):
        raise ValueError(
            f"predictions and cams must have the same initialisations, got {sorted(predictions)} and {sorted(cams)}"
        )
    names = list(predictions)
    rows = [ExplanationRow(image, ground_truth, predictions[n], dict(cams[n]), title if k == 0 else "")
            for k, n in enumerate(names)]
    return plot_explanations(rows, row_labels=names, panel_size=panel_size)
