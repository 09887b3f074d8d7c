"""Benchmark: Seg-Grad-CAM cost of the FPN-ResNet18, in ms per slice and class.

    python benchmarks/bench_cam.py [--sizes 64 128 224] [--slices 8] [--layer encoder.layer4] [--device cuda]

For each image size, ``cmr_utils.explain.seg_grad_cam`` explains each structure (RV, MYO, LV) on a batch
of synthetic slices whose target region is a given, non-empty mask (with the model's own prediction as
region, an untrained model can predict nothing, and an empty region skips the work). The time is the
median over repeats after a warm-up, divided by the number of slices. A plain forward pass
(``predict``) is timed alongside: the default region (the predicted mask) costs one more of those.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cmr_utils.explain import seg_grad_cam  # noqa: E402
from cmr_utils.inference import predict  # noqa: E402
from cmr_utils.metrics import STRUCTURES  # noqa: E402


def synthetic_slices(n, size, seed=0):
    """Noise images and label maps with an RV, MYO and LV square each (all regions non-empty)."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size), dtype=np.float32)
    labels = np.zeros((n, size, size), np.uint8)
    q = size // 8
    labels[:, 2 * q:4 * q, 1 * q:3 * q] = 1
    labels[:, 3 * q:7 * q, 4 * q:8 * q] = 2
    labels[:, 4 * q:6 * q, 5 * q:7 * q] = 3
    return images, labels


def median_ms(run, device, repeats, warmup=1):
    times = []
    for step in range(warmup + repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main():
    from cmr_utils.models import build_segmentation_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 224])
    parser.add_argument("--slices", type=int, default=8, help="slices explained per call (one batch)")
    parser.add_argument("--layer", default="encoder.layer4")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if any(size % 32 for size in args.sizes):
        parser.error("--sizes must be multiples of 32 (the FPN's five downsamplings)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but CUDA is not available")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_segmentation_model("random").to(args.device).eval()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {args.threads} threads"
    print(f"Seg-Grad-CAM, FPN-ResNet18, layer {args.layer}, {args.slices} slices per call, "
          f"median of {args.repeats} runs, {device_name}")
    print(f"{'size':>6} {'structure':>9} {'CAM ms/slice/class':>19} {'forward ms/slice':>17}")
    for size in args.sizes:
        images, labels = synthetic_slices(args.slices, size)
        forward = median_ms(lambda: predict(model, images, batch_size=args.slices), args.device, args.repeats)
        for category, name in STRUCTURES.items():
            masks = labels == category
            cam_ms = median_ms(
                lambda: seg_grad_cam(model, images, category, masks=masks, layer=args.layer,
                                     batch_size=args.slices),
                args.device, args.repeats,
            )
            print(f"{size:>6} {name:>9} {cam_ms / args.slices:19.1f} {forward / args.slices:17.1f}")


if __name__ == "__main__":
    main()
