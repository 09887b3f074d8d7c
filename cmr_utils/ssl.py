"""SimSiam and SwAV pretraining of the ResNet18 backbone on 2D cardiac MRI slices.

What is here, in reading order:

- grayscale augmentations on tensors ``(1, H, W)`` in [0, 1] and the two methods' view transforms
  (``make_simsiam_transform``: two views; ``make_swav_transform``: lightly's multi-crop);
- ``SliceDataset``: a stack of slices ``(N, H, W)`` (a numpy memmap is fine) -> list of views;
- the collapse monitor ``embedding_std`` / ``is_collapsed`` (SimSiam paper, section 4.1);
- ``SimSiamModule`` and ``SwAVModule``: one LightningModule per method holding the backbone
  (``cmr_utils.models.build_backbone``), lightly's heads and loss, in the style of lightly's examples;
- ``METHODS`` / ``get_method`` and ``train_ssl``: seeded training with early stopping on ``val_loss``;
- ``save_encoder`` / ``load_encoder_state``: the pretrained backbone as a plain, validated state_dict whose
  keys are those of smp's ResNet18 encoder.

Collapse monitor: both modules log, once per validation epoch, ``embedding_std`` (the std over all
validation slices of the l2-normalised PROJECTION-HEAD output of the first view, averaged over its
dimensions) and ``embedding_std_ratio`` = ``embedding_std * sqrt(d)``, with ``d = proj_dim``. A healthy
embedding spreads over the sphere, ratio about 1; a collapsed one gives the same vector for every
input, ratio about 0. Validation runs in eval mode, so the heads' BatchNorm uses running statistics:
an untrained or barely trained network (random init, a few steps) already reads low, because random
ReLU features all point the same way. Judge collapse on a run of real length: the ratio should rise
as training spreads the embedding, and fall towards 0 if the run collapses.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightly.loss import NegativeCosineSimilarity, SwaVLoss
from lightly.models.modules.heads import (
    SimSiamPredictionHead,
    SimSiamProjectionHead,
    SwaVProjectionHead,
    SwaVPrototypes,
)
from lightly.models.modules.memory_bank import MemoryBankModule
from lightly.transforms.multi_crop_transform import MultiCropTranform
from lightly.transforms.multi_view_transform import MultiViewTransform
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.transforms import v2

from cmr_utils.files import atomic_write
from cmr_utils.training import EpochLine, quiet_lightning
from cmr_utils.models import FEATURE_DIM, build_backbone

ENCODER_PREFIX = "backbone."  # how the backbone's keys appear inside a LightningModule checkpoint
COLLAPSE_THRESHOLD = 0.1  # embedding_std_ratio below this: collapsed (healthy is about 1)
HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "embedding_std", "embedding_std_ratio"]


# --------------------------------------------------------------------------------------------------
# input checks


def _require_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _require_float(name: str, value: Any, minimum: float, *, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    too_small = value <= minimum if strict else value < minimum
    if not math.isfinite(value) or too_small:
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {relation} {minimum}, got {value}")
    return value


def _require_range(name: str, value: Any, low: float, high: float) -> tuple[float, float]:
    """A (lo, hi) pair with low <= lo <= hi <= high."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a (low, high) pair, got {value!r}")
    lo, hi = (float(v) for v in value)
    if not (low <= lo <= hi <= high):
        raise ValueError(f"{name} must satisfy {low} <= low <= high <= {high}, got {value!r}")
    return lo, hi


# --------------------------------------------------------------------------------------------------
# augmentations (tensors (1, H, W) float in [0, 1]; pure-Python torchvision ops only)


_OVERSHOOT = 0.05


