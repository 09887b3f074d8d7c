"""What both training stages (02 pretraining, 03 fine-tuning) share about running PyTorch Lightning."""
from __future__ import annotations

import contextlib
import logging
import time
import warnings

import torch
from pytorch_lightning.callbacks import Callback

LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")
TRAINER_OPTIONS = ("accelerator", "devices", "precision", "strategy")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (oneDNN's own test: AVX-512 with bf16, or AMX).

    Without it, bf16 autocast is emulated and was measured here 15-20x slower than fp32 (AMD EPYC, AVX2).
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """A profile's ``trainer.precision``; ``auto`` becomes bf16 mixed precision where the device runs it
    natively (a CUDA GPU with bf16, a CPU with AVX-512 bf16 or AMX) and full fp32 elsewhere."""
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


def trainer_options(trainer: dict) -> dict:
    """The Lightning Trainer options of a profile's ``trainer`` section (``precision: auto`` resolved)."""
    options = {k: trainer[k] for k in TRAINER_OPTIONS if k in trainer}
    options["precision"] = resolve_precision(options.get("precision", "auto"), options.get("accelerator", "auto"))
    return options


class EpochLine(Callback):
    """One plain-text line per epoch (run, epoch k/N, losses, validation score, images/s, time left)."""

    def __init__(self, name: str, n_images: int, monitor: str = "val_dice"):
        self.name, self.n_images, self.monitor = name, n_images, monitor
        self._started = self._epoch_started = 0.0

    def on_train_start(self, trainer, module):
        self._started = time.perf_counter()

    def on_train_epoch_start(self, trainer, module):
        self._epoch_started, self._loss_sum, self._batches = time.perf_counter(), 0.0, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._loss_sum += float(loss)
            self._batches += 1

    def on_train_epoch_end(self, trainer, module):
        # runs after the epoch's validation: its metrics are in callback_metrics, the training loss is our own sum
        if not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_") or k == self.monitor}
        m["train_loss"] = self._loss_sum / max(1, self._batches)
        done, total = trainer.current_epoch + 1, trainer.max_epochs
        now = time.perf_counter()
        speed = self.n_images / max(1e-9, now - self._epoch_started)
        left = (now - self._started) / done * (total - done)
        parts = [f"{self.name}: epoch {done}/{total}"]
        parts += [f"{k} {m[k]:.3f}" for k in ("train_loss", "val_loss", self.monitor) if k in m]
        per_structure = [f"{k.rsplit('_', 1)[1]} {m[k]:.2f}" for k in m if k.startswith(self.monitor + "_")]
        if per_structure:
            parts[-1] += f" ({', '.join(per_structure)})"
        parts += [f"{speed:.0f} img/s", f"{left / 60:.1f} min left"]
        print(" · ".join(parts), flush=True)


@contextlib.contextmanager
def quiet_lightning():
    """Lightning's info banners and known harmless warnings are noise in a headless papermill run."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    deterministic = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
            # pytorch_lightning 2.6 calls a torch pytree API that newer torch deprecates
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        # the Trainer switches deterministic algorithms on process-wide; give the caller its own setting back
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
