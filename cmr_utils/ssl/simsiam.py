"""SimSiam (Chen & He 2021) on the ResNet18 encoder, with lightly's heads and loss; registers ``simsiam``."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules.heads import SimSiamPredictionHead, SimSiamProjectionHead
from torch import Tensor

from ..encoders import FEATURE_DIM, build_backbone
from ..training import fused_optimizer
from .base import SSLModule, cosine_or_constant
from .checks import require_float, require_int
from .registry import Method, register
from .views import make_simsiam_transform


class SimSiamModule(SSLModule):
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
        self.backbone = build_backbone()
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
        return cosine_or_constant(optimizer, hp.max_epochs)


register(Method(
    name="simsiam", display="SimSiam", colour="tab:blue", model=SimSiamModule, views=make_simsiam_transform,
    defaults={"lr": 0.05, "proj_dim": 128, "pred_hidden_dim": 64},
    summary="two augmented views of a slice predict each other (encoder only)",
))
