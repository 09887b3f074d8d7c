"""Benchmark: fine-tuning throughput of the FPN-ResNet18 (training step: forward, Dice loss, backward, Adam).

    python benchmarks/bench_finetune.py [--sizes 64 128] [--batch 16] [--device cuda --bf16 --channels-last]

Prints images per second (median over timed steps after warm-up) for a full and a frozen encoder.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cmr_utils.models import build_segmentation_model, set_encoder_frozen  # noqa: E402


def throughput(size, batch, device, bf16, channels_last, frozen, steps=6, warmup=2):
    import segmentation_models_pytorch as smp

    model = build_segmentation_model("random").to(device)
    set_encoder_frozen(model, frozen)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = smp.losses.DiceLoss(mode="multiclass", from_logits=True)
    x = torch.rand(batch, 1, size, size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 4, (batch, size, size), device=device)
    times = []
    for step in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"fine-tuning throughput, FPN-ResNet18, batch {args.batch}, device {args.device}"
          f"{', bf16' if args.bf16 else ''}{', channels_last' if args.channels_last else ''}")
    print(f"{'size':>6} {'encoder':>9} {'img/s':>8}")
    for size in args.sizes:
        for frozen in (False, True):
            ips = throughput(size, args.batch, args.device, args.bf16, args.channels_last, frozen)
            print(f"{size:>6} {'frozen' if frozen else 'trained':>9} {ips:8.1f}")


if __name__ == "__main__":
    main()
