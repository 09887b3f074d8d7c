"""``train_ssl``: seeded pretraining with any registered method, keeping the last epoch or the best ``val_loss``;
``save_pretrained``: its encoder (and decoder) files.

Returns the kept epoch's pretrained parts (the encoder with the keys of smp's ResNet18 encoder, checked by
``cmr_utils.encoders``; the FPN decoder for whole-network methods) with the per-epoch history and, for methods
with an embedding, the collapse verdict.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from ..encoders import save_encoder, validated_encoder_state
from ..files import atomic_write
from ..training import LOG_FOLDER, EpochLine, build_trainer, history_from_csv, quiet_lightning, require_bf16_safe_input
from .checks import require_float, require_int
from .collapse import is_collapsed
from .data import SliceDataset
from .registry import get_method

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "embedding_std", "embedding_std_ratio"]


_RESERVED_TRAINER_KEYS = ("max_epochs", "callbacks", "logger", "default_root_dir")


def _check_slices(name: str, slices: Any) -> None:
    if not isinstance(slices, np.ndarray):
        raise TypeError(f"{name} must be a numpy array (N, H, W), got {type(slices).__name__}")
    if slices.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got {slices.shape}")


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
    keep: str = "best",
    train_positions: np.ndarray | None = None,
    val_positions: np.ndarray | None = None,
) -> dict[str, Any]:
    """Pretrain with ``method`` (a name in ``cmr_utils.ssl.METHODS``) and return the kept epoch's weights.

    ``train_positions`` / ``val_positions``: each slice's relative position in [0, 1) along its volume's short
    axis, for a method whose registry entry says ``positions`` (global + local contrastive).

    ``keep="best"``: early stopping and the kept checkpoint both follow ``val_loss`` (validation views are
    fixed per slice, so the curve is not augmentation noise). ``keep="last"``: every epoch runs and the last
    is kept, as many SSL papers do (on ACDC, SimSiam's lowest validation loss fell on its epoch of narrowest
    embedding, yet its last epoch gave a frozen decoder less: validation Dice 0.575 vs 0.607, one seed; the
    returned ``best_*`` keys then describe the last epoch). ``lr`` feeds the method's own optimiser: SGD for
    SimSiam (about 0.05 * batch / 256), Adam for SwAV (about 1e-3). ``method_kwargs`` go to the module
    (heads, queue...), ``trainer_kwargs`` to the Trainer (``cmr_utils.training.build_trainer``:
    accelerator, devices, precision, limit_*_batches...; default one CPU). The transform's own options are set through
    ``method_kwargs["transform_kwargs"]``.

    Returns {"states" ({"encoder": ..., "decoder": ...} as the method transfers them), "backbone_state" (the
    encoder), "history" (DataFrame: epoch, train_loss, val_loss, embedding_std, embedding_std_ratio; the last two
    empty for a method without an embedding), "epochs_run", "best_val_loss", "best_epoch", "collapsed" (False
    without an embedding), "embedding_dim", "best_checkpoint", "log_dir"}.
    """
    spec = get_method(method)
    if spec.positions and (train_positions is None or val_positions is None):
        raise ValueError(f"{method} needs train_positions and val_positions (each slice's place along the short axis)")
    _check_slices("train_slices", train_slices)
    _check_slices("val_slices", val_slices)
    image_size = require_int("image_size", image_size, 8)
    batch_size = require_int("batch_size", batch_size, 2)  # BatchNorm in the heads needs 2
    max_epochs = require_int("max_epochs", max_epochs, 1)
    patience = require_int("patience", patience, 1)
    lr = require_float("lr", lr, 0.0, strict=True)
    seed = require_int("seed", seed, 0)
    num_workers = require_int("num_workers", num_workers, 0)
    if keep not in ("best", "last"):
        raise ValueError(f"keep: expected 'best' (lowest val_loss) or 'last', got {keep!r}")
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
    # several processes (DDP): ``batch_size`` stays the global batch, each process loads its share of it
    processes = trainer_kwargs.get("devices", 1) * trainer_kwargs.get("num_nodes", 1)
    processes = processes if isinstance(processes, int) else 1
    if batch_size % processes:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {processes} processes "
                         "(trainer.devices x trainer.num_nodes)")
    if len(val_slices) < processes:
        raise ValueError(f"val_slices has {len(val_slices)} slices, fewer than the {processes} processes")
    transform = spec.views(image_size, **transform_kwargs)
    positions = (train_positions, val_positions) if spec.positions else (None, None)
    # the smallest view of one slice (a fixed seed: the global random state is left alone)
    smallest = min(min(view.shape[-2:]) for view in SliceDataset(val_slices, transform, fixed_seed=seed)[0])
    require_bf16_safe_input(
        smallest, trainer_kwargs.get("precision", "32-true"), trainer_kwargs.get("accelerator", "cpu"),
        f"the smallest {method} view (image_size {image_size}"
        + ("; local views: transform_kwargs local_size, by default image_size // 2)" if "local_size" in
           inspect.signature(spec.views).parameters else ")"),
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with quiet_lightning():
        pl.seed_everything(seed, workers=True)
        # the model first after seeding: its initial weights depend on the seed alone
        model = spec.model(lr=lr, max_epochs=max_epochs, **method_kwargs)
        train_loader = torch.utils.data.DataLoader(
            SliceDataset(train_slices, transform, positions=positions[0]),
            batch_size=batch_size // processes,
            shuffle=True,
            drop_last=True,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )
        val_loader = torch.utils.data.DataLoader(
            SliceDataset(val_slices, transform, fixed_seed=seed, positions=positions[1]),
            batch_size=batch_size // processes,
            shuffle=False,
            drop_last=False,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )
        # "best": the lowest val_loss; "last": no monitor, so the one checkpoint kept is always the latest epoch's
        # (save_last would not do: Lightning writes last.ckpt only on epochs that also improve the monitor); inside
        # the log folder, which build_trainer empties first
        checkpoint = pl.callbacks.ModelCheckpoint(
            dirpath=out_dir / LOG_FOLDER / "checkpoints",
            filename=f"{keep}-{{epoch}}",
            monitor="val_loss" if keep == "best" else None,
            mode="min",
            save_top_k=1,
        )
        stopping = [pl.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=patience)] if keep == "best" else []
        progress = EpochLine(method, n_images=len(train_loader) * (batch_size // processes),
                             monitor="embedding_std_ratio" if model.embedding_dim else "val_loss")
        trainer = build_trainer({"accelerator": "cpu", "devices": 1, **trainer_kwargs}, run_dir=out_dir,
                                max_epochs=max_epochs, callbacks=[*stopping, checkpoint, progress],
                                log_every_n_steps=max(1, min(50, len(train_loader))))
        trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader)

    if trainer.interrupted:
        raise RuntimeError(f"{method} pretraining was interrupted; no result")
    best_path = checkpoint.best_model_path
    if not best_path or not Path(best_path).exists():
        raise RuntimeError(f"{method} pretraining saved no checkpoint (was val_loss ever logged?)")
    saved = torch.load(best_path, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["state_dict"])
    states = {part: {k: v.detach().cpu().clone() for k, v in state.items()}
              for part, state in model.transfer_state().items()}
    states["encoder"] = validated_encoder_state(states["encoder"], source=best_path)
    history = history_from_csv(Path(trainer.logger.log_dir) / "metrics.csv").reindex(columns=HISTORY_COLUMNS)
    # an epoch without training scores (one that stopped before its end) is no epoch of the history
    history = history.dropna(subset=["train_loss"]).reset_index(drop=True)
    best_epoch = int(saved["epoch"])
    best_rows = history[history["epoch"] == best_epoch]
    if best_rows.empty:
        raise RuntimeError(f"no validation loss logged for the kept epoch {best_epoch} of {method}")
    collapsed = False
    if model.embedding_dim:
        if not np.isfinite(best_rows["embedding_std"].iloc[0]):
            raise RuntimeError(f"no embedding_std logged for the best epoch {best_epoch} of {method}")
        collapsed = is_collapsed(float(best_rows["embedding_std"].iloc[0]), model.embedding_dim)
    return {
        "states": states,
        "backbone_state": states["encoder"],
        "history": history,
        "epochs_run": len(history),
        # from the history: the fork-based launcher (ddp_notebook) does not hand the checkpoint's score back
        "best_val_loss": float(best_rows["val_loss"].iloc[0]),
        "best_epoch": best_epoch,
        "collapsed": collapsed,
        "embedding_dim": model.embedding_dim,
        "best_checkpoint": str(best_path),
        "log_dir": str(trainer.logger.log_dir),
    }


def save_pretrained(states: dict[str, dict], encoder_path: str | os.PathLike, metadata: dict[str, Any]) -> list[Path]:
    """Write what a method pretrained: the encoder to ``encoder_path`` (with its JSON sidecar, ``save_encoder``)
    and, when there is one, the decoder to ``decoder.pt`` beside it (keys of smp's FPN decoder). Each file is
    written atomically; a stale decoder of an earlier run of an encoder-only method is removed."""
    encoder_path = Path(encoder_path)
    written = [save_encoder(states["encoder"], encoder_path, {**metadata, "parts": sorted(states)})]
    decoder_path = encoder_path.with_name("decoder.pt")
    if "decoder" in states:
        decoder = {k: v.detach().cpu().clone() for k, v in states["decoder"].items()}
        atomic_write(decoder_path, lambda temp: torch.save(decoder, temp))
        written.append(decoder_path)
    else:
        decoder_path.unlink(missing_ok=True)
    return written
