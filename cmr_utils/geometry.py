"""The one rule between a slice's original pixel grid and the model's square grid, used both ways.

Forward (stage 01, ``SliceGeometry.to_model``): make the slice square (``pad``: zeros around it up to
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

from dataclasses import dataclass

import numpy as np

MODES = ("pad", "crop")


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

    def label_probabilities(self, label_stack: np.ndarray, n_classes: int = 4) -> np.ndarray:
        """(Z, h, w) labels -> (Z, n_classes, size, size) float32: each class's share of every model pixel
        (one-hot, background outside the slice, area-averaged like the image). What a perfect model at the
        model grid's resolution would predict; ``to_native`` of it recovers the labels up to sub-pixel edges,
        whereas the hard (nearest-neighbour) labels of ``to_model`` lose about a model pixel's detail."""
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


def one_hot(labels: np.ndarray, n_classes: int = 4) -> np.ndarray:
    """(Z, H, W) integer labels -> (Z, n_classes, H, W) float32 one-hot probabilities."""
    labels = np.asarray(labels)
    return (labels[:, None] == np.arange(n_classes)[None, :, None, None]).astype(np.float32)
