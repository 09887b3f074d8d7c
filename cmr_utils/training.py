"""What both training stages (02 pretraining, 03 fine-tuning) share about running PyTorch Lightning."""
from __future__ import annotations

import contextlib
import logging
import warnings

import torch

LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")
TRAINER_OPTIONS = ("accelerator", "devices", "precision", "strategy")


def trainer_options(trainer: dict) -> dict:
    """The Lightning Trainer options of a profile's ``trainer`` section (passed through unchanged)."""
    return {k: trainer[k] for k in TRAINER_OPTIONS if k in trainer}


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
