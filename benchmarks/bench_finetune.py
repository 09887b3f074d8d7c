"""Benchmark: fine-tuning throughput of the FPN-ResNet18, a plain PyTorch step against the Lightning loop.

    python benchmarks/bench_finetune.py [--sizes 96 128] [--batch 16] [--precision auto] [--no-channels-last]
                                        [--peak-tflops T] [--deterministic]

For each size it prints images per second (median over timed steps after warm-up) of
- the plain step: augmentation, forward, loss, backward and optimiser step in a bare loop, full and frozen encoder;
- the compendium's Lightning loop (``cmr_utils.finetune``: in-memory batches, the same recipe), full encoder;
and one line ``training loop vs plain step: NN %``. ``--precision auto`` takes what ``trainer.precision: auto``
takes (bf16 where the device runs it natively, fp32 elsewhere); ``32-true`` and ``bf16-mixed`` force one.
``--deterministic``: PyTorch's deterministic algorithms for both (``trainer.deterministic: true``; on an H200 about a
third of the throughput without them).

On a GPU the default sizes are the study's 224 px (batch 128, the study's), and each line adds the model's
training FLOPs per second (counted by ``torch.utils.flop_counter`` for one forward and backward pass) as a share
of the device's dense bf16 peak (a table of data-centre GPUs; ``--peak-tflops`` for others).
"""
import argparse
import contextlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cmr_utils.augment import augment_batch  # noqa: E402
from cmr_utils.finetune import (  # noqa: E402
    DataOnDevice,
    SegmentationModule,
    SliceBatches,
    segmentation_loss,
    slice_loader,
)
from cmr_utils.models import build_segmentation_model, set_encoder_frozen  # noqa: E402
from cmr_utils.training import fused_optimizer, quiet_lightning, resolve_precision  # noqa: E402

RECIPE = {"loss": "dice_ce", "optimizer": "adamw", "weight_decay": 1e-4, "schedule": "warmup_cosine",
          "warmup_epochs": 1, "augment": {"flips": True, "rotation_deg": 15, "scale": 0.1, "gamma": 0.3}}


# dense bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets (SXM / PCIe forms differ for H100)
BF16_PEAK_TFLOPS = {"H200": 989, "H100 SXM": 989, "H100 80GB HBM3": 989, "GH200": 989, "H100 PCIe": 756,
                    "H100 NVL": 835, "A100": 312, "L40S": 362, "L40": 181, "L4": 121, "A10": 125, "A30": 165}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The table's peak for a ``torch.cuda.get_device_name()``, longest matching key first; None if unknown."""
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return float(BF16_PEAK_TFLOPS[key])
    return None