class _CheckSlice:
    """First step of every augmentation: rejects anything but a float (1, H, W) tensor in [0, 1]."""

    def __call__(self, image: Tensor) -> Tensor:
        if not isinstance(image, Tensor):
            raise TypeError(f"image must be a torch.Tensor (1, H, W), got {type(image).__name__}")
        if not image.is_floating_point():
            raise TypeError(f"image must be a float tensor in [0, 1], got dtype {image.dtype}")
        if image.ndim != 3 or image.shape[0] != 1:
            raise ValueError(f"image must have shape (1, H, W) (one channel), got {tuple(image.shape)}")
        low, high = float(image.min()), float(image.max())
        # a resized crop placed before this step (SwAV's multi-crop) may overshoot [0, 1] by interpolation
        if low < -_OVERSHOOT or high > 1.0 + _OVERSHOOT:
            raise ValueError(f"image values must lie in [0, 1], got [{low:.4g}, {high:.4g}]")
        return image.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RandomGamma(nn.Module):
    """x -> x ** gamma, gamma log-uniform in ``gamma_range`` (MRI intensity non-linearity)."""

    def __init__(self, gamma_range: tuple[float, float] = (0.7, 1.5)):
        super().__init__()
        lo, hi = _require_range("gamma_range", gamma_range, 1e-3, 1e3)
        self.log_range = (math.log(lo), math.log(hi))

    def forward(self, image: Tensor) -> Tensor:
        # torch's RNG (not Python's) so that seeding and fixed-seed validation views cover it
        log_gamma = torch.empty(1).uniform_(*self.log_range).item()
        return image.clamp(0.0, 1.0).pow(math.exp(log_gamma))


class _ClampUnit:
    """Last step: interpolation and blur can step a hair outside [0, 1]."""

    def __call__(self, image: Tensor) -> Tensor:
        return image.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _blur_kernel_size(image_size: int) -> int:
    # about 10% of the image, odd, at least 3 (lightly's rule for GaussianBlur)
    size = max(3, int(0.1 * image_size))
    return size if size % 2 == 1 else size + 1


def make_grayscale_augmentation(
    image_size: int | None,
    *,
    crop_scale: tuple[float, float] = (0.4, 1.0),
    rotation_degrees: float = 15.0,
    brightness: float = 0.4,
    contrast: float = 0.4,
    jitter_prob: float = 0.8,
    gamma_range: tuple[float, float] = (0.7, 1.5),
    gamma_prob: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    blur_prob: float = 0.5,
    blur_kernel_size: int | None = None,
) -> v2.Compose:
    """Augmentation of one grayscale MRI slice tensor (1, H, W) in [0, 1] -> (1, size, size) in [0, 1].

    ``image_size=None`` leaves out the random resized crop (multi-crop adds its own) and then
    ``blur_kernel_size`` is required. No hue/saturation jitter, no ImageNet normalisation: one channel.
    The default crop keeps at least 40% of the slice, milder than lightly's 20%, because the heart is a
    small central part of a cardiac MRI field of view.
    """
    if image_size is not None:
        image_size = _require_int("image_size", image_size, 8)
    crop_scale = _require_range("crop_scale", crop_scale, 1e-3, 1.0)
    rotation_degrees = _require_float("rotation_degrees", rotation_degrees, 0.0, strict=False)
    brightness = _require_float("brightness", brightness, 0.0, strict=False)
    contrast = _require_float("contrast", contrast, 0.0, strict=False)
    blur_sigma = _require_range("blur_sigma", blur_sigma, 1e-3, 100.0)
    for name, prob in (("jitter_prob", jitter_prob), ("gamma_prob", gamma_prob), ("blur_prob", blur_prob)):
        if not 0.0 <= _require_float(name, prob, 0.0, strict=False) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {prob}")
    if blur_kernel_size is None:
        if image_size is None:
            raise ValueError("blur_kernel_size is required when image_size is None (no crop)")
        blur_kernel_size = _blur_kernel_size(image_size)
    blur_kernel_size = _require_int("blur_kernel_size", blur_kernel_size, 1)
    if blur_kernel_size % 2 == 0:
        raise ValueError(f"blur_kernel_size must be odd, got {blur_kernel_size}")

    steps: list[Callable[[Tensor], Tensor]] = [_CheckSlice()]
    if image_size is not None:
        steps.append(v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True))
    steps += [
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomVerticalFlip(p=0.5),
        v2.RandomRotation(rotation_degrees, interpolation=v2.InterpolationMode.BILINEAR, fill=0.0),
        v2.RandomApply([v2.ColorJitter(brightness=brightness, contrast=contrast)], p=jitter_prob),
        v2.RandomApply([RandomGamma(gamma_range)], p=gamma_prob),
        v2.RandomApply([v2.GaussianBlur(blur_kernel_size, sigma=blur_sigma)], p=blur_prob),
        _ClampUnit(),
    ]
    return v2.Compose(steps)


