"""Training progress: one line per epoch on stderr for headless runs, a bar in JupyterLab, and the route from a
Papermill kernel to the terminal of `make report` (cmr_utils.training)."""
import os
import subprocess
import sys

import pytest
import torch

from cmr_utils import training
from cmr_utils.paths import PROJ_ROOT


def test_progress_mode_follows_the_variable_and_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv("CMR_PROGRESS", "plain")
    assert training.progress_mode() == "plain"
    monkeypatch.setenv("CMR_PROGRESS", "Bar")
    assert training.progress_mode() == "bar"
    monkeypatch.delenv("CMR_PROGRESS")
    assert training.progress_mode() == "plain"  # no Jupyter kernel here
    monkeypatch.setenv("CMR_PROGRESS", "tqdm")
    with pytest.raises(ValueError, match="CMR_PROGRESS='tqdm': expected one of plain, bar"):
        training.progress_mode()


def test_epoch_summary_names_run_epoch_losses_score_speed_and_time_left():
    metrics = {"train_loss": 0.91234, "val_loss": 0.8, "val_dice": 0.5, "val_dice_RV": 0.25, "val_dice_MYO": 0.5,
               "val_dice_LV": 0.75}
    line = training.epoch_summary("simsiam-8-s0", 3, 10, metrics, "val_dice", 73.6, 125)
    assert line == ("simsiam-8-s0: epoch 3/10 · train_loss 0.912 · val_loss 0.800 · val_dice 0.500 "
                    "(RV 0.25, MYO 0.50, LV 0.75) · 74 img/s · 2.1 min left")
    assert training.epoch_summary("swav", 1, 1, {"train_loss": 1.0}, "val_loss", 5, 0).endswith("5 img/s · 0 s left")


class Tiny(__import__("pytorch_lightning").LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_training_run_prints_one_line_per_epoch_on_stderr(capfd, monkeypatch, one_thread):
    import pytorch_lightning as pl

    monkeypatch.setenv("CMR_PROGRESS", "plain")
    data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    trainer = pl.Trainer(max_epochs=3, callbacks=[training.EpochLine("tiny-run", 16, monitor="val_loss")],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    with training.quiet_lightning():
        trainer.fit(Tiny(), loader, loader)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("tiny-run:")]
    assert [line.split(" · ")[0] for line in lines] == [f"tiny-run: epoch {k}/3" for k in (1, 2, 3)]
    for line in lines:
        assert line.count("train_loss ") == 1 and line.count("val_loss ") == 1  # the monitor once, too
        assert " img/s · " in line and line.endswith(" left")
    assert lines[-1].endswith("0 s left") and "tiny-run:" not in out  # stderr only: Make's terminal


def test_a_papermill_kernel_reaches_the_terminal_quietly(tmp_path):
    """A line written by progress_line inside a Papermill kernel reaches papermill's own stderr (what Make shows)
    while the notebook runs; the kernel's expected log lines (TCP transport, interrupt at shutdown) do not."""
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from cmr_utils.training import progress_line, progress_mode\n"
        "progress_line(f'run-x: epoch 1/1 ({progress_mode()})')\n"
        "import warnings; warnings.warn('a warning that matters')")])
    nbformat.write(nb, tmp_path / "in.ipynb")
    done = subprocess.run([sys.executable, "-m", "papermill", str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"),
                           "-k", "cmr-ssl", "--log-level", "WARNING", "--no-progress-bar"], cwd=PROJ_ROOT,
                          capture_output=True, text=True, timeout=180, env={**os.environ, "CMR_PROGRESS": "plain"})
    assert done.returncode == 0, done.stderr
    assert "run-x: epoch 1/1 (plain)" in done.stderr.splitlines()
    assert "running over TCP" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    assert "a warning that matters" in (tmp_path / "out.ipynb").read_text()  # the notebook keeps the warning
