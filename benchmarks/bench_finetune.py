"""Benchmark: fine-tuning throughput of the FPN-ResNet18, a plain PyTorch step against the Lightning loop.

    python benchmarks/bench_finetune.py [--sizes 96 128] [--batch 16] [--precision auto] [--no-channels-last]

For each size it prints images per second (median over timed steps after warm-up) of
- the plain step: augmentation, forward, loss, backward and optimiser step in a bare loop, full and frozen encoder;
- the compendium's Lightning loop (``cmr_utils.finetune``: in-memory batches, the same recipe), full encoder;
and one line ``training loop vs plain step: NN %``. ``--precision auto`` takes what ``trainer.precision: auto``
takes (bf16 where the device runs it natively, fp32 elsewhere); ``32-true`` and ``bf16-mixed`` force one.
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
    SegmentationModule,
    SliceBatches,
    segmentation_loss,
    slice_loader,
)
from cmr_utils.models import build_segmentation_model, set_encoder_frozen  # noqa: E402
from cmr_utils.training import quiet_lightning, resolve_precision  # noqa: E402

RECIPE = {"loss": "dice_ce", "optimizer": "adamw", "weight_decay": 1e-4, "schedule": "warmup_cosine",
          "warmup_epochs": 1, "augment": {"flips": True, "rotation_deg": 15, "scale": 0.1, "gamma": 0.3}}


def autocast(device, precision):
    if precision.startswith("bf16"):
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def plain_step_throughput(size, batch, device, precision, channels_last, frozen, steps=8, warmup=2):
    model = build_segmentation_model("random").to(device)
    set_encoder_frozen(model, frozen)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
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
    trainer = pl.Trainer(max_epochs=1, accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                         precision=precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[timer.callback])
    # the wall time of whole epochs counts the loop's own work between batches as well
    loader = slice_loader(SliceBatches(images, labels), batch, shuffle=True)
    with quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*no `val_dataloader`.*")  # timing the training loop alone
        started = time.perf_counter()
        trainer.fit(module, loader)
        wall = time.perf_counter() - started
    per_batch = statistics.median(timer.times)
    return batch / per_batch, n / wall


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 128])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=["auto", "32-true", "bf16-mixed"])
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    precision = resolve_precision(args.precision, "cuda" if args.device == "cuda" else "cpu")
    print(f"fine-tuning throughput, FPN-ResNet18, batch {args.batch}, device {args.device}, precision {precision}"
          f"{', channels_last' if args.channels_last else ''}, {args.threads} threads")
    print(f"{'size':>6} {'what':>26} {'img/s':>8}")
    ratios = []
    for size in args.sizes:
        for frozen in (False, True):
            ips = plain_step_throughput(size, args.batch, args.device, precision, args.channels_last, frozen)
            print(f"{size:>6} {'plain step, ' + ('frozen' if frozen else 'trained') + ' encoder':>26} {ips:8.1f}")
            if not frozen:
                plain = ips
        loop, wall = lightning_loop_throughput(size, args.batch, args.device, precision, args.channels_last)
        print(f"{size:>6} {'Lightning loop, trained':>26} {loop:8.1f}   (whole fit incl. start-up: {wall:.1f})")
        ratios.append(loop / plain)
    print(f"training loop vs plain step: {100 * statistics.median(ratios):.0f} %")


if __name__ == "__main__":
    main()