def training_flops_per_image(size: int) -> float:
    """FLOPs of one forward and backward pass of the FPN-ResNet18 on one 1-channel image of ``size`` px."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_segmentation_model("random").train()
    x = torch.rand(2, 1, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x).float().mean().backward()
    return counter.get_total_flops() / 2


def autocast(device, precision):
    if precision.startswith("bf16"):
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def plain_step_throughput(size, batch, device, precision, channels_last, frozen, steps=8, warmup=2):
    model = build_segmentation_model("random").to(device)
    set_encoder_frozen(model, frozen)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, **fused_optimizer(params))  # as SegmentationModule
    loss_fn = segmentation_loss(RECIPE["loss"])
    x = torch.rand(batch, 1, size, size, device=device)
    y = torch.randint(0, 4, (batch, size, size), device=device)
    times = []
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        image, label = augment_batch(x, y, **RECIPE["augment"])
        with autocast(device, precision):
            loss = loss_fn(model(image.contiguous(memory_format=fmt)).float(), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


class _StepTimer:
    """Times every training batch (start to end) after ``warmup`` batches."""

    def __init__(self, warmup):
        from pytorch_lightning.callbacks import Callback

        timer = self

        class Hook(Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.t = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.seen += 1
                if timer.seen > warmup:
                    timer.times.append(time.perf_counter() - timer.t)

        self.callback, self.times, self.seen, self.t = Hook(), [], 0, 0.0


def lightning_loop_throughput(size, batch, device, precision, channels_last, steps=8, warmup=2):
    """Batches per second of ``SegmentationModule`` in a Lightning Trainer, fed as in ``train_segmentation``
    (timed from one batch's start to its end, so the loader's gather and the device transfer count)."""
    import pytorch_lightning as pl

    n = batch * (steps + warmup)
    rng = np.random.default_rng(0)
    images = rng.random((n, size, size), dtype=np.float32)
    labels = rng.integers(0, 4, (n, size, size), dtype=np.uint8)
    module = SegmentationModule("random", lr=1e-3, channels_last=channels_last, recipe=RECIPE)
    timer = _StepTimer(warmup)
    loader = slice_loader(SliceBatches(images, labels), batch, shuffle=True)
    trainer = pl.Trainer(max_epochs=1, accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                         precision=precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[timer.callback, DataOnDevice(loader.dataset)])  # the slices on the device
    # the wall time of whole epochs counts the loop's own work between batches as well
    with quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*no `val_dataloader`.*")  # timing the training loop alone
        started = time.perf_counter()
        trainer.fit(module, loader)
        wall = time.perf_counter() - started
    per_batch = statistics.median(timer.times)
    return batch / per_batch, n / wall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    parser.add_argument("--sizes", type=int, nargs="+", default=[224] if gpu else [96, 128])
    parser.add_argument("--batch", type=int, default=128 if gpu else 16)
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak (default: from the table, for known GPUs)")
    parser.add_argument("--precision", default="auto", choices=["auto", "32-true", "bf16-mixed"])
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--deterministic", action="store_true", help="deterministic algorithms (warn where none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)
    torch.manual_seed(0)
    precision = resolve_precision(args.precision, "cuda" if args.device == "cuda" else "cpu")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    peak = args.peak_tflops or (bf16_peak_tflops(name) if args.device == "cuda" else None)
    print(f"fine-tuning throughput, FPN-ResNet18, batch {args.batch}, device {args.device} ({name}), precision "
          f"{precision}{', channels_last' if args.channels_last else ''}, {args.threads} threads"
          f"{', deterministic algorithms' if args.deterministic else ''}"
          f"{f', bf16 peak {peak:.0f} TFLOP/s' if peak else ''}")
    print(f"{'size':>6} {'what':>26} {'img/s':>8} {'TFLOP/s':>8} {'of peak':>8}")
    ratios = []

    def line(size, what, ips, flops):
        if flops is None:  # a frozen encoder skips most of the backward pass: its FLOPs are not counted
            print(f"{size:>6} {what:>26} {ips:8.1f}", flush=True)
            return
        achieved = ips * flops / 1e12
        share = f"{100 * achieved / peak:7.1f}%" if peak else f"{'-':>8}"
        print(f"{size:>6} {what:>26} {ips:8.1f} {achieved:8.2f} {share}", flush=True)

    for size in args.sizes:
        flops = training_flops_per_image(size)
        print(f"{size:>6} {'training FLOPs per image':>26} {flops / 1e9:8.2f} G (forward + backward, trained encoder)")
        for frozen in (False, True):
            ips = plain_step_throughput(size, args.batch, args.device, precision, args.channels_last, frozen)
            what = "plain step, " + ("frozen" if frozen else "trained") + " encoder"
            line(size, what, ips, None if frozen else flops)
            if not frozen:
                plain = ips
        loop, wall = lightning_loop_throughput(size, args.batch, args.device, precision, args.channels_last)
        line(size, "Lightning loop, trained", loop, flops)
        print(f"{size:>6} {'(whole fit incl. start-up)':>26} {wall:8.1f}")
        ratios.append(loop / plain)
    print(f"training loop vs plain step: {100 * statistics.median(ratios):.0f} %")


if __name__ == "__main__":
    main()
