"""The pretraining dataset: a stack of slices (N, H, W) (a numpy memmap is fine) -> list of views (and, for a method
that needs it, the slice's relative position along the short axis)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .checks import require_int


class SliceDataset(torch.utils.data.Dataset):
    """A stack of slices (N, H, W) float in [0, 1] -> per item, the list of views of ``transform``.

    The array is kept as given (a ``np.load(..., mmap_mode="r")`` memmap stays on disk); only the
    requested slice is read and copied. With ``fixed_seed`` set, item ``i`` always gets the same views
    (seeded with ``fixed_seed + i``, without touching the global RNG): a stable validation loss.
    """

    def __init__(
        self,
        slices: np.ndarray,
        transform: Callable[[Tensor], list[Tensor]],
        *,
        fixed_seed: int | None = None,
        positions: np.ndarray | None = None,
    ):
        if not isinstance(slices, np.ndarray):
            raise TypeError(f"slices must be a numpy array (N, H, W), got {type(slices).__name__}")
        if slices.ndim != 3:
            raise ValueError(f"slices must have shape (N, H, W), got {slices.shape}")
        if not np.issubdtype(slices.dtype, np.floating):
            raise TypeError(f"slices must be float in [0, 1], got dtype {slices.dtype}")
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        if fixed_seed is not None:
            fixed_seed = require_int("fixed_seed", fixed_seed, 0)
        if positions is not None:
            positions = np.asarray(positions, dtype=np.float32)
            if positions.shape != (len(slices),) or not ((positions >= 0) & (positions < 1)).all():
                raise ValueError(f"positions must be one relative position in [0, 1) per slice ({len(slices)}), "
                                 f"got shape {positions.shape}")
        self.slices = slices
        self.transform = transform
        self.fixed_seed = fixed_seed
        self.positions = positions

    def __len__(self) -> int:
        return int(self.slices.shape[0])

    def __getitem__(self, index: int) -> list[Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        image = np.array(self.slices[index], dtype=np.float32, copy=True)
        if not np.isfinite(image).all() or image.min() < 0.0 or image.max() > 1.0:
            raise ValueError(f"slice {index} has values outside [0, 1] (or non-finite)")
        tensor = torch.from_numpy(image)[None]
        if self.fixed_seed is None:
            views = list(self.transform(tensor))
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.fixed_seed + int(index) % len(self))
                views = list(self.transform(tensor))
        if self.positions is not None:
            views.append(torch.tensor(self.positions[index]))
        return views
