"""Global and local contrastive learning (Chaitanya et al., NeurIPS 2020), the medical-imaging-specific method;
registers ``glcl``.

Stage 1 (the first ``global_epochs`` epochs) trains the encoder with the domain-specific global loss: every
volume is cut into ``partitions`` equal parts along its short axis, and slices from the same part of *any*
volume are positives (with the slice's own second view), every other slice a negative (their strategy G_D; a
supervised-contrastive loss over the batch with the part as the label). Stage 2 (the remaining epochs) freezes
the encoder and trains the FPN decoder with the local loss: the two views share their geometry, so the decoder's
feature map is pooled into a ``regions`` x ``regions`` grid and each region of one view must match the same
region of the other view against the other regions of the same image. Each view enters the network turned by its own
random symmetry of the square (quarter turns and flips), undone on the feature map before regions are matched: with
the same pose in both views the decoder solved the local loss from position alone (loss 0.004 within an epoch).
Encoder and decoder transfer.
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


def partition_of(position: Tensor, partitions: int) -> Tensor:
    """Relative positions in [0, 1) along the short axis -> part index 0 .. partitions - 1."""
    return (position.float() * partitions).floor().clamp(0, partitions - 1).long()


def _float32(function):
    """Run a loss in float32 whatever the autocast around it: similarities / temperature need more than bf16's 8 bits."""
    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return function(*args, **kwargs)
    wrapped.__doc__, wrapped.__name__ = function.__doc__, function.__name__
    return wrapped