def make_simsiam_transform(image_size: int, **augmentation_kwargs: Any) -> MultiViewTransform:
    """SimSiam views: slice (1, H, W) -> [view0, view1], each (1, image_size, image_size)."""
    augmentation = make_grayscale_augmentation(image_size, **augmentation_kwargs)
    return MultiViewTransform([augmentation, augmentation])


def make_swav_transform(
    image_size: int,
    *,
    n_local: int = 6,
    local_size: int | None = None,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.1, 0.4),
    **augmentation_kwargs: Any,
) -> MultiCropTranform:
    """SwAV multi-crop views: slice -> 2 global views (image_size) then ``n_local`` local views.

    Built on lightly's ``MultiCropTranform``: each view is a random resized crop followed by the
    grayscale augmentation without its own crop. ``local_size`` defaults to ``image_size // 2``.
    """
    image_size = _require_int("image_size", image_size, 8)
    n_local = _require_int("n_local", n_local, 0)
    local_size = image_size // 2 if local_size is None else local_size
    local_size = _require_int("local_size", local_size, 4)
    global_scale = _require_range("global_scale", global_scale, 1e-3, 1.0)
    local_scale = _require_range("local_scale", local_scale, 1e-3, 1.0)
    if "crop_scale" in augmentation_kwargs:
        raise ValueError("crop_scale does not apply to SwAV: use global_scale and local_scale")
    augmentation_kwargs.setdefault("blur_kernel_size", _blur_kernel_size(image_size))
    augmentation = make_grayscale_augmentation(None, **augmentation_kwargs)
    return MultiCropTranform(
        crop_sizes=(image_size, local_size),
        crop_counts=(2, n_local),
        crop_min_scales=(global_scale[0], local_scale[0]),
        crop_max_scales=(global_scale[1], local_scale[1]),
        transforms=augmentation,
    )


# --------------------------------------------------------------------------------------------------
# dataset


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
            fixed_seed = _require_int("fixed_seed", fixed_seed, 0)
        self.slices = slices
        self.transform = transform
        self.fixed_seed = fixed_seed

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
            return self.transform(tensor)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.fixed_seed + int(index) % len(self))
            return self.transform(tensor)


# --------------------------------------------------------------------------------------------------
# collapse monitor


def embedding_std(z: Tensor) -> float:
    """Std over the batch of the l2-normalised embeddings z (N, d), averaged over the d dimensions.

    About 1/sqrt(d) for embeddings spread over the sphere, 0 when every input maps to one vector.
    """
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor (N, d), got {type(z).__name__}")
    if z.ndim != 2 or z.shape[0] < 2 or z.shape[1] < 1:
        raise ValueError(f"z must have shape (N, d) with N >= 2, got {tuple(z.shape)}")
    normalised = F.normalize(z.detach().float(), dim=1)
    return float(normalised.std(dim=0).mean())


def is_collapsed(std: float, dim: int, threshold: float = COLLAPSE_THRESHOLD) -> bool:
    """Collapsed when std * sqrt(dim) < threshold (healthy: about 1)."""
    std = _require_float("std", std, 0.0, strict=False)
    dim = _require_int("dim", dim, 1)
    threshold = _require_float("threshold", threshold, 0.0, strict=True)
    return std * math.sqrt(dim) < threshold


