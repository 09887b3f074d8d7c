"""SwAV (Caron et al. 2020) on the ResNet18 encoder, with lightly's heads, prototypes and loss; registers
``swav``."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightly.loss import SwaVLoss
from lightly.models.modules.heads import SwaVProjectionHead, SwaVPrototypes
from lightly.models.modules.memory_bank import MemoryBankModule
from torch import Tensor, nn
from torch.nn import functional as F

from ..distributed import rank_and_world
from ..encoders import FEATURE_DIM, build_backbone
from ..training import fused_optimizer
from .base import SSLModule, cosine_or_constant
from .checks import require_float, require_int
from .registry import Method, register
from .views import make_swav_transform


class SwAVModule(SSLModule):
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
        self.backbone = build_backbone()
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
        return cosine_or_constant(optimizer, hp.max_epochs)


register(Method(
    name="swav", display="SwAV", colour="tab:green", model=SwAVModule, views=make_swav_transform,
    defaults={"lr": 1.0e-3, "proj_dim": 32, "n_prototypes": 64, "queue_length": 256, "start_queue_at_epoch": 2,
              "transform_kwargs": {"n_local": 2}},
    summary="views of a slice assigned to the same prototype clusters (encoder only)",
))