@_float32
def global_contrastive_loss(z: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Chaitanya et al.'s global loss with domain-specific positives, of embeddings ``z`` (N, d) and their part
    labels (N,): every pair (a, p) of the same part (a slice's other view, or a slice of the same part of another
    volume) is scored as -log exp(s_ap) / (exp(s_ap) + sum over a's negatives, the slices of *other* parts); the mean
    over pairs. Positives never compete with each other, so slices of one part gather without being forced onto one
    point."""
    z = F.normalize(z.float(), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    same = labels[:, None] == labels[None, :]
    positives = same & ~self_mask
    # log of the sum over each anchor's negatives (other parts); -inf where an anchor has none
    negatives = torch.logsumexp(logits.masked_fill(same, float("-inf")), dim=1, keepdim=True)
    pair = logits - torch.logaddexp(logits, negatives.expand_as(logits))  # log exp(s_ap) / (exp(s_ap) + negatives)
    return -pair[positives].mean()


@_float32
def local_contrastive_loss(f0: Tensor, f1: Tensor, regions: int, temperature: float) -> Tensor:
    """Local loss on two feature maps (B, C, h, w) of views with the same geometry: region r of one view against
    the same region of the other (positive) and every other region of both views of that image (negatives)."""
    a = F.adaptive_avg_pool2d(f0.float(), regions).flatten(2).transpose(1, 2)  # (B, R, C)
    b = F.adaptive_avg_pool2d(f1.float(), regions).flatten(2).transpose(1, 2)
    z = F.normalize(torch.cat([a, b], dim=1), dim=2)  # (B, 2R, C)
    n = a.shape[1]
    logits = z @ z.transpose(1, 2) / temperature
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits.reshape(-1, 2 * n), target.repeat(len(z)))


def dihedral(x: Tensor, k: Tensor, inverse: bool = False) -> Tensor:
    """Each image of ``x`` (B, C, H, W) turned by one of the square's 8 symmetries ``k`` (B,) in 0..7: ``k % 4``
    quarter turns, then a left-right flip when ``k >= 4``; ``inverse=True`` undoes it (H = W)."""
    out = []
    for image, t in zip(x, k.tolist()):
        if inverse:
            image = image.flip(-1) if t >= 4 else image
            out.append(torch.rot90(image, -(t % 4), dims=(-2, -1)))
        else:
            image = torch.rot90(image, t % 4, dims=(-2, -1))
            out.append(image.flip(-1) if t >= 4 else image)
    return torch.stack(out)


def _mlp(channels: int, hidden: int, out: int, conv: bool) -> nn.Module:
    """Projection head: layer, BatchNorm, ReLU, layer (SimCLR's; without the BatchNorm the global stage collapsed
    within five steps at lr 1e-3)."""
    layer = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
    norm = nn.BatchNorm2d if conv else nn.BatchNorm1d
    return nn.Sequential(layer(channels, hidden), norm(hidden), nn.ReLU(inplace=True), layer(hidden, out))


class GlobalLocalContrastiveModule(SSLModule):
    """Stage-wise: the global loss on the encoder, then the local loss on the decoder with the encoder frozen."""

    method_name = "glcl"

    def __init__(self, global_epochs: int = 30, partitions: int = 4, regions: int = 4, temperature: float = 0.1,
                 proj_dim: int = 128, local_dim: int = 64, lr: float = 1e-3, weight_decay: float = 1e-4,
                 max_epochs: int | None = None):
        super().__init__()
        require_int("global_epochs", global_epochs, 1)
        require_int("partitions", partitions, 2)
        require_int("regions", regions, 2)
        require_float("temperature", temperature, 0.0, strict=True)
        require_int("proj_dim", proj_dim, 2)
        require_int("local_dim", local_dim, 2)
        require_float("lr", lr, 0.0, strict=True)
        require_float("weight_decay", weight_decay, 0.0, strict=False)
        if max_epochs is not None:
            require_int("max_epochs", max_epochs, 1)
            if global_epochs >= max_epochs:
                raise ValueError(f"global_epochs ({global_epochs}) must be below max_epochs ({max_epochs}): the "
                                 "local stage needs epochs of its own")
        self.save_hyperparameters()
        network = build_fpn(n_classes=1)
        self.encoder, self.decoder = network.encoder, network.decoder
        self.decoder.dropout = nn.Identity()  # whole feature maps dropped would be dropped from the local loss too
        self.global_head = _mlp(self.encoder.out_channels[-1], 512, proj_dim, conv=False)
        self.local_head = _mlp(self.decoder.out_channels if hasattr(self.decoder, "out_channels") else 128, 128,
                               local_dim, conv=True)
        self.embedding_dim = proj_dim

    stages = ("global", "local")

    @property
    def local_stage(self) -> bool:
        if self.stage is not None:
            if self.stage not in self.stages:
                raise ValueError(f"glcl stage {self.stage!r}: expected one of {self.stages}")
            return self.stage == "local"
        return self.current_epoch >= self.hparams.global_epochs

    def on_train_epoch_start(self) -> None:
        local = self.local_stage
        for p in self.encoder.parameters():
            p.requires_grad_(not local)
        if local:
            self.encoder.eval()  # frozen means frozen: BatchNorm statistics too

    def compute_loss(self, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        if len(batch) != 3:
            raise ValueError(f"glcl needs 2 views and the slice position per item, got {len(batch)} entries")
        return self.local_loss(batch) if self.local_stage else self.global_loss(batch)

    def _posed(self, v0: Tensor, v1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Both views, each turned by its own random pose (fixed poses for validation), and the poses (2, B)."""
        generator = None if self.training else torch.Generator().manual_seed(4321)
        poses = torch.randint(0, 8, (2, len(v0)), generator=generator)
        return dihedral(v0, poses[0]), dihedral(v1, poses[1]), poses

    def global_loss(self, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Stage 1: the domain-specific global loss on the encoder's pooled features."""
        v0, v1, position = batch
        v0, v1, _ = self._posed(v0, v1)
        z = self.global_head(torch.cat([self.encoder(v0)[-1], self.encoder(v1)[-1]]).mean(dim=(2, 3)))
        labels = partition_of(position, self.hparams.partitions).repeat(2)
        return global_contrastive_loss(z, labels, self.hparams.temperature), z[: len(v0)].detach()

    def local_loss(self, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Stage 2: the local loss on the decoder's feature maps, the encoder run without gradients."""
        v0, v1, _ = batch
        v0, v1, poses = self._posed(v0, v1)
        with torch.no_grad():
            features = [self.encoder(v) for v in (v0, v1)]
        f0, f1 = (dihedral(self.local_head(self.decoder(f)), pose, inverse=True)
                  for f, pose in zip(features, poses))
        z = self.global_head(features[0][-1].mean(dim=(2, 3)))
        return local_contrastive_loss(f0, f1, self.hparams.regions, self.hparams.temperature), z.detach()

    def transfer_state(self) -> dict[str, dict[str, Tensor]]:
        return {"encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict()}

    def configure_optimizers(self) -> Any:
        return self.adamw_cosine()


def check_settings(settings: dict) -> None:
    """A profile's glcl settings: the global stage ends before the last epoch, and the last epoch is kept (the loss
    changes meaning at ``global_epochs``, so the lowest one could be a global-stage epoch with an untrained decoder)."""
    if settings["global_epochs"] >= settings["max_epochs"]:
        raise ValueError(f"global_epochs ({settings['global_epochs']}) must be below max_epochs "
                         f"({settings['max_epochs']}): the local stage needs epochs of its own")
    if settings["keep"] != "last":
        raise ValueError(f"keep: expected 'last' (a stage-wise loss has no comparable best epoch), got "
                         f"{settings['keep']!r}")


register(Method(
    name="glcl", display="Global + local contrastive", colour="tab:red", model=GlobalLocalContrastiveModule,
    views=make_native_views, transfers=("encoder", "decoder"), positions=True,
    # stage-wise: the loss changes meaning at global_epochs, so the last epoch is kept, never the lowest loss;
    # 30 + 30 epochs: 3 labelled patients +0.086 over random on validation (5 + 5: +0.025; 15 + 15: +0.060)
    defaults={"lr": 1.0e-3, "keep": "last", "max_epochs": 60, "global_epochs": 30, "transform_kwargs": {"n_views": 2}},
    summary="slices from the same part of the short axis of any volume attract (encoder), then matching regions "
            "of two views attract on the decoder's feature map (Chaitanya et al. 2020)",
    check=check_settings,
))
