"""The rules between a slice's original pixel grid and the model's grid, used both ways.

Two geometries share one interface (``to_model``, ``to_canvas``, ``label_probabilities``, ``to_native``,
``labels_to_native``, ``model_spacing``); ``geometry_for`` picks the one a prepared folder used:

- ``PhysicalGeometry`` (``data.geometry: physical``, wherever the voxel spacing is known): every slice is
  resampled in-plane to one target spacing in mm, so the heart has the same size in model pixels whatever the
  scanner's pixel size or field of view. Training sees the central ``size`` x ``size`` window of the resampled
  slice (``size`` times the target spacing in mm, chosen in stage 01 to hold every training heart with a
  margin); inference sees the whole resampled field padded to at least that window (``to_canvas``), scored with
  the heart located first where it is larger (``cmr_utils.inference.predict_field``). A tight crop around the
  heart is padded, a wide thorax searched: the heart stays at its training scale.
- ``SliceGeometry`` (pixel geometry: sources without spacing, and ``data.geometry: pixel``) ties the model grid
  to the scan's own field of view, as below; a scan framed unlike the training scans is seen at another scale.

Pixel geometry, forward (stage 01, ``SliceGeometry.to_model``): make the slice square (``pad``: zeros around it up to
max(h, w); ``crop``: its central min(h, w) square), keep the central ``field_of_view`` fraction of that
square (side ``c = round(field_of_view * side)``), and resize the kept square to ``size`` x ``size`` (image
bilinear with antialiasing when shrinking, label by nearest neighbour).

Backward (stage 04, ``SliceGeometry.to_native``): per-class probabilities on the model grid are resized
bilinearly to ``c`` x ``c``, put back where the kept square was, and everything the forward step dropped
(outside the field of view, the margins cut off by ``crop``) gets background probability 1. The result is
on the original (h, w) grid, where it is compared with the original labels.

Both directions are the same placement: a ``c`` x ``c`` window whose top-left corner lies at ``origin`` in
the original slice's pixel coordinates (negative, or reaching past the slice, when it extends into padding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MODES = ("pad", "crop")
GEOMETRIES = ("physical", "pixel")


@dataclass(frozen=True)
class SliceGeometry:
    """Geometry of a stack of slices of shape (orig_h, orig_w) on a ``size`` x ``size`` model grid."""

    orig_h: int
    orig_w: int
    mode: str = "pad"
    field_of_view: float = 1.0
    size: int = 128

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"resize: expected 'pad' or 'crop', got {self.mode!r}")
        for name in ("orig_h", "orig_w", "size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        fov = self.field_of_view
        if isinstance(fov, bool) or not isinstance(fov, (int, float, np.floating)) or not 0 < fov <= 1:
            raise ValueError(f"field_of_view: expected a fraction in (0, 1] of the squared slice, got {fov!r}")

    @classmethod
    def from_manifest(cls, manifest: dict, orig_h: int, orig_w: int) -> "SliceGeometry":
        """The geometry a prepared folder used for a slice of (orig_h, orig_w); manifests written before the
        field of view existed used the whole square (1.0)."""
        return cls(int(orig_h), int(orig_w), manifest["resize"], float(manifest.get("field_of_view", 1.0)),
                   int(manifest["image_size"]))

    # ------------------------------------------------------------------------------------------ numbers
    @property
    def side(self) -> int:
        """Side of the squared slice: max(h, w) for ``pad``, min(h, w) for ``crop``."""
        return max(self.orig_h, self.orig_w) if self.mode == "pad" else min(self.orig_h, self.orig_w)

    @property
    def crop(self) -> int:
        """Side ``c`` of the kept central square (original pixels) that becomes the model grid."""
        return min(self.side, max(1, round(self.field_of_view * self.side)))

    @property
    def origin(self) -> tuple[int, int]:
        """(y, x) of the kept square's top-left corner in the original slice's pixel coordinates."""
        inset = (self.side - self.crop) // 2
        if self.mode == "pad":
            return inset - (self.side - self.orig_h) // 2, inset - (self.side - self.orig_w) // 2
        return inset + (self.orig_h - self.side) // 2, inset + (self.orig_w - self.side) // 2

    @property
    def spacing_factor(self) -> float:
        """New pixel spacing / old pixel spacing (mm per model pixel = factor * mm per original pixel)."""
        return self.crop / self.size

    @property
    def canvas_shape(self) -> tuple[int, int]:
        """Shape of the inference input (``to_canvas``): the model grid itself."""
        return self.size, self.size

    def model_spacing(self, spacing_yx) -> tuple[float, float]:
        """(y, x) mm per model pixel for a slice of ``spacing_yx`` mm per original pixel (NaN without)."""
        sy, sx = (np.nan, np.nan) if spacing_yx is None else spacing_yx
        return sy * self.spacing_factor, sx * self.spacing_factor

    def _overlap(self) -> tuple[slice, slice, slice, slice]:
        """(rows, cols) of the original slice inside the window, and the same pixels in window coordinates."""
        (y0, x0), c = self.origin, self.crop
        ny0, ny1 = max(0, y0), min(self.orig_h, y0 + c)
        nx0, nx1 = max(0, x0), min(self.orig_w, x0 + c)
        return slice(ny0, ny1), slice(nx0, nx1), slice(ny0 - y0, ny1 - y0), slice(nx0 - x0, nx1 - x0)

    def _window(self, stack: np.ndarray) -> np.ndarray:
        """(Z, h, w) -> (Z, c, c): the kept square, zeros where it extends into padding."""
        ny, nx, wy, wx = self._overlap()
        out = np.zeros((stack.shape[0], self.crop, self.crop), dtype=stack.dtype)
        out[:, wy, wx] = stack[:, ny, nx]
        return out

    def _check_stack(self, stack, name: str, ndim: int) -> np.ndarray:
        stack = np.asarray(stack)
        if stack.ndim != ndim or stack.shape[-2:] != self._expected(name):
            raise ValueError(f"{name}: expected shape {('Z', 'C')[:ndim - 2] + self._expected(name)}, "
                             f"got {stack.shape}")
        return stack

    def _expected(self, name: str) -> tuple[int, int]:
        return (self.size, self.size) if name == "prob_stack" else (self.orig_h, self.orig_w)

    # ------------------------------------------------------------------------------------------ forward
    def to_model(self, image_stack: np.ndarray, label_stack: np.ndarray | None = None):
        """(Z, h, w) image (and label) -> model grid (Z, size, size): image float32 clipped to [0, 1]
        (bilinear, antialiased when shrinking), label uint8 (nearest neighbour; never a new class).
        Returns ``(image, label)``; label is None when none is given."""
        import torch
        import torch.nn.functional as F

        image_stack = self._check_stack(image_stack, "image_stack", 3)
        size, c = self.size, self.crop
        img = torch.from_numpy(self._window(np.asarray(image_stack, dtype=np.float32)))[:, None]
        img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=c > size, align_corners=False)
        lab = None
        if label_stack is not None:
            label_stack = self._check_stack(label_stack, "label_stack", 3)
            window = torch.from_numpy(self._window(np.asarray(label_stack, dtype=np.int16)))[:, None].float()
            lab = F.interpolate(window, size=(size, size), mode="nearest-exact")[:, 0].to(torch.uint8).numpy()
        return img[:, 0].clamp(0, 1).numpy(), lab

    def to_canvas(self, image_stack: np.ndarray) -> np.ndarray:
        """The inference input: with pixel geometry, the model grid (``to_model``'s image)."""
        return self.to_model(image_stack)[0]

    def label_probabilities(self, label_stack: np.ndarray, n_classes: int = 4, on_canvas: bool = False) -> np.ndarray:
        """(Z, h, w) labels -> (Z, n_classes, size, size) float32: each class's share of every model pixel
        (one-hot, background outside the slice, area-averaged like the image). What a perfect model at the
        model grid's resolution would predict; ``to_native`` of it recovers the labels up to sub-pixel edges,
        whereas the hard (nearest-neighbour) labels of ``to_model`` lose about a model pixel's detail. The model
        grid is the canvas in pixel geometry (``on_canvas`` changes nothing)."""
        import torch
        import torch.nn.functional as F

        label_stack = self._check_stack(label_stack, "label_stack", 3)
        z, c = label_stack.shape[0], self.crop
        window = self._window(np.asarray(label_stack, dtype=np.int16))  # padding: 0, background
        probs = torch.from_numpy(one_hot(window, n_classes))
        probs = F.interpolate(probs, size=(self.size, self.size), mode="bilinear", antialias=c > self.size,
                              align_corners=False)
        return probs.numpy().reshape(z, n_classes, self.size, self.size)

    # ------------------------------------------------------------------------------------------ backward
    def to_native(self, prob_stack: np.ndarray) -> np.ndarray:
        """Per-class probabilities (Z, C, size, size) -> (Z, C, orig_h, orig_w) float32 on the original grid.

        Resized bilinearly to the kept square's side, put back in place; every original pixel outside the
        kept square (beyond the field of view, or cut off by ``crop``) is background: probability 1 for
        class 0, 0 for the others."""
        import torch
        import torch.nn.functional as F

        prob_stack = self._check_stack(prob_stack, "prob_stack", 4)
        z, n_classes = prob_stack.shape[:2]
        c = self.crop
        window = torch.from_numpy(np.ascontiguousarray(prob_stack, dtype=np.float32))
        if c != self.size:
            window = F.interpolate(window, size=(c, c), mode="bilinear", antialias=c < self.size,
                                   align_corners=False)
        out = np.zeros((z, n_classes, self.orig_h, self.orig_w), dtype=np.float32)
        out[:, 0] = 1.0
        ny, nx, wy, wx = self._overlap()
        out[:, :, ny, nx] = window.numpy()[:, :, wy, wx]
        return out

    def labels_to_native(self, prob_stack: np.ndarray) -> np.ndarray:
        """``to_native`` then argmax over classes: the label map (Z, orig_h, orig_w) uint8."""
        return self.to_native(prob_stack).argmax(axis=1).astype(np.uint8)


@dataclass(frozen=True)
class PhysicalGeometry:
    """Slices of (orig_h, orig_w) pixels of (spacing_y, spacing_x) mm, resampled to ``target_spacing`` mm.

    The resampled slice has ``resampled_shape`` = round(h * spacing_y / target), round(w * spacing_x / target)
    pixels (image bilinear, antialiased when shrinking; labels nearest). Windows are centred on it: a window of
    (a, b) pixels starts at ((H - a) // 2, (W - b) // 2) of the resampled (H, W) grid, negative where the window
    reaches into zero padding. ``to_model``: the ``size`` x ``size`` training window; ``to_canvas``: the whole
    resampled slice, zero-padded to at least ``size`` in each direction. ``to_native`` takes probabilities on
    either, puts them in place (background where the window did not reach) and resamples them bilinearly to
    the original grid."""

    orig_h: int
    orig_w: int
    spacing_y: float
    spacing_x: float
    target_spacing: float
    size: int = 128

    def __post_init__(self):
        for name in ("orig_h", "orig_w", "size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("spacing_y", "spacing_x", "target_spacing"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value > 0 \
                    or not math.isfinite(value):
                raise ValueError(f"{name}: expected a positive number of mm, got {value!r}")

    # ------------------------------------------------------------------------------------------ numbers
    @property
    def resampled_shape(self) -> tuple[int, int]:
        t = self.target_spacing
        return max(1, round(self.orig_h * self.spacing_y / t)), max(1, round(self.orig_w * self.spacing_x / t))

    @property
    def canvas_shape(self) -> tuple[int, int]:
        """Shape of the inference input: the resampled slice, padded to at least ``size`` each way."""
        h, w = self.resampled_shape
        return max(h, self.size), max(w, self.size)

    def model_spacing(self, spacing_yx=None) -> tuple[float, float]:
        """(y, x) mm per model pixel: the target spacing up to the rounding of the resampled shape."""
        h, w = self.resampled_shape
        return self.orig_h * self.spacing_y / h, self.orig_w * self.spacing_x / w

    def _offset(self, shape) -> tuple[int, int]:
        h, w = self.resampled_shape
        return (h - shape[0]) // 2, (w - shape[1]) // 2

    def _place(self, stack, shape, fill_background: bool = False):
        """(Z, C, H, W) resampled -> (Z, C, *shape): the centred window, zeros outside the slice."""
        import torch

        (oy, ox), (h, w) = self._offset(shape), stack.shape[-2:]
        out = torch.zeros((*stack.shape[:2], *shape), dtype=stack.dtype)
        if fill_background:
            out[:, 0] = 1
        y0, y1, x0, x1 = max(0, oy), min(h, oy + shape[0]), max(0, ox), min(w, ox + shape[1])
        out[:, :, y0 - oy:y1 - oy, x0 - ox:x1 - ox] = stack[:, :, y0:y1, x0:x1]
        return out

    def _resample(self, stack: np.ndarray, labels: bool = False):
        import torch
        import torch.nn.functional as F

        h, w = self.resampled_shape
        x = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
        if labels:
            return F.interpolate(x, size=(h, w), mode="nearest-exact")
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                             antialias=h < self.orig_h or w < self.orig_w)

    def _check_stack(self, stack, name: str) -> np.ndarray:
        stack = np.asarray(stack)
        if stack.ndim != 3 or stack.shape[-2:] != (self.orig_h, self.orig_w):
            raise ValueError(f"{name}: expected shape ('Z', {self.orig_h}, {self.orig_w}), got {stack.shape}")
        return stack

    # ------------------------------------------------------------------------------------------ forward
    def to_model(self, image_stack: np.ndarray, label_stack: np.ndarray | None = None):
        """(Z, h, w) image (and label) -> the (Z, size, size) training window: image float32 in [0, 1], label
        uint8 (nearest neighbour) or None."""
        import torch

        image = self._place(self._resample(self._check_stack(image_stack, "image_stack")), (self.size,) * 2)
        label = None
        if label_stack is not None:
            resampled = self._resample(self._check_stack(label_stack, "label_stack").astype(np.int16), labels=True)
            label = self._place(resampled, (self.size,) * 2)[:, 0].to(torch.uint8).numpy()
        return image[:, 0].clamp(0, 1).numpy(), label

    def to_canvas(self, image_stack: np.ndarray) -> np.ndarray:
        """(Z, h, w) -> (Z, *canvas_shape) float32 in [0, 1]: the whole field at the target spacing."""
        image = self._resample(self._check_stack(image_stack, "image_stack"))
        return self._place(image, self.canvas_shape)[:, 0].clamp(0, 1).numpy()

    def label_probabilities(self, label_stack: np.ndarray, n_classes: int = 4, on_canvas: bool = False) -> np.ndarray:
        """(Z, h, w) labels -> (Z, n_classes, size, size): each class's share of every window pixel (of every
        canvas pixel with ``on_canvas``): what a perfect model at the target spacing would predict."""
        import torch
        import torch.nn.functional as F

        labels = self._check_stack(label_stack, "label_stack")
        h, w = self.resampled_shape
        probs = F.interpolate(torch.from_numpy(one_hot(labels, n_classes)), size=(h, w), mode="bilinear",
                              align_corners=False, antialias=h < self.orig_h or w < self.orig_w)
        return self._place(probs, self.canvas_shape if on_canvas else (self.size,) * 2, fill_background=True).numpy()

    # ------------------------------------------------------------------------------------------ backward
    def to_native(self, prob_stack: np.ndarray) -> np.ndarray:
        """Per-class probabilities (Z, C, a, b) on the training window or the canvas -> (Z, C, orig_h, orig_w):
        put back in place on the resampled grid (background where they did not reach), then resampled."""
        import torch
        import torch.nn.functional as F

        prob_stack = np.asarray(prob_stack)
        shape = tuple(prob_stack.shape[-2:])
        if prob_stack.ndim != 4 or shape not in ((self.size, self.size), self.canvas_shape):
            raise ValueError(f"prob_stack: expected shape ('Z', 'C', {self.size}, {self.size}) or ('Z', 'C', "
                             f"{self.canvas_shape[0]}, {self.canvas_shape[1]}), got {prob_stack.shape}")
        h, w = self.resampled_shape
        window = torch.from_numpy(np.ascontiguousarray(prob_stack, dtype=np.float32))
        oy, ox = self._offset(shape)
        grid = torch.zeros((*window.shape[:2], h, w))
        grid[:, 0] = 1
        y0, y1, x0, x1 = max(0, oy), min(h, oy + shape[0]), max(0, ox), min(w, ox + shape[1])
        grid[:, :, y0:y1, x0:x1] = window[:, :, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
        out = F.interpolate(grid, size=(self.orig_h, self.orig_w), mode="bilinear", align_corners=False,
                            antialias=h > self.orig_h or w > self.orig_w)
        return out.numpy()

    def labels_to_native(self, prob_stack: np.ndarray) -> np.ndarray:
        return self.to_native(prob_stack).argmax(axis=1).astype(np.uint8)


def geometry_for(record: dict, orig_h: int, orig_w: int, spacing=None):
    """The geometry a prepared folder used (``record``: its manifest) for a slice of (orig_h, orig_w) pixels
    of ``spacing`` (z, y, x) mm: physical where the manifest says so and the slice has spacing, pixel
    geometry otherwise (manifests from before physical geometry: pixel)."""
    if record.get("geometry", "pixel") == "physical" and spacing is not None:
        if not isinstance(record.get("target_spacing"), (int, float)):
            raise ValueError(f"the geometry record says physical but has no target_spacing in mm: {record}")
        _, sy, sx = (float(v) for v in spacing)
        return PhysicalGeometry(int(orig_h), int(orig_w), sy, sx, float(record["target_spacing"]),
                                int(record["image_size"]))
    return SliceGeometry.from_manifest(record, orig_h, orig_w)


def canvas_window(canvas: np.ndarray, size: int) -> np.ndarray:
    """The training window (..., size, size) inside an inference canvas (..., H, W) of either geometry: both are
    centred on the resampled slice, so the window is the canvas's central ``size`` x ``size``."""
    h, w = canvas.shape[-2:]
    y, x = (h - size) // 2, (w - size) // 2
    return canvas[..., y:y + size, x:x + size]


def heart_half_extent_mm(label_stack: np.ndarray, spacing_yx) -> float:
    """The largest distance (mm) along y or x from the slice's centre to the far edge of a labelled pixel:
    half the side of the smallest centred square window that holds every labelled pixel (0 without labels)."""
    labels = np.asarray(label_stack)
    ys, xs = np.nonzero(labels.reshape(-1, *labels.shape[-2:]).max(axis=0))
    if ys.size == 0:
        return 0.0
    (h, w), (sy, sx) = labels.shape[-2:], spacing_yx
    cy, cx = h / 2, w / 2  # pixel k covers [k, k + 1)
    return float(max(max(cy - ys.min(), ys.max() + 1 - cy) * sy, max(cx - xs.min(), xs.max() + 1 - cx) * sx))


def one_hot(labels: np.ndarray, n_classes: int = 4) -> np.ndarray:
    """(Z, H, W) integer labels -> (Z, n_classes, H, W) float32 one-hot probabilities."""
    labels = np.asarray(labels)
    return (labels[:, None] == np.arange(n_classes)[None, :, None, None]).astype(np.float32)


# ---------------------------------------------------------------------------------------------- short-axis order
APEX_RAS = np.array([-1.0, 1.0, -1.0]) / math.sqrt(3)  # the heart's long axis, base to apex: left, anterior, inferior
SHORT_AXIS_MIN_COS = 0.7  # above any patient axis (cos 0.577): an oblique stack along the long axis


def runs_base_to_apex(affine) -> bool | None:
    """Whether a stack's slice index grows from the base toward the apex, from its RAS affine (a 4 x 4 whose
    third column is the step to the next slice, as the DICOM reader's ``meta["affine"]``): the slice axis against
    the heart's usual long axis. None without an affine, or when the slice axis lies closer to a patient axis than
    to the long axis (an axial, sagittal or coronal stack: not a short-axis stack whose order can be told)."""
    if affine is None:
        return None
    step = np.asarray(affine, dtype=float)[:3, 2]
    norm = float(np.linalg.norm(step))
    if not norm:
        return None
    cos = float(step @ APEX_RAS) / norm
    return None if abs(cos) < SHORT_AXIS_MIN_COS else cos > 0
