"""What every pretraining method shares: the LightningModule loop (``SSLModule``), its logging and guards.

A method module (``simsiam``, ``swav``, ``mim``, ``glcl``) subclasses ``SSLModule``, builds its networks, and
defines ``compute_loss(batch) -> (loss, embedding or None)`` and, where it pretrains more than the encoder,
``transfer_state()``. The loop logs ``train_loss`` and ``val_loss`` (means over every process's batches) and,
for methods with an embedding (``embedding_dim`` set), the collapse monitor.

Collapse monitor: once per validation epoch, ``embedding_std`` (the std over all validation slices of the
l2-normalised projection of the first view, averaged over its dimensions) and ``embedding_std_ratio`` =
``embedding_std * sqrt(d)``. A healthy embedding spreads over the sphere, ratio about 1; a collapsed one gives
the same vector for every input, ratio about 0. Validation runs in eval mode, so the heads' BatchNorm uses running
statistics: an untrained network already reads low, because random ReLU features all point the same way. Judge
collapse on a run of real length. Reconstruction methods (masked image modelling) have no embedding to collapse.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from ..distributed import gather_rows, sum_over_processes
from ..training import fused_optimizer
from .collapse import embedding_std


def cosine_or_constant(optimizer: torch.optim.Optimizer, max_epochs: int | None) -> Any:
    if max_epochs is None:
        return optimizer
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class SSLModule(pl.LightningModule):
    """Shared loop: ``compute_loss(views) -> (loss, projections of view 0)``, logging and guards.

    With several processes (DDP), the logged losses are the means over every process's batches (sums reduced
    once per epoch) and the collapse monitor is computed on the validation embeddings of every process.
    """

    method_name = "ssl"
    embedding_dim: int | None = None  # None: no embedding, no collapse monitor
    # a stage-wise method's stages in training order; setting ``stage`` to one of them runs that stage whatever the
    # epoch (after ``on_train_epoch_start``): how a benchmark times each stage alone
    stages: tuple[str, ...] = ()
    stage: str | None = None

    def __init__(self) -> None:
        super().__init__()
        self._val_embeddings: list[Tensor] = []
        self._loss_sums: dict[str, Tensor] = {}

    def compute_loss(self, views: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError  # each method defines its own

    def transfer_state(self) -> dict[str, dict[str, Tensor]]:
        """The pretrained parts, as the FPN names them: ``{"encoder": state}`` (smp's ResNet18 encoder keys) and,
        for a method that pretrains it, ``"decoder"`` (the keys of smp's FPN decoder)."""
        return {"encoder": self.backbone.state_dict()}

    def adamw_cosine(self) -> Any:
        """AdamW over every parameter (``lr``, ``weight_decay`` from the hyper-parameters) with a per-epoch cosine
        schedule over ``max_epochs``: the optimiser of the whole-network methods."""
        hp = self.hparams
        params = list(self.parameters())
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, **fused_optimizer(params))
        return cosine_or_constant(optimizer, hp.max_epochs)

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
        if projections is not None:
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


