"""A slice-by-slice viewer of Seg-Grad-CAM explanations (ipywidgets), and its headless stand-in.

- :class:`SliceProvider` holds what is viewed, all in memory (no files): images, ground truth, slice
  metadata, and per initialisation either a model or ready-made predictions, plus a CAM function. It
  computes predictions and CAMs on demand and caches them per (init, layer, index, structure).
- :class:`CamViewer` puts widgets over a provider: patient, phase and slice (the slice slider follows
  the patient and phase), structure, initialisation and layer. Every change redraws
  image | ground truth | prediction | CAM overlay into an ``ipywidgets.Output``.
- :func:`static_montage` draws the same view for a list of selections as one matplotlib Figure, for
  reports where no widget can run.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
from torch import nn

from cmr_utils.explain.cam import DEFAULT_LAYER, seg_grad_cam
from cmr_utils.explain.figures import label_colormap, overlay
from cmr_utils.inference import predict
from cmr_utils.structures import STRUCTURE_LABELS, STRUCTURES, structure_label

STRUCTURE_CATEGORY = STRUCTURE_LABELS  # name -> label value
META_COLUMNS = ("patient", "phase", "slice")
PANEL_TITLES = ("image", "ground truth", "prediction", "CAM")

# cam_fn(init, layer, index, category) -> (H, W) CAM in [0, 1]
CamFunction = Callable[[str, str, int, int], np.ndarray]


class SliceProvider:
    """Everything the viewer shows, computed on demand and cached.

    Parameters
    ----------
    images : (N, H, W) float in [0, 1].
    ground_truth : (N, H, W) label maps (0 background, 1 RV, 2 MYO, 3 LV).
    meta : DataFrame with one row per slice (row i describes ``images[i]``) and columns
        ``patient``, ``phase``, ``slice``.
    models : init name -> segmentation model (eval mode). Used for predictions not given in
        ``predictions`` and, when ``cam_fn`` is None, for Seg-Grad-CAM.
    predictions : init name -> (N, H, W) label maps, for inits whose predictions are precomputed.
    cam_fn : ``cam_fn(init, layer, index, category) -> (H, W)`` CAM in [0, 1]. Default: Seg-Grad-CAM of
        ``models[init]`` at ``layer`` with the region given by ``region``.
    region : target region of the default CAM: ``"prediction"`` (the model's predicted mask) or
        ``"ground_truth"``.
    layers : layer names offered by the viewer.
    """

    def __init__(
        self,
        images: np.ndarray,
        ground_truth: np.ndarray,
        meta: pd.DataFrame,
        models: Mapping[str, nn.Module] | None = None,
        predictions: Mapping[str, np.ndarray] | None = None,
        cam_fn: CamFunction | None = None,
        region: str = "prediction",
        layers: Sequence[str] = (DEFAULT_LAYER, "encoder.layer3"),
    ):
        images = np.asarray(images, dtype=np.float32)
        ground_truth = np.asarray(ground_truth)
        if images.ndim != 3:
            raise ValueError(f"images must have shape (N, H, W), got {images.shape}")
        if ground_truth.shape != images.shape:
            raise ValueError(f"ground_truth must have the images' shape {images.shape}, got {ground_truth.shape}")
        if not isinstance(meta, pd.DataFrame):
            raise TypeError(f"meta must be a pandas DataFrame, got {type(meta).__name__}")
        missing = [c for c in META_COLUMNS if c not in meta.columns]
        if missing:
            raise ValueError(f"meta lacks the columns {missing}; expected {list(META_COLUMNS)}")
        if len(meta) != len(images):
            raise ValueError(f"meta must have one row per image ({len(images)}), got {len(meta)}")
        models = dict(models or {})
        predictions = {name: np.asarray(p) for name, p in (predictions or {}).items()}
        for name, p in predictions.items():
            if p.shape != images.shape:
                raise ValueError(f"predictions[{name!r}] must have the images' shape {images.shape}, got {p.shape}")
        for name, model in models.items():
            if not isinstance(model, nn.Module):
                raise TypeError(f"models[{name!r}] must be a torch.nn.Module, got {type(model).__name__}")
        inits = list(dict.fromkeys([*models, *predictions]))
        if not inits:
            raise ValueError("give at least one initialisation in models or predictions")
        if cam_fn is None:
            without_model = [name for name in inits if name not in models]
            if without_model:
                raise ValueError(f"cam_fn is needed for initialisations without a model: {without_model}")
        elif not callable(cam_fn):
            raise TypeError("cam_fn must be callable: cam_fn(init, layer, index, category) -> (H, W)")
        if region not in ("prediction", "ground_truth"):
            raise ValueError(f"region must be 'prediction' or 'ground_truth', got {region!r}")
        layers = list(layers)
        if not layers or not all(isinstance(layer, str) for layer in layers):
            raise ValueError(f"layers must be a non-empty list of layer names, got {layers!r}")

        self.images = images
        self.ground_truth = ground_truth
        self.meta = meta.reset_index(drop=True)
        self.models = models
        self.inits = inits
        self.layers = layers
        self.region = region
        self._predictions = predictions
        self._cam_fn = cam_fn
        self._prediction_cache: dict[tuple[str, int], np.ndarray] = {}
        self.cam_cache: dict[tuple[str, str, int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.images)

    def _check(self, init: str, index: int) -> None:
        if init not in self.inits:
            raise ValueError(f"init must be one of {self.inits}, got {init!r}")
        if not 0 <= index < len(self):
            raise ValueError(f"index must lie in [0, {len(self)}), got {index}")

    def prediction(self, init: str, index: int) -> np.ndarray:
        """Predicted label map (H, W) of slice ``index`` by ``init``."""
        self._check(init, index)
        if init in self._predictions:
            return self._predictions[init][index]
        key = (init, index)
        if key not in self._prediction_cache:
            labels, _ = predict(self.models[init], self.images[index:index + 1])
            self._prediction_cache[key] = labels[0]
        return self._prediction_cache[key]

    def cam(self, init: str, layer: str, index: int, structure) -> np.ndarray:
        """CAM (H, W) of ``structure`` on slice ``index`` by ``init`` at ``layer`` (cached)."""
        self._check(init, index)
        category = structure_label(structure)
        key = (init, layer, index, category)
        if key not in self.cam_cache:
            if self._cam_fn is not None:
                cam = np.asarray(self._cam_fn(init, layer, index, category), dtype=np.float32)
            else:
                masks = None
                if self.region == "ground_truth":
                    masks = self.ground_truth[index:index + 1] == category
                cam = seg_grad_cam(self.models[init], self.images[index:index + 1], category,
                                   masks=masks, layer=layer)[0]
            if cam.shape != self.images.shape[1:]:
                raise ValueError(f"the CAM function returned shape {cam.shape}, expected {self.images.shape[1:]}")
            self.cam_cache[key] = cam
        return self.cam_cache[key]

    def view(self, index: int, structure, init: str, layer: str) -> dict[str, np.ndarray]:
        """The four arrays of one view: image, ground_truth, prediction, cam."""
        return {
            "image": self.images[index],
            "ground_truth": self.ground_truth[index],
            "prediction": self.prediction(init, index),
            "cam": self.cam(init, layer, index, structure),
        }

    def describe(self, index: int) -> str:
        row = self.meta.iloc[index]
        return f"{row['patient']} {row['phase']} slice {row['slice']}"


def _draw_view(axes, arrays: Mapping[str, np.ndarray], title: str) -> None:
    """Draw image | ground truth | prediction | CAM overlay on four axes."""
    cmap, norm = label_colormap()
    axes[0].imshow(arrays["image"], cmap="gray", vmin=0, vmax=1)
    axes[1].imshow(arrays["ground_truth"], cmap=cmap, norm=norm, interpolation="nearest")
    axes[2].imshow(arrays["prediction"], cmap=cmap, norm=norm, interpolation="nearest")
    axes[3].imshow(overlay(arrays["image"], arrays["cam"]))
    for ax, panel in zip(axes, PANEL_TITLES):
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(panel, fontsize=8)
    axes[0].set_title(f"{title}\n{PANEL_TITLES[0]}", fontsize=8)


def static_montage(
    provider: SliceProvider,
    selections: Sequence[tuple[int, object, str]],
    layer: str = DEFAULT_LAYER,
    panel_size: float = 2.0,
):
    """One Figure with a row per selection ``(index, structure, init)``: image | ground truth |
    prediction | CAM overlay, as the viewer draws it (4 axes per selection)."""
    import matplotlib.pyplot as plt

    if not isinstance(provider, SliceProvider):
        raise TypeError(f"provider must be a SliceProvider, got {type(provider).__name__}")
    selections = list(selections)
    if not selections:
        raise ValueError("selections is empty: nothing to draw")
    figure, axes = plt.subplots(len(selections), 4, figsize=(4 * panel_size, panel_size * len(selections)),
                                squeeze=False)
    for row, selection in enumerate(selections):
        if len(selection) != 3:
            raise ValueError(f"each selection must be (index, structure, init), got {selection!r}")
        index, structure, init = selection
        arrays = provider.view(int(index), structure, init, layer)
        name = STRUCTURES[structure_label(structure)]
        _draw_view(axes[row], arrays, f"{provider.describe(int(index))} | {name} | {init}")
    figure.tight_layout()
    return figure


class CamViewer:
    """Widgets over a :class:`SliceProvider` to browse slices and their CAMs.

    ``viewer.widget`` is the VBox to display. ``viewer.state`` is the current selection (patient,
    phase, slice, index, structure, init, layer); ``viewer.last_arrays`` and ``viewer.last_figure`` are
    what the last redraw drew, so the viewer can be checked without a display.
    """

    def __init__(self, provider: SliceProvider, panel_size: float = 2.5):
        import ipywidgets as widgets

        if not isinstance(provider, SliceProvider):
            raise TypeError(f"provider must be a SliceProvider, got {type(provider).__name__}")
        self.provider = provider
        self.panel_size = panel_size
        self.last_arrays: dict[str, np.ndarray] | None = None
        self.last_figure = None
        self.n_redraws = 0
        self._holding = False  # set while one change updates dependent widgets: redraw once, at the end

        meta = provider.meta
        patients = sorted(meta["patient"].unique(), key=str)
        self.patient = widgets.Dropdown(options=patients, value=patients[0], description="patient")
        self.phase = widgets.Dropdown(options=self._phases(patients[0]), description="phase")
        slices = self._slices(patients[0], self.phase.value)
        self.slice = widgets.SelectionSlider(options=slices, value=slices[0], description="slice",
                                             continuous_update=False)
        self.structure = widgets.Dropdown(options=list(STRUCTURE_CATEGORY), value="LV", description="structure")
        self.init = widgets.Dropdown(options=provider.inits, value=provider.inits[0], description="init")
        self.layer = widgets.Dropdown(options=provider.layers, value=provider.layers[0], description="layer")
        self.output = widgets.Output()
        self.widget = widgets.VBox([
            widgets.HBox([self.patient, self.phase, self.slice]),
            widgets.HBox([self.structure, self.init, self.layer]),
            self.output,
        ])

        self.patient.observe(self._on_patient, names="value")
        self.phase.observe(self._on_phase, names="value")
        for control in (self.slice, self.structure, self.init, self.layer):
            control.observe(self._on_change, names="value")
        self.redraw()

    # --- what the selection means

    def _phases(self, patient) -> list:
        meta = self.provider.meta
        return sorted(meta.loc[meta["patient"] == patient, "phase"].unique(), key=str)

    def _slices(self, patient, phase) -> list[int]:
        meta = self.provider.meta
        chosen = meta.loc[(meta["patient"] == patient) & (meta["phase"] == phase), "slice"]
        return sorted(int(s) for s in chosen.unique())

    def _index(self) -> int:
        meta = self.provider.meta
        match = meta.index[(meta["patient"] == self.patient.value) & (meta["phase"] == self.phase.value)
                           & (meta["slice"] == self.slice.value)]
        if len(match) != 1:
            raise ValueError(
                f"meta must have exactly one row per (patient, phase, slice); found {len(match)} for "
                f"({self.patient.value!r}, {self.phase.value!r}, {self.slice.value!r})"
            )
        return int(match[0])

    @property
    def state(self) -> dict:
        return {
            "patient": self.patient.value,
            "phase": self.phase.value,
            "slice": self.slice.value,
            "index": self._index(),
            "structure": self.structure.value,
            "init": self.init.value,
            "layer": self.layer.value,
        }

    # --- reacting to the widgets

    def _on_patient(self, change) -> None:
        self._holding = True
        try:
            self.phase.options = self._phases(change["new"])  # also resets phase.value -> _on_phase
            self._reset_slices()
        finally:
            self._holding = False
        self.redraw()

    def _on_phase(self, change) -> None:
        if self._holding:
            return
        self._holding = True
        try:
            self._reset_slices()
        finally:
            self._holding = False
        self.redraw()

    def _reset_slices(self) -> None:
        """The slice slider's range follows the patient and phase; keep the slice if it exists."""
        slices = self._slices(self.patient.value, self.phase.value)
        previous = self.slice.value
        self.slice.options = slices
        self.slice.value = previous if previous in slices else slices[len(slices) // 2]

    def _on_change(self, change) -> None:
        if not self._holding:
            self.redraw()

    def redraw(self) -> None:
        """Draw the current selection into the output (and keep it in ``last_arrays``/``last_figure``)."""
        import matplotlib.pyplot as plt
        from IPython.display import display

        state = self.state
        arrays = self.provider.view(state["index"], state["structure"], state["init"], state["layer"])
        figure, axes = plt.subplots(1, 4, figsize=(4 * self.panel_size, self.panel_size))
        title = f"{self.provider.describe(state['index'])} | {state['structure']} | {state['init']}"
        _draw_view(axes, arrays, title)
        figure.tight_layout()
        self.output.clear_output(wait=True)
        with self.output:
            display(figure)
        plt.close(figure)  # shown once through the Output; pyplot must not keep every redraw alive
        self.last_arrays = {name: np.array(a, copy=True) for name, a in arrays.items()}
        self.last_figure = figure
        self.n_redraws += 1