# --------------------------------------------------------------------------------------------------
# Lightning modules


def _cosine_or_constant(optimizer: torch.optim.Optimizer, max_epochs: int | None) -> Any:
    if max_epochs is None:
        return optimizer
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class _SSLModule(pl.LightningModule):
    """Shared loop: ``compute_loss(views) -> (loss, projections of view 0)``, logging and guards."""

    method_name = "ssl"
    embedding_dim: int

    def __init__(self) -> None:
        super().__init__()
        self.backbone = build_backbone()
        self._val_embeddings: list[Tensor] = []

    def compute_loss(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # each method defines its own

    def _check_finite(self, loss: Tensor, stage: str) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"{self.method_name} {stage} loss is {loss.detach().item()} at epoch {self.current_epoch}, "
                f"step {self.global_step}: training diverged; lower lr (now {self.hparams.lr}) "
                "or check the input slices"
            )

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        loss, _ = self.compute_loss(batch)
        self._check_finite(loss, "training")
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=batch[0].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_embeddings = []

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        loss, projections = self.compute_loss(batch)
        self._check_finite(loss, "validation")
        self.log("val_loss", loss, on_step=False, on_epoch=True, batch_size=batch[0].shape[0])
        self._val_embeddings.append(projections.detach().float().cpu())
        return loss

    def on_validation_epoch_end(self) -> None:
        embeddings = torch.cat(self._val_embeddings) if self._val_embeddings else None
        self._val_embeddings = []
        if embeddings is None or embeddings.shape[0] < 2:
            return  # std over fewer than 2 slices is undefined; train_ssl requires >= 2
        std = embedding_std(embeddings)
        self.log("embedding_std", std)
        self.log("embedding_std_ratio", std * math.sqrt(embeddings.shape[1]))


