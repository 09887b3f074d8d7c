"""Masked image modelling of the whole FPN (de Mooij et al. 2024; SparK-style masking for a CNN); registers ``mim``.

Every unlabelled slice, cropped at its own pixel size, has a random share of its ``patch_size`` squares set to 0;
the FPN (encoder, decoder and a one-channel output head) reconstructs the slice, and the loss is the mean squared
error on the masked pixels only (the visible ones are a copy task). The encoder and the decoder transfer; fine-tuning
replaces the head. Patches of 16 px at 2.3 mm cover about 37 mm, the size of a ventricle's cross-section: the
network must infer anatomy from its surroundings, not interpolate neighbouring pixels.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..fpn import build_fpn
from .base import SSLModule
from .checks import require_float, require_int
from .registry import Method, register
from .views import make_native_views


def random_patch_mask(batch: int, height: int, width: int, patch_size: int, ratio: float,
                      generator: torch.Generator | None = None, device=None) -> Tensor:
    """(B, 1, H, W) bool, True where masked: in each image exactly ``round(ratio * n)`` of its ``n`` patch squares
    (the grid of ``patch_size`` squares covering H x W; H and W multiples of ``patch_size``)."""
    if height % patch_size or width % patch_size:
        raise ValueError(f"the views ({height} x {width} px) must be a multiple of patch_size ({patch_size})")
    gh, gw = height // patch_size, width // patch_size
    n = gh * gw
    k = int(round(ratio * n))
    scores = torch.rand(batch, n, generator=generator, device=device)
    chosen = scores.argsort(dim=1)[:, :k]
    grid = torch.zeros(batch, n, dtype=torch.bool, device=device).scatter_(1, chosen, True)
    grid = grid.view(batch, 1, gh, gw)
    return grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


class MaskedImageModule(SSLModule):
    """The FPN reconstructs masked patches: loss = MSE on masked pixels; AdamW with a cosine schedule."""

    method_name = "mim"

    def __init__(self, patch_size: int = 16, mask_ratio: float = 0.6, lr: float = 1e-3, weight_decay: float = 1e-4,
                 max_epochs: int | None = None):
        super().__init__()
        require_int("patch_size", patch_size, 2)
        if not 0.0 < require_float("mask_ratio", mask_ratio, 0.0, strict=True) < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}")
        require_float("lr", lr, 0.0, strict=True)
        require_float("weight_decay", weight_decay, 0.0, strict=False)
        if max_epochs is not None:
            require_int("max_epochs", max_epochs, 1)
        self.save_hyperparameters()
        self.network = build_fpn(n_classes=1)
        # no channel dropout before the head (smp's FPN default, kept in fine-tuning): dropping whole feature maps
        # makes a one-channel reconstruction noise (training loss 8x the validation loss with it)
        self.network.decoder.dropout = nn.Identity()

    def compute_loss(self, views: Sequence[Tensor]) -> tuple[Tensor, None]:
        image = views[0]
        b, _, h, w = image.shape
        generator = None
        if not self.training:  # the same masks every validation epoch: a comparable validation loss
            generator = torch.Generator(device=image.device).manual_seed(1234)
        mask = random_patch_mask(b, h, w, self.hparams.patch_size, self.hparams.mask_ratio, generator, image.device)
        reconstruction = self.network(image.masked_fill(mask, 0.0)).float()
        error = F.mse_loss(reconstruction, image.float(), reduction="none")
        return (error * mask).sum() / mask.sum().clamp(min=1), None

    def transfer_state(self) -> dict[str, dict[str, Tensor]]:
        return {"encoder": self.network.encoder.state_dict(), "decoder": self.network.decoder.state_dict()}

    def configure_optimizers(self) -> Any:
        return self.adamw_cosine()


register(Method(
    name="mim", display="Masked image modelling", colour="tab:purple", model=MaskedImageModule,
    views=make_native_views, transfers=("encoder", "decoder"),
    defaults={"lr": 1.0e-3, "patch_size": 16, "mask_ratio": 0.6, "transform_kwargs": {"n_views": 1}},
    summary="the whole FPN reconstructs masked patches of the slice (encoder and decoder)",
))
