"""What both training stages (02 pretraining, 03 fine-tuning) share about running PyTorch Lightning."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from pytorch_lightning.callbacks import Callback

from .distributed import OneThreadWhenForked

LIGHTNING_LOGGERS = ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")
TRAINER_OPTIONS = ("accelerator", "devices", "num_nodes", "precision", "strategy")
# Lightning's fork-based launcher: the only multi-process strategy that works from a Jupyter kernel
FORK_STRATEGIES = ("ddp_notebook", "ddp_fork")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (oneDNN's own test: AVX-512 with bf16, or AMX).

    Without it, bf16 autocast is emulated and was measured here 15-20x slower than fp32 (AMD EPYC, AVX2).
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, accelerator: str = "auto", fork_safe: bool = False) -> str:
    """A profile's ``trainer.precision``; ``auto`` becomes bf16 mixed precision where the device runs it
    natively (a CUDA GPU with bf16, a CPU with AVX-512 bf16 or AMX) and full fp32 elsewhere.

    ``fork_safe``: the processes will be forked from this one (``ddp_notebook``), where CUDA must not have been
    initialised; asking the GPU's capability initialises it, so a fresh interpreter is asked instead.
    """
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():  # NVML-based: safe before a fork
        return "bf16-mixed" if _cuda_bf16_native(fork_safe) else "16-mixed"
    return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


def inference_device(accelerator: str = "auto") -> str:
    """Where stages 04 and 05 and ``make predict`` run the trained models: ``"cuda"`` where the profile's
    ``trainer.accelerator`` allows a CUDA GPU (auto, gpu, cuda) and one is there, else ``"cpu"``. Seg-Grad-CAM's
    numbers at 224 px (hundreds of slices x 20 deletion steps per run) take hours on a CPU and seconds on a GPU."""
    return "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"


def predicts_in_bf16(trained_precision, device="cpu") -> bool:
    """Whether a model that trained in ``trained_precision`` (its run's recorded ``precision``) predicts under bf16
    autocast on ``device``: it trained in bf16 mixed precision and the device computes bf16 natively (emulated bf16
    is many times slower than fp32). Measured on an avx512_bf16 CPU, stage 04 on ACDC at 128 px: about 1.5x faster
    inference, validation Dice of random-all-s0 0.8601 against 0.8602 in fp32."""
    if not str(trained_precision).startswith("bf16"):
        return False  # also a run recorded before precision was (NaN)
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_fast_bf16()


# ResNet18 halves a map five times; its last stage (layer4) sees ceil(size / 16) pixels a side
BF16_CPU_MIN_INPUT = 17


def require_bf16_safe_input(size: int, precision: str, accelerator: str, what: str) -> None:
    """Refuse a ResNet18 training input of ``size`` px under ``BF16_CPU_MIN_INPUT`` in bf16 on a CPU.

    With PyTorch 2.13's CPU backend (oneDNN), the bf16 weight gradient of a stride-2 3x3 convolution whose input
    is 1 x 1 is wrong: values up to 1e37 where fp32 gives about 1, on most batches (measured on an AVX-512 bf16
    CPU, one and two threads). ResNet18's stride-2 convolutions get a 1 x 1 input from every image of 16 px or
    less; SwAV at 32 px (local views of 16 px) then trains to NaN within a dozen steps. fp32 computes it right.
    """
    bf16 = str(precision).startswith("bf16")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if bf16 and on_cpu and size < BF16_CPU_MIN_INPUT:
        raise ValueError(
            f"{what} is {size} px: below {BF16_CPU_MIN_INPUT} px, ResNet18's stride-2 convolutions see 1 x 1 maps, "
            f"whose bf16 weight gradients PyTorch computes wrong on the CPU (training turns to NaN); use inputs of "
            f"at least {BF16_CPU_MIN_INPUT} px, or trainer.precision 32-true"
        )


def _cuda_bf16_native(fork_safe: bool) -> bool:
    """Whether GPU 0 computes in bf16 natively (compute capability 8.0 or later; emulated bf16 does not count)."""
    if not fork_safe or torch.cuda.is_initialized():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    import subprocess
    import sys

    code = "import torch; print(int(torch.cuda.is_bf16_supported(including_emulation=False)))"
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return answer.stdout.strip() == "1"


def trainer_options(trainer: dict) -> dict:
    """The Lightning Trainer options of a profile's ``trainer`` section, resolved and checked.

    - ``precision: auto`` resolved (``resolve_precision``).
    - Several processes (``devices`` x ``num_nodes`` > 1): ``strategy: auto`` becomes ``ddp_notebook`` on one
      machine (Lightning forks the processes from the notebook's kernel) and ``ddp`` under torchrun or SLURM
      (the launcher started every process, each running the notebook); a strategy that cannot work where this
      runs is an error naming ``trainer.strategy``; under a launcher, its nodes and processes per node must be
      the profile's ``num_nodes`` and ``devices``.
    - ``sync_batchnorm`` on GPUs with several processes: BatchNorm statistics over the global batch, as on the
      single device of the study (torch's SyncBatchNorm runs on GPUs only; CPU processes keep their own).
    - ``deterministic`` (default true): PyTorch's deterministic algorithms; on a GPU an operation that has none only
      warns (``"warn"``). False allows the non-deterministic ones (cuDNN's faster convolution kernels). On a CPU it
      costs nothing measurable (FPN-ResNet18 at 128 px: 41 against 44 img/s, within noise); on an H200 at 224 px
      (batch 128, bf16, channels-last) it cut fine-tuning from 2142 to 694 img/s.
    """
    from .distributed import external_geometry, launched_externally

    options = {k: trainer[k] for k in TRAINER_OPTIONS if k in trainer}
    devices, nodes = options.get("devices", 1), options.get("num_nodes", 1)
    strategy = options.get("strategy", "auto")
    launcher = launched_externally()
    started = external_geometry(launcher) if launcher else None
    if started == (1, 1):
        launcher = None  # a single process (e.g. `make report` inside an sbatch job): nothing to coordinate
    # devices "auto": Lightning's choice, which in a notebook kernel is one device (it says so when there are more)
    processes = devices * nodes if isinstance(devices, int) else 1
    if launcher is not None:
        if started != (nodes, devices):
            raise ValueError(f"trainer.num_nodes {nodes} and trainer.devices {devices!r}: {launcher} started "
                             f"{started[0]} node(s) with {started[1]} process(es) each; the profile and the "
                             f"launch command must agree (one process per device)")
        if strategy in FORK_STRATEGIES:
            raise ValueError(f"trainer.strategy {strategy!r}: {launcher} already started every process; "
                             f"use 'ddp' or 'auto'")
        if strategy == "auto":
            options["strategy"] = "ddp"
    elif processes > 1:
        if nodes > 1:
            raise ValueError(f"trainer.num_nodes {nodes}: several nodes need a launcher that starts the processes "
                             f"on every node (srun or torchrun; see tools/slurm/); none was detected")
        if strategy == "ddp":
            raise ValueError("trainer.strategy 'ddp': Lightning would start the other processes by re-running "
                             "the script, which a notebook kernel cannot do; use 'ddp_notebook' or 'auto' on one "
                             "machine, or start the processes with torchrun or srun")
        if strategy == "auto":
            options["strategy"] = "ddp_notebook"
    accelerator = options.get("accelerator", "auto")
    options["precision"] = resolve_precision(options.get("precision", "auto"), accelerator,
                                             fork_safe=options.get("strategy") in FORK_STRATEGIES)
    options["sync_batchnorm"] = bool(_on_gpu(accelerator) and (launcher is not None or processes > 1))
    deterministic = trainer.get("deterministic", True)
    if not isinstance(deterministic, bool):
        raise ValueError(f"trainer.deterministic: expected true or false, got {deterministic!r}")
    options["deterministic"] = deterministic_setting(deterministic, accelerator)
    return options


def _on_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def deterministic_setting(enabled: bool, accelerator: str = "auto"):
    """Lightning's ``deterministic`` for a profile's ``trainer.deterministic``: ``True`` (strict) where the training
    runs on the CPU, ``"warn"`` on a GPU (CUDA has operations without a deterministic kernel, e.g. adaptive pooling
    backward: a warning there, not an error), ``False`` when disabled."""
    return ("warn" if _on_gpu(accelerator) else True) if enabled else False


LOG_FOLDER = "log"  # a run's Lightning log: <run folder>/log/metrics.csv (and pretraining's checkpoints/)


def build_trainer(options: dict, *, run_dir, max_epochs: int, callbacks: list, **settings):
    """The one Lightning Trainer of both training stages (02 pretraining, 03 fine-tuning).

    ``options``: Lightning options (``trainer_options`` of a profile's ``trainer`` section, or a caller's own); they
    win over the stage's ``settings`` (e.g. ``check_val_every_n_epoch``), which win over what both stages share: no
    progress bar (``EpochLine`` reports), no model summary, no sanity validation, and, unless ``options`` say,
    deterministic algorithms as ``trainer.deterministic: true`` sets them (``deterministic_setting``). Metrics go to
    ``<run_dir>/log/metrics.csv`` (``history_from_csv`` reads it), the folder emptied first: a re-run replaces its
    history. Processes forked from this one (``ddp_notebook``) each compute on one thread (``OneThreadWhenForked``).
    """
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import CSVLogger

    run_dir = Path(run_dir)
    options = dict(options)
    options.setdefault("deterministic", deterministic_setting(True, options.get("accelerator", "auto")))
    shutil.rmtree(run_dir / LOG_FOLDER, ignore_errors=True)
    forked = [OneThreadWhenForked()] if options.get("strategy") in FORK_STRATEGIES else []
    shared = {"enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
    return pl.Trainer(max_epochs=max_epochs, callbacks=[*callbacks, *forked], default_root_dir=str(run_dir),
                      logger=CSVLogger(run_dir, name="", version=LOG_FOLDER), **{**shared, **settings, **options})


def history_from_csv(metrics_csv):
    """One row per epoch (``epoch`` first, as int) from a Lightning CSVLogger ``metrics.csv``, ``step`` dropped.

    Lightning writes one row per logging call site and step: an epoch's training and validation scores sit on
    separate rows (an epoch that is not validated has its training row only). Each column takes the one value
    logged in its epoch, empty where none was. Two values of one column in one epoch (a metric logged per step)
    are an error: no single number of the epoch stands for them (a mean of steps is not the epoch's score).
    """
    import pandas as pd

    path = Path(metrics_csv)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: training wrote no metrics (Lightning's CSVLogger file is missing)")
    raw = pd.read_csv(path)
    if "epoch" not in raw or raw["epoch"].isna().any():
        raise ValueError(f"{path}: expected an 'epoch' on every row (Lightning's CSVLogger metrics)")
    raw = raw.drop(columns=["step"], errors="ignore")
    values = raw.groupby("epoch").count()  # non-empty entries per epoch and column
    repeated = [(epoch, column) for column in values for epoch in values.index[values[column] > 1]]
    if repeated:
        epoch, column = repeated[0]
        raise ValueError(f"{path}: {column} has {values.loc[epoch, column]} values in epoch {int(epoch)}; expected one "
                         f"per epoch (metrics logged at the epoch's end, not per step)")
    history = raw.groupby("epoch", as_index=False).first()  # first: the one non-empty value per column
    history["epoch"] = history["epoch"].astype(int)
    return history


FUSED_DEVICES = ("cpu", "cuda")  # where torch's Adam, AdamW and SGD have a fused (one kernel for all tensors) step


def fused_optimizer(params) -> dict:
    """``{"fused": True}`` for a torch Adam, AdamW or SGD over ``params`` when every one of them is a floating-point
    tensor on a device with a fused step, else ``{}`` (the default multi-tensor step). Same update up to rounding,
    a third of its time on the CPU: AdamW over the FPN-ResNet18's 11 M weights took 9.9 instead of 32.8 ms per step
    (one thread), about 5 % of a 128 px fine-tuning step at batch 8."""
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    return {"fused": True} if fused else {}


PROGRESS_VARIABLE = "CMR_PROGRESS"
PROGRESS_MODES = ("plain", "bar")


def progress_mode() -> str:
    """How training reports progress: ``bar`` or ``plain``.

    ``$CMR_PROGRESS`` decides when set (the Makefile sets ``plain`` for its headless Papermill runs); otherwise an
    interactive Jupyter kernel gets ``bar`` (a progress bar in the cell) and anything else ``plain``.
    """
    mode = os.environ.get(PROGRESS_VARIABLE, "").strip().lower()
    if mode:
        if mode not in PROGRESS_MODES:
            raise ValueError(f"{PROGRESS_VARIABLE}={os.environ[PROGRESS_VARIABLE]!r}: expected one of "
                             f"{', '.join(PROGRESS_MODES)} (or unset: a bar in JupyterLab, plain lines elsewhere)")
        return mode
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return "bar" if shell is not None and hasattr(shell, "kernel") else "plain"


def progress_line(text: str) -> None:
    """Write one line where the person running the study sees it: the process's own stderr.

    A Papermill kernel inherits its stderr from Make, so the line reaches the terminal while the notebook runs
    (ipykernel also copies what reaches file descriptor 2 into the notebook's output); ``print`` would go into
    the notebook only. The line is written in one call, so lines of parallel runs never interleave mid-line.
    """
    stream = sys.__stderr__ or sys.stderr
    stream.write(text.rstrip("\n") + "\n")
    stream.flush()


def epoch_summary(name: str, epoch: int, epochs: int, metrics: dict, monitor: str, images_per_s: float,
                  seconds_left: float) -> str:
    """``name: epoch k/N · train_loss … · val_loss … · <monitor> … (per structure) · img/s · time left``."""
    parts = [f"{name}: epoch {epoch}/{epochs}"]
    parts += [f"{k} {metrics[k]:.3f}" for k in dict.fromkeys(("train_loss", "val_loss", monitor)) if k in metrics]
    per_structure = [f"{k.rsplit('_', 1)[1]} {metrics[k]:.2f}" for k in metrics if k.startswith(monitor + "_")]
    if per_structure:
        parts[-1] += f" ({', '.join(per_structure)})"
    left = f"{seconds_left / 60:.1f} min left" if seconds_left >= 60 else f"{seconds_left:.0f} s left"
    parts += [f"{images_per_s:.0f} img/s", left]
    return " · ".join(parts)


class EpochLine(Callback):
    """Progress of one training run: run name, epoch k/N, losses, validation score, images/s, time left.

    ``plain`` mode (headless runs, scripts): one line per epoch on stderr (``progress_line``). ``bar`` mode (an
    interactive Jupyter kernel): one progress bar over the run's batches, the same numbers as its postfix.
    ``$CMR_PROGRESS`` chooses (see ``progress_mode``). Only the first process of a multi-process run reports.
    """

    def __init__(self, name: str, n_images: int, monitor: str = "val_dice"):
        self.name, self.n_images, self.monitor = name, n_images, monitor
        self.mode = progress_mode()
        self._started = self._epoch_started = 0.0
        self._bar = None

    def on_train_start(self, trainer, module):
        self._started = time.perf_counter()
        if self.mode == "bar" and trainer.is_global_zero:
            from tqdm.auto import tqdm

            batches = trainer.num_training_batches
            total = trainer.max_epochs * batches if isinstance(batches, int) else None
            self._bar = tqdm(total=total, desc=self.name, unit="batch", dynamic_ncols=True)

    def on_train_epoch_start(self, trainer, module):
        self._epoch_started, self._loss_sum, self._batches = time.perf_counter(), 0.0, 0
        self._validated = False

    def on_validation_end(self, trainer, module):
        self._validated = True  # an epoch without validation (``check_val_every_n_epoch``) shows no stale scores

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._loss_sum += float(loss)
            self._batches += 1
        if self._bar is not None:
            self._bar.update(1)

    def on_train_epoch_end(self, trainer, module):
        # runs after the epoch's validation: its metrics are in callback_metrics, the training loss is our own sum
        if not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()
             if (k.startswith("val_") or k == self.monitor) and getattr(self, "_validated", True)}
        m["train_loss"] = self._loss_sum / max(1, self._batches)
        done, total = trainer.current_epoch + 1, trainer.max_epochs
        now = time.perf_counter()
        speed = self.n_images / max(1e-9, now - self._epoch_started)
        left = (now - self._started) / done * (total - done)
        line = epoch_summary(self.name, done, total, m, self.monitor, speed, left)
        if self._bar is not None:
            self._bar.set_postfix_str(line.split(" · ", 1)[1], refresh=True)
        else:
            progress_line(line)

    def on_train_end(self, trainer, module):
        self._close()

    def on_exception(self, trainer, module, exception):
        self._close()

    def _close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


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
