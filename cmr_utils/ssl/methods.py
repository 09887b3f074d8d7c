"""The SSL methods as LightningModules, in the style of lightly's examples, and the registry of methods.

- ``SimSiamModule`` and ``SwAVModule``: one LightningModule per method holding the backbone
  (``cmr_utils.encoders.build_backbone``), lightly's heads and loss; a shared loop logs ``train_loss``,
  ``val_loss`` and the collapse monitor;
- ``METHODS`` / ``get_method``: ``{"model": LightningModule class, "transform": view factory}`` by name.

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

import math
from collections.abc import Sequence
from typing import Any

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
from torch import Tensor, nn
from torch.nn import functional as F

from ..distributed import gather_rows, rank_and_world, sum_over_processes
from ..encoders import FEATURE_DIM, build_backbone
from ..training import fused_optimizer
from .checks import require_float, require_int
from .collapse import embedding_std
from .views import make_simsiam_transform, make_swav_transform


def _cosine_or_constant(optimizer: torch.optim.Optimizer, max_epochs: int | None) -> Any:
    if max_epochs is None:
        return optimizer
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class _SSLModule(pl.LightningModule):
    """Shared loop: ``compute_loss(views) -> (loss, projections of view 0)``, logging and guards.

    With several processes (DDP), the logged losses are the means over every process's batches (sums reduced
    once per epoch) and the collapse monitor is computed on the validation embeddings of every process.
    """

    method_name = "ssl"
    embedding_dim: int

    def __init__(self) -> None:
        super().__init__()
        self.backbone = build_backbone()
        self._val_embeddings: list[Tensor] = []
        self._loss_sums: dict[str, Tensor] = {}

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
        self._add_loss("train", loss, batch[0].shape[0])
        return loss

    def _add_loss(self, stage: str, loss: Tensor, n: int) -> None:
        sums = self._loss_sums.setdefault(stage, torch.zeros(2, dtype=torch.float64, device=loss.device))
        sums += torch.stack([loss.detach().double() * n, loss.new_tensor(n).double()])

    def _log_loss(self, stage: str) -> None:
        # reduced in the module's own epoch-end hook, which every process runs (never in a rank-0-only callback)
        total, n = sum_over_processes(self._loss_sums.pop(stage))
        # already global and equal on every process: "max" keeps the value exact where Lightning syncs it
        self.log(f"{stage}_loss", (total / n).float(), sync_dist=self.trainer.world_size > 1, reduce_fx="max")

    def on_train_epoch_end(self) -> None:
        if "train" in self._loss_sums:
            self._log_loss("train")

    def on_validation_epoch_start(self) -> None:
        self._val_embeddings = []

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        loss, projections = self.compute_loss(batch)
        self._check_finite(loss, "validation")
        self._add_loss("val", loss, batch[0].shape[0])
        self._val_embeddings.append(projections.detach().float())
        return loss

    def on_validation_epoch_end(self) -> None:
        if "val" in self._loss_sums:
            self._log_loss("val")
        embeddings = torch.cat(self._val_embeddings) if self._val_embeddings else None
        self._val_embeddings = []
        if embeddings is not None:
            # every process holds as many validation slices (Lightning's DistributedSampler pads the shares)
            embeddings = gather_rows(embeddings).cpu()
        if embeddings is None or embeddings.shape[0] < 2:
            return  # std over fewer than 2 slices is undefined; train_ssl requires >= 2
        std = embedding_std(embeddings)
        sync = dict(sync_dist=self.trainer.world_size > 1, reduce_fx="max")  # equal on every process already
        self.log("embedding_std", std, **sync)
        self.log("embedding_std_ratio", std * math.sqrt(embeddings.shape[1]), **sync)


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
        proj_hidden_dim = require_int("proj_hidden_dim", proj_hidden_dim, 1)
        proj_dim = require_int("proj_dim", proj_dim, 2)
        pred_hidden_dim = require_int("pred_hidden_dim", pred_hidden_dim, 1)
        require_float("lr", lr, 0.0, strict=True)
        require_float("weight_decay", weight_decay, 0.0, strict=False)
        require_float("momentum", momentum, 0.0, strict=False)
        if max_epochs is not None:
            require_int("max_epochs", max_epochs, 1)
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
        params = list(self.parameters())
        optimizer = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                                    **fused_optimizer(params))
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

    With several processes (DDP) the Sinkhorn problem stays the single-device one, over the global batch and
    the whole queue: lightly's distributed variants do it. The queues gather every process's batch before
    enqueuing (``MemoryBankModule(gather_distributed=True)``), so they are the same on every process (and
    DDP's buffer broadcast changes nothing); each process hands its own share of the queue to the Sinkhorn
    step, which sums over processes (``SwaVLoss(sinkhorn_gather_distributed=True)``): every batch item and
    queue entry enters the codes exactly once.
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
        proj_hidden_dim = require_int("proj_hidden_dim", proj_hidden_dim, 1)
        proj_dim = require_int("proj_dim", proj_dim, 2)
        n_prototypes = require_int("n_prototypes", n_prototypes, 2)
        n_steps_frozen_prototypes = require_int("n_steps_frozen_prototypes", n_steps_frozen_prototypes, 0)
        if n_prototypes < proj_dim:
            # fewer prototypes than dimensions leave a null space: projections orthogonal to every prototype
            # score them all alike, and the loss sits at log(n_prototypes) with nothing learned
            raise ValueError(f"n_prototypes ({n_prototypes}) must be at least proj_dim ({proj_dim}); "
                             "the SwAV paper uses 3000 prototypes for 128 dimensions")
        temperature = require_float("temperature", temperature, 0.0, strict=True)
        sinkhorn_epsilon = require_float("sinkhorn_epsilon", sinkhorn_epsilon, 0.0, strict=True)
        sinkhorn_iterations = require_int("sinkhorn_iterations", sinkhorn_iterations, 1)
        queue_length = require_int("queue_length", queue_length, 0)
        require_int("start_queue_at_epoch", start_queue_at_epoch, 0)
        require_float("lr", lr, 0.0, strict=True)
        require_float("weight_decay", weight_decay, 0.0, strict=False)
        if max_epochs is not None:
            require_int("max_epochs", max_epochs, 1)
        self.save_hyperparameters()
        self.embedding_dim = proj_dim
        self.projection_head = SwaVProjectionHead(FEATURE_DIM, proj_hidden_dim, proj_dim)
        self.prototypes = SwaVPrototypes(proj_dim, n_prototypes, n_steps_frozen_prototypes)
        self.criterion = SwaVLoss(
            temperature=temperature, sinkhorn_iterations=sinkhorn_iterations, sinkhorn_epsilon=sinkhorn_epsilon,
            sinkhorn_gather_distributed=True,  # no effect in a single process
        )
        # one queue per global view, rows (queue_length, proj_dim)
        self.queues = nn.ModuleList(
            [MemoryBankModule(size=(queue_length, proj_dim), gather_distributed=True, feature_dim_first=False)
             for _ in range(2)]
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
        """Scores of this process's share of the queued projections (filled before this batch); enqueues the
        batch of every process."""
        rank, world = rank_and_world()
        n_filled = int(self.queue_filled)
        queued = []
        for queue, z in zip(self.queues, global_projections):
            _, bank = queue(z.detach().float(), update=True)  # bank: contents before the update
            queued.append(bank[:n_filled].tensor_split(world)[rank])
        self.queue_filled.fill_(min(self.hparams.queue_length, n_filled + global_projections[0].shape[0] * world))
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
        params = list(self.parameters())
        optimizer = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay, **fused_optimizer(params))
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