class SimSiamModule(_SSLModule):
    """SimSiam (Chen & He 2021): backbone -> projection z -> prediction p; loss -(cos(p0, z1) + cos(p1, z0)) / 2
    with stop-gradient on z. Heads sized as lightly's ResNet18 example; SGD with momentum 0.9 and an
    optional per-epoch cosine schedule over ``max_epochs``. lightly's rule for lr: 0.05 * batch / 256.
    """

    method_name = "simsiam"

    def __init__(
        self,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        pred_hidden_dim: int = 64,
        lr: float = 0.06,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        max_epochs: int | None = None,
    ):
        super().__init__()
        proj_hidden_dim = _require_int("proj_hidden_dim", proj_hidden_dim, 1)
        proj_dim = _require_int("proj_dim", proj_dim, 2)
        pred_hidden_dim = _require_int("pred_hidden_dim", pred_hidden_dim, 1)
        _require_float("lr", lr, 0.0, strict=True)
        _require_float("weight_decay", weight_decay, 0.0, strict=False)
        _require_float("momentum", momentum, 0.0, strict=False)
        if max_epochs is not None:
            _require_int("max_epochs", max_epochs, 1)
        self.save_hyperparameters()
        self.embedding_dim = proj_dim
        self.projection_head = SimSiamProjectionHead(FEATURE_DIM, proj_hidden_dim, proj_dim)
        self.prediction_head = SimSiamPredictionHead(proj_dim, pred_hidden_dim, proj_dim)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image batch -> (projection z, prediction p)."""
        z = self.projection_head(self.backbone(x).flatten(start_dim=1))
        return z, self.prediction_head(z)

    def compute_loss(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        if len(views) != 2:
            raise ValueError(f"SimSiam needs 2 views per slice, got {len(views)}")
        z0, p0 = self(views[0])
        z1, p1 = self(views[1])
        # stop-gradient on the projections: the one thing that keeps SimSiam from collapsing
        loss = 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))
        return loss, z0.detach()

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return _cosine_or_constant(optimizer, hp.max_epochs)


class SwAVModule(_SSLModule):
    """SwAV (Caron et al. 2020): l2-normalised projections scored against unit-norm prototypes; the
    Sinkhorn codes of each global view are predicted from every other view (lightly's SwaVLoss).

    As in lightly's swav example: prototypes re-normalised before every step, Adam optimiser, and an
    optional queue of past global-view projections (``queue_length`` > 0) that enlarges the Sinkhorn
    problem when batches are small (the SwAV paper uses 3840 for batches under 256). Unlike lightly's
    example the queue is never padded with random vectors: only filled entries are used, from epoch
    ``start_queue_at_epoch`` on. The queue is a training device: validation loss is computed without it.
    ``n_steps_frozen_prototypes`` counts optimiser steps (``global_step``).
    """

    method_name = "swav"

    def __init__(
        self,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        n_prototypes: int = 512,
        n_steps_frozen_prototypes: int = 0,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        queue_length: int = 0,
        start_queue_at_epoch: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        max_epochs: int | None = None,
    ):
        super().__init__()
        proj_hidden_dim = _require_int("proj_hidden_dim", proj_hidden_dim, 1)
        proj_dim = _require_int("proj_dim", proj_dim, 2)
        n_prototypes = _require_int("n_prototypes", n_prototypes, 2)
        n_steps_frozen_prototypes = _require_int("n_steps_frozen_prototypes", n_steps_frozen_prototypes, 0)
        if n_prototypes < proj_dim:
            # fewer prototypes than dimensions leave a null space: projections orthogonal to every prototype
            # score them all alike, and the loss sits at log(n_prototypes) with nothing learned
            raise ValueError(f"n_prototypes ({n_prototypes}) must be at least proj_dim ({proj_dim}); "
                             "the SwAV paper uses 3000 prototypes for 128 dimensions")
        temperature = _require_float("temperature", temperature, 0.0, strict=True)
        sinkhorn_epsilon = _require_float("sinkhorn_epsilon", sinkhorn_epsilon, 0.0, strict=True)
        sinkhorn_iterations = _require_int("sinkhorn_iterations", sinkhorn_iterations, 1)
        queue_length = _require_int("queue_length", queue_length, 0)
        _require_int("start_queue_at_epoch", start_queue_at_epoch, 0)
        _require_float("lr", lr, 0.0, strict=True)
        _require_float("weight_decay", weight_decay, 0.0, strict=False)
        if max_epochs is not None:
            _require_int("max_epochs", max_epochs, 1)
        self.save_hyperparameters()
        self.embedding_dim = proj_dim
        self.projection_head = SwaVProjectionHead(FEATURE_DIM, proj_hidden_dim, proj_dim)
        self.prototypes = SwaVPrototypes(proj_dim, n_prototypes, n_steps_frozen_prototypes)
        self.criterion = SwaVLoss(
            temperature=temperature, sinkhorn_iterations=sinkhorn_iterations, sinkhorn_epsilon=sinkhorn_epsilon
        )
        # one queue per global view, rows (queue_length, proj_dim)
        self.queues = nn.ModuleList(
            [MemoryBankModule(size=(queue_length, proj_dim), feature_dim_first=False) for _ in range(2)]
            if queue_length > 0
            else []
        )
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Image batch -> l2-normalised projection (B, proj_dim)."""
        z = self.projection_head(self.backbone(x).flatten(start_dim=1))
        return F.normalize(z, dim=1, p=2)

    @torch.no_grad()
    def _queue_prototypes(self, global_projections: list[Tensor]) -> list[Tensor] | None:
        """Scores of the queued projections (filled before this batch); enqueues this batch's."""
        n_filled = int(self.queue_filled)
        queued = []
        for queue, z in zip(self.queues, global_projections):
            _, bank = queue(z.detach().float(), update=True)  # bank: contents before the update
            queued.append(bank[:n_filled])
        self.queue_filled.fill_(min(self.hparams.queue_length, n_filled + global_projections[0].shape[0]))
        if n_filled == 0 or self.current_epoch < self.hparams.start_queue_at_epoch:
            return None
        return [self.prototypes(q, self.global_step).float() for q in queued]

    def compute_loss(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        if len(views) < 2:
            raise ValueError(f"SwAV needs 2 global views (then local ones) per slice, got {len(views)} views")
        self.prototypes.normalize()
        global_z = [self(x) for x in views[:2]]
        local_z = [self(x) for x in views[2:]]
        step = self.global_step
        # the loss in float32: Sinkhorn exponentiates scores / epsilon
        global_scores = [self.prototypes(z, step).float() for z in global_z]
        local_scores = [self.prototypes(z, step).float() for z in local_z]
        queue_scores = None
        if self.training and len(self.queues) > 0:
            queue_scores = self._queue_prototypes(global_z)
        loss = self.criterion(global_scores, local_scores, queue_scores).squeeze()
        return loss, global_z[0].detach()

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return _cosine_or_constant(optimizer, hp.max_epochs)


METHODS: dict[str, dict[str, Any]] = {
    "simsiam": {"model": SimSiamModule, "transform": make_simsiam_transform},
    "swav": {"model": SwAVModule, "transform": make_swav_transform},
}


def get_method(name: str) -> dict[str, Any]:
    """{"model": LightningModule class, "transform": factory(image_size, **kw)} of a method name."""
    if name not in METHODS:
        raise ValueError(f"unknown SSL method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# --------------------------------------------------------------------------------------------------
# training


_RESERVED_TRAINER_KEYS = ("max_epochs", "callbacks", "logger", "default_root_dir")


def _check_slices(name: str, slices: Any) -> None:
    if not isinstance(slices, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (N, H, W), got {type(slices).__name__}")
    if slices.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got {slices.shape}")


def _history_from_csv(metrics_csv: Path) -> Any:
    import pandas as pd

    if not metrics_csv.exists():
        raise RuntimeError(f"training wrote no metrics: {metrics_csv} is missing")
    raw = pd.read_csv(metrics_csv)
    # train and validation metrics sit on separate rows of the same epoch: one row per epoch
    history = raw.groupby("epoch", as_index=False).first()
    history = history.reindex(columns=HISTORY_COLUMNS)
    history["epoch"] = history["epoch"].astype(int)
    return history.dropna(subset=["train_loss"]).reset_index(drop=True)


def train_ssl(
    method: str,
    train_slices: np.ndarray,
    val_slices: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    image_size: int,
    batch_size: int,
    max_epochs: int,
    patience: int,
    lr: float,
    seed: int,
    num_workers: int = 0,
    trainer_kwargs: dict[str, Any] | None = None,
    method_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pretrain the backbone with ``method`` ("simsiam" or "swav") and return the best epoch's weights.

    Early stopping and the kept checkpoint both follow ``val_loss`` (validation views are fixed per
    slice, so the curve is not augmentation noise). ``lr`` feeds the method's own optimiser: SGD for
    SimSiam (about 0.05 * batch / 256), Adam for SwAV (about 1e-3). ``method_kwargs`` go to the module
    (heads, queue...), ``trainer_kwargs`` to ``pl.Trainer`` (accelerator, devices, precision,
    limit_*_batches...; default CPU). The transform's own options are set through
    ``method_kwargs["transform_kwargs"]``.

    Returns {"backbone_state", "history" (DataFrame: epoch, train_loss, val_loss, embedding_std,
    embedding_std_ratio), "epochs_run", "best_val_loss", "best_epoch", "collapsed", "embedding_dim",
    "best_checkpoint", "log_dir"}.
    """
    spec = get_method(method)
    _check_slices("train_slices", train_slices)
    _check_slices("val_slices", val_slices)
    image_size = _require_int("image_size", image_size, 8)
    batch_size = _require_int("batch_size", batch_size, 2)  # BatchNorm in the heads needs 2
    max_epochs = _require_int("max_epochs", max_epochs, 1)
    patience = _require_int("patience", patience, 1)
    lr = _require_float("lr", lr, 0.0, strict=True)
    seed = _require_int("seed", seed, 0)
    num_workers = _require_int("num_workers", num_workers, 0)
    if len(train_slices) < batch_size:
        raise ValueError(
            f"training pool has {len(train_slices)} slices, fewer than batch_size={batch_size}: "
            "no full batch to train on (training drops the last incomplete batch)"
        )
    if len(val_slices) == 0:
        raise ValueError("val_slices is empty: early stopping and checkpointing need a validation pool")
    if len(val_slices) < 2:
        raise ValueError(f"val_slices has {len(val_slices)} slice; the embedding std needs at least 2")
    method_kwargs = dict(method_kwargs or {})
    trainer_kwargs = dict(trainer_kwargs or {})
    for key in ("lr", "max_epochs"):
        if key in method_kwargs:
            raise ValueError(f"method_kwargs must not set {key!r}: it is train_ssl's own argument")
    for key in _RESERVED_TRAINER_KEYS:
        if key in trainer_kwargs:
            raise ValueError(f"trainer_kwargs must not set {key!r}: train_ssl sets it")
    transform_kwargs = method_kwargs.pop("transform_kwargs", {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with quiet_lightning():
        pl.seed_everything(seed, workers=True)
        # the model first after seeding: its initial weights depend on the seed alone
        model = spec["model"](lr=lr, max_epochs=max_epochs, **method_kwargs)
        transform = spec["transform"](image_size, **transform_kwargs)
        train_loader = torch.utils.data.DataLoader(
            SliceDataset(train_slices, transform),
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )
        val_loader = torch.utils.data.DataLoader(
            SliceDataset(val_slices, transform, fixed_seed=seed),
            batch_size=batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
        # a fixed log folder, emptied first: a re-run replaces its history instead of adding version_N
        shutil.rmtree(out_dir / "log", ignore_errors=True)
        logger = pl.loggers.CSVLogger(save_dir=str(out_dir), name="", version="log")
        checkpoint = pl.callbacks.ModelCheckpoint(
            dirpath=Path(logger.log_dir) / "checkpoints",
            filename="best-{epoch}",
            monitor="val_loss",
            mode="min",
            save_top_k=1,
        )
        early_stopping = pl.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=patience)
        accelerator = trainer_kwargs.get("accelerator", "cpu")
        options: dict[str, Any] = {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            # CUDA has ops without a deterministic kernel (e.g. adaptive pooling backward): warn there
            "deterministic": True if accelerator == "cpu" else "warn",
            "num_sanity_val_steps": 0,
            "log_every_n_steps": max(1, min(50, len(train_loader))),
        }
        options.update(trainer_kwargs)
        trainer = pl.Trainer(
            max_epochs=max_epochs,
            callbacks=[early_stopping, checkpoint,
                       EpochLine(method, n_images=len(train_loader) * batch_size, monitor="embedding_std_ratio")],
            logger=logger,
            default_root_dir=str(out_dir),
            **options,
        )
        trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader)

    if trainer.interrupted:
        raise RuntimeError(f"{method} pretraining was interrupted; no result")
    best_path = checkpoint.best_model_path
    if not best_path or not Path(best_path).exists():
        raise RuntimeError(f"{method} pretraining saved no checkpoint (was val_loss ever logged?)")
    saved = torch.load(best_path, map_location="cpu", weights_only=True)
    backbone_state = {
        key[len(ENCODER_PREFIX):]: value
        for key, value in saved["state_dict"].items()
        if key.startswith(ENCODER_PREFIX)
    }
    backbone_state = _validated_encoder_state(backbone_state, source=best_path)
    history = _history_from_csv(Path(logger.log_dir) / "metrics.csv")
    best_epoch = int(saved["epoch"])
    best_rows = history[history["epoch"] == best_epoch]
    if best_rows.empty or not np.isfinite(best_rows["embedding_std"].iloc[0]):
        raise RuntimeError(f"no embedding_std logged for the best epoch {best_epoch} of {method}")
    best_std = float(best_rows["embedding_std"].iloc[0])
    return {
        "backbone_state": backbone_state,
        "history": history,
        "epochs_run": len(history),
        "best_val_loss": float(checkpoint.best_model_score),
        "best_epoch": best_epoch,
        "collapsed": is_collapsed(best_std, model.embedding_dim),
        "embedding_dim": model.embedding_dim,
        "best_checkpoint": str(best_path),
        "log_dir": str(logger.log_dir),
    }


# --------------------------------------------------------------------------------------------------
# encoder files


@functools.lru_cache(maxsize=1)
def _expected_encoder_shapes() -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in build_backbone().state_dict().items()}


def _first(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _validated_encoder_state(state: Any, *, source: str | os.PathLike) -> dict[str, Tensor]:
    """The state with keys and shapes of build_backbone(); drops a stray classifier ("fc.*")."""
    if not isinstance(state, dict):
        hint = " (a Lightning checkpoint? use train_ssl's backbone_state)" if hasattr(state, "keys") else ""
        raise ValueError(f"{source}: expected a state_dict (dict of tensors), got {type(state).__name__}{hint}")
    if "state_dict" in state and not isinstance(state["state_dict"], Tensor):
        raise ValueError(f"{source}: this is a full training checkpoint, not an encoder state_dict")
    expected = _expected_encoder_shapes()
    # a classifier is not part of an encoder: leave it behind
    state = {key: value for key, value in state.items() if not str(key).startswith("fc.")}
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise ValueError(f"{source}: entries that are not tensors: {_first(not_tensors)}")
    missing = [key for key in expected if key not in state]
    unexpected = [str(key) for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} != {expected[key]}"
        for key in expected
        if key in state and tuple(state[key].shape) != expected[key]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_first(mismatched)}")
    if problems:
        raise ValueError(f"{source} is not a 1-channel ResNet18 encoder state: " + "; ".join(problems))
    return {key: state[key] for key in expected}


def save_encoder(state_dict: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Write the backbone state_dict to ``path`` and ``path.with_suffix(".json")`` (metadata, library
    versions, number of keys), each atomically. Returns ``path``."""
    import lightly

    path = Path(path)
    sidecar = path.with_suffix(".json")
    if sidecar == path:
        raise ValueError(f"path must not end in .json (the metadata sidecar is {sidecar.name}), got {path}")
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    reserved = {"versions", "n_keys"} & set(metadata)
    if reserved:
        raise ValueError(f"metadata must not set {sorted(reserved)}: save_encoder writes them")
    state = _validated_encoder_state(state_dict, source="state_dict")
    state = {key: value.detach().cpu().clone() for key, value in state.items()}
    sidecar_content = {
        **metadata,
        "versions": {"torch": torch.__version__, "lightly": lightly.__version__, "pytorch_lightning": pl.__version__},
        "n_keys": len(state),
    }
    try:
        sidecar_text = json.dumps(sidecar_content, indent=2, sort_keys=True)
    except TypeError as error:
        raise TypeError(f"metadata must be JSON-serialisable: {error}") from error
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temp: torch.save(state, temp))
    atomic_write(sidecar, lambda temp: temp.write_text(sidecar_text + "\n"))
    return path


def load_encoder_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a saved encoder state_dict (weights only, on CPU) and check it against build_backbone()."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several kinds for a damaged file
        raise ValueError(f"{path} is not a readable torch state_dict ({type(error).__name__}: {error})") from error
    return _validated_encoder_state(state, source=path)
