"""cmr_utils.training: the one Trainer builder of both training stages and the one reader of their histories."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cmr_utils import training
from cmr_utils.distributed import OneThreadWhenForked

# Lightning's CSVLogger layout: a row per logging site and step, an epoch's validation row before its training row
METRICS_CSV = """epoch,step,train_iou,train_loss,val_dice,val_loss
0,3,,,0.5,0.9
0,3,0.2,1.0,,
1,7,0.3,0.8,,
2,11,,,0.7,0.6
2,11,0.4,0.7,,
"""


def test_history_merges_each_epochs_training_and_validation_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(METRICS_CSV)
    history = training.history_from_csv(path)
    assert list(history.columns) == ["epoch", "train_iou", "train_loss", "val_dice", "val_loss"]  # no step
    assert history["epoch"].tolist() == [0, 1, 2] and history["epoch"].dtype == np.int64
    assert history["train_loss"].tolist() == [1.0, 0.8, 0.7] and history["train_iou"].tolist() == [0.2, 0.3, 0.4]
    np.testing.assert_array_equal(history["val_dice"], [0.5, np.nan, 0.7])  # epoch 1 was not validated
    np.testing.assert_array_equal(history["val_loss"], [0.9, np.nan, 0.6])


def test_history_refuses_what_is_not_one_value_per_epoch(tmp_path):
    per_step = tmp_path / "per_step.csv"
    per_step.write_text(METRICS_CSV + "2,12,,0.5,,\n")  # a second train_loss in epoch 2
    with pytest.raises(ValueError, match=r"per_step.csv: train_loss has 2 values in epoch 2; expected one per epoch"):
        training.history_from_csv(per_step)
    no_epoch = tmp_path / "no_epoch.csv"
    no_epoch.write_text("step,train_loss\n0,1.0\n")
    with pytest.raises(ValueError, match=r"no_epoch.csv: expected an 'epoch' on every row"):
        training.history_from_csv(no_epoch)
    with pytest.raises(FileNotFoundError, match=r"missing.csv: training wrote no metrics"):
        training.history_from_csv(tmp_path / "missing.csv")


def _tiny_module():
    import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        """Logs ``train_score`` = epoch at each training epoch's end and ``val_score`` = 10 + epoch at each validation's."""

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            pass

        def on_train_epoch_end(self):
            self.log("train_score", float(self.current_epoch))

        def on_validation_epoch_end(self):
            self.log("val_score", 10.0 + self.current_epoch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Tiny()


def test_a_built_trainer_logs_a_history_that_a_rerun_replaces(tmp_path, one_thread):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "stale.txt").write_text("from an earlier run")
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        for _ in range(2):  # the second run's history is its own, not appended to the first's
            trainer = training.build_trainer({"accelerator": "cpu", "devices": 1}, run_dir=tmp_path, max_epochs=4,
                                             callbacks=[], check_val_every_n_epoch=2, log_every_n_steps=1)
            with training.quiet_lightning():
                trainer.fit(_tiny_module(), loader, loader)
            history = training.history_from_csv(tmp_path / "log" / "metrics.csv")
            assert history["epoch"].tolist() == [0, 1, 2, 3]
            assert history["train_score"].tolist() == [0.0, 1.0, 2.0, 3.0]
            np.testing.assert_array_equal(history["val_score"], [np.nan, 11.0, np.nan, 13.0])
        assert not (tmp_path / "log" / "stale.txt").exists()
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def test_the_builder_is_deterministic_unless_told_and_options_win_over_the_stages_settings(tmp_path):
    assert training.deterministic_setting(True, "cpu") is True  # strict: every CPU operation has a kernel
    assert training.deterministic_setting(True, "gpu") == training.deterministic_setting(True, "cuda") == "warn"
    assert training.deterministic_setting(False, "cpu") is False and training.deterministic_setting(False, "gpu") is False
    assert training.deterministic_setting(True, "auto") == ("warn" if torch.cuda.is_available() else True)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        for options, enabled in (({}, True), ({"deterministic": False}, False)):
            torch.use_deterministic_algorithms(not enabled)  # the opposite first: building the Trainer sets it
            trainer = training.build_trainer({"accelerator": "cpu", "devices": 1, **options}, run_dir=tmp_path,
                                             max_epochs=1, callbacks=[])
            assert torch.are_deterministic_algorithms_enabled() is enabled
        trainer = training.build_trainer({"accelerator": "cpu", "devices": 1, "log_every_n_steps": 5},
                                         run_dir=tmp_path, max_epochs=3, callbacks=[], log_every_n_steps=50)
        assert trainer.log_every_n_steps == 5 and trainer.max_epochs == 3 and trainer.num_sanity_val_steps == 0
        assert trainer.logger.log_dir == str(tmp_path / "log")
        assert not any(isinstance(c, OneThreadWhenForked) for c in trainer.callbacks)
        forked = training.build_trainer({"accelerator": "cpu", "devices": 2, "strategy": "ddp_fork"},
                                        run_dir=tmp_path, max_epochs=1, callbacks=[])
        assert sum(isinstance(c, OneThreadWhenForked) for c in forked.callbacks) == 1
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
