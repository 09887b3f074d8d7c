"""Stage 03 logic: fine-tuning the FPN-ResNet18 on label budgets.

- ``sample_budgets`` draws nested label budgets (150 within 500 within 700 within 1200) from the
  training split only, per seed.
- ``SegmentationModule`` is the LightningModule: Dice loss, Adam, the study's IoU on train and
  validation each epoch (micro-averaged over the three foreground classes, see ``cmr_utils.metrics``).
- ``train_segmentation`` runs one named run (``{init}-{budget}-s{seed}``) and keeps the checkpoint with the
  best validation IoU; the test split is never looked at here.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from .files import atomic_write
from .models import N_CLASSES, build_segmentation_model, set_encoder_frozen
from .training import quiet_lightning, trainer_options


def sample_budgets(n_train: int, budgets: list, seed: int) -> dict[str, np.ndarray]:
    """Nested subsets of training-slice indices: one permutation per seed, each budget its first b slices."""
    if n_train < 1:
        raise ValueError("sample_budgets: the training split is empty")
    order = np.random.default_rng(seed).permutation(n_train)
    out = {}
    for budget in budgets:
        if budget == "all":
            out["all"] = np.arange(n_train)
            continue
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget: expected 'all' or a positive number of slices, got {budget!r}")
        if budget > n_train:
            raise ValueError(f"budget {budget}: larger than the {n_train} slices of the training split")
        out[str(budget)] = np.sort(order[:budget])
    return out


class SliceSegmentationDataset(Dataset):
    """(image (1,H,W) float32, label (H,W) int64) pairs, with joint random flips when ``flips``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray | None = None,
                 flips: bool = False):
        if len(images) != len(labels):
            raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
        self.images, self.labels, self.flips = images, labels, flips
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        k = int(self.indices[i])
        image = torch.from_numpy(np.array(self.images[k], dtype=np.float32))[None]
        label = torch.from_numpy(np.array(self.labels[k], dtype=np.int64))
        if self.flips:
            if torch.rand(()) < 0.5:
                image, label = image.flip(-1), label.flip(-1)
            if torch.rand(()) < 0.5:
                image, label = image.flip(-2), label.flip(-2)
        return image, label


def _lightning():
    import pytorch_lightning as pl

    return pl


class SegmentationModule(_lightning().LightningModule):
    def __init__(self, init: str = "random", encoder_path: str | None = None, lr: float = 1e-4,
                 freeze_encoder: bool = False, channels_last: bool = False):
        super().__init__()
        import segmentation_models_pytorch as smp

        self.save_hyperparameters()
        self.model = build_segmentation_model(init, encoder_path)
        set_encoder_frozen(self.model, freeze_encoder)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.loss = smp.losses.DiceLoss(mode="multiclass", from_logits=True)
        self._stats = {}

    def forward(self, x):
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def on_train_epoch_start(self):
        if self.hparams.freeze_encoder:
            self.model.encoder.eval()  # frozen means frozen: no BatchNorm statistics drift either

    def _step(self, batch, stage):
        import segmentation_models_pytorch as smp

        image, label = batch
        assert image.ndim == 4 and image.shape[1] == 1, image.shape
        logits = self(image)
        loss = self.loss(logits, label)
        tp, fp, fn, _ = smp.metrics.get_stats(logits.argmax(1), label, mode="multiclass", num_classes=N_CLASSES)
        acc = self._stats.setdefault(stage, torch.zeros(3, N_CLASSES, dtype=torch.float64, device=self.device))
        acc += torch.stack([tp.sum(0), fp.sum(0), fn.sum(0)]).to(acc)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, batch_size=len(image), sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def _log_iou(self, stage):
        acc = self._stats.pop(stage, None)
        if acc is None:
            return
        if self.trainer.world_size > 1:
            acc = self.all_gather(acc).sum(0)
        tp, fp, fn = acc[:, 1:].sum(1)  # the study's IoU: pooled over slices and the 3 foreground classes
        denom = tp + fp + fn
        self.log(f"{stage}_iou", (tp / denom if denom > 0 else torch.tensor(float("nan"))).float())

    def on_train_epoch_end(self):
        self._log_iou("train")

    def on_validation_epoch_end(self):
        self._log_iou("val")

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def history_from_csv(metrics_csv: Path) -> pd.DataFrame:
    """Lightning's CSVLogger rows -> one row per epoch."""
    raw = pd.read_csv(metrics_csv)
    return raw.drop(columns=[c for c in ("step",) if c in raw]).groupby("epoch").mean().reset_index()


def train_segmentation(images_train, labels_train, images_val, labels_val, run_dir: str | Path, *,
                       init: str, indices: np.ndarray, seed: int, epochs: int, batch_size: int, lr: float,
                       freeze_encoder: bool, flips: bool, trainer: dict, encoder_path=None) -> dict:
    """Train one run into ``run_dir``; return its summary (also written as ``result.json``).

    Writes ``model.pt`` (the state_dict of the best-validation-IoU epoch), ``history.csv`` (per-epoch
    train/validation loss and IoU); the caller records the run's label budget (``labelled_slices.csv``).
    """
    pl = _lightning()
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(seed, workers=True, verbose=False)
    started = time.time()
    module = SegmentationModule(init, None if encoder_path is None else str(encoder_path), lr, freeze_encoder,
                                trainer.get("channels_last", False))
    workers = trainer.get("num_workers", 0)
    train = DataLoader(SliceSegmentationDataset(images_train, labels_train, indices, flips), batch_size=batch_size,
                       shuffle=True, num_workers=workers, drop_last=len(indices) > batch_size,
                       persistent_workers=workers > 0)
    val = DataLoader(SliceSegmentationDataset(images_val, labels_val), batch_size=max(batch_size, 32),
                     num_workers=workers, persistent_workers=workers > 0)
    for stale in ("log", "checkpoints"):  # a re-run replaces, never appends to, the previous history
        shutil.rmtree(run_dir / stale, ignore_errors=True)
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val_iou",
                                 mode="max", save_weights_only=True, enable_version_counter=False)
    fit = pl.Trainer(max_epochs=epochs, callbacks=[checkpoint], logger=CSVLogger(run_dir, name="", version="log"),
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     deterministic="warn", log_every_n_steps=1, **trainer_options(trainer))
    with quiet_lightning():
        fit.fit(module, train, val)
    if fit.global_rank != 0:
        return {}
    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("model."): v for k, v in best.items() if k.startswith("model.")}
    atomic_write(run_dir / "model.pt", lambda temp: torch.save(state, temp))
    history = history_from_csv(run_dir / "log" / "metrics.csv")
    history.to_csv(run_dir / "history.csv", index=False)
    best_row = history.loc[history["val_iou"].idxmax()]
    return {"status": "ok", "init": init, "seed": seed, "n_labelled": int(len(indices)),
            "frozen_encoder": freeze_encoder, "epochs": epochs, "best_epoch": int(best_row["epoch"]),
            "best_val_iou": float(best_row["val_iou"]), "best_train_iou": float(history["train_iou"].max()),
            "wall_s": round(time.time() - started, 1)}


def load_trained_model(run_dir: str | Path) -> torch.nn.Module:
    """The selected (best-validation) model of a run, in eval mode on the CPU."""
    path = Path(run_dir) / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained model; run stage 03 for this run first")
    model = build_segmentation_model("random")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()
