"""Seg-Grad-CAM explanations of the segmentation models and the numbers that judge them.

One module per concern; the public names are gathered here so that notebooks read
``explain.seg_grad_cam(...)``:

- ``cam``           the CAMs: :func:`seg_grad_cam`, :func:`resolve_layer`, ``DEFAULT_LAYER``;
- ``measures``      numbers for one CAM (pure numpy, one value per slice): :func:`energy_inside`,
  :func:`energy_in_ring`, :func:`ring_around`, :func:`pointing_hit`, :func:`cam_rank_correlation`;
- ``faithfulness``  checks that re-run the model: :func:`deletion_insertion`, :func:`randomised_copy`,
  :func:`sanity_check_randomised`;
- ``selection``     choosing slices: :func:`select_slices`;
- ``figures``       drawing: :func:`overlay`, :func:`label_colormap`, :class:`ExplanationRow`,
  :func:`row_title`, :func:`build_rows`, :func:`plot_explanations`, :func:`plot_initialisations`;
- ``numbers``       per run: :func:`explanation_numbers`, :func:`summarise_numbers`, ``XAI_METRICS``.

Prediction lives in :mod:`cmr_utils.inference` (``predict`` is re-exported here for the notebooks), the
structure names in :mod:`cmr_utils.structures` (``STRUCTURES``).

Array conventions: images (N, H, W) float32 in [0, 1]; label maps uint8 (0 background, 1 RV, 2 MYO,
3 LV); CAMs (N, H, W) float32 in [0, 1]. Functions that take one slice (H, W) also take a stack
(N, H, W) and then return one value per slice.
"""
from ..inference import predict
from ..structures import STRUCTURES
from .cam import DEFAULT_LAYER, resolve_layer, seg_grad_cam
from .faithfulness import deletion_insertion, randomised_copy, sanity_check_randomised
from .figures import (ExplanationRow, build_rows, label_colormap, overlay, plot_explanations, plot_initialisations,
                      row_title)
from .measures import cam_rank_correlation, energy_in_ring, energy_inside, pointing_hit, ring_around
from .numbers import XAI_METRICS, explanation_numbers, summarise_numbers
from .selection import select_slices

__all__ = [
    "DEFAULT_LAYER", "STRUCTURES", "XAI_METRICS", "ExplanationRow", "build_rows", "cam_rank_correlation",
    "deletion_insertion", "energy_in_ring", "energy_inside", "explanation_numbers", "label_colormap", "overlay",
    "plot_explanations", "plot_initialisations", "pointing_hit", "predict", "randomised_copy", "resolve_layer",
    "ring_around", "row_title", "sanity_check_randomised", "seg_grad_cam", "select_slices", "summarise_numbers",
]
