"""Pretraining throughput: images per second of each registered method's training steps (forward, backward,
optimiser step) with its registered defaults, plus the CPU cost of making its views.

Each timed step runs on one fixed batch of already-augmented views, so the figure is the model's speed,
not the data loader's; the "aug slices/s" column is the single-process speed of the view transform,
to compare against (with num_workers=0 a training step costs both). A stage-wise method is timed per stage
(global + local contrastive: ``glcl:global``, the encoder; ``glcl:local``, the decoder with the encoder frozen). The
last column is each row's step time over SimSiam's at the same size.

    python benchmarks/bench_pretrain.py                       # CPU, 2 threads, 64 and 96 px, batch 32
    python benchmarks/bench_pretrain.py --sizes 64 --methods simsiam glcl
    python benchmarks/bench_pretrain.py --sizes 224 --device cuda --bf16 --channels-last
"""
from __future__ import annotations

import argparse
import inspect
import statistics
import time

import numpy as np
import torch

from cmr_utils import ssl


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96], help="image sizes in pixels")
    parser.add_argument("--methods", nargs="+", default=list(ssl.METHODS), choices=list(ssl.METHODS))
    parser.add_argument("--batch-size", type=int, default=32, help="slices per step")
    parser.add_argument("--n-local", type=int, default=6, help="local crops per slice of a multi-crop method (SwAV)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    for name in ("batch_size", "warmup", "steps", "threads"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2 (BatchNorm in the heads)")
    return args


def synthetic_slices(n: int, size: int) -> torch.Tensor:
    """Noise with a bright disc, (n, 1, size, size) in [0, 1]: content does not change the speed."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 6) ** 2).astype(np.float32)
    images = np.clip(0.2 * rng.random((n, size, size), dtype=np.float32) + 0.7 * disc, 0.0, 1.0)
    return torch.from_numpy(images)[:, None]


def make_views(method: str, size: int, args: argparse.Namespace) -> tuple[list[torch.Tensor], float]:
    """One batch as the method's loss takes it (list of (B, 1, h, w) views, then the slices' positions where the
    method needs them) and the transform's speed in slices per second."""
    spec = ssl.get_method(method)
    transform_kwargs = dict(ssl.method_settings(method, None).get("transform_kwargs", {}))
    if "n_local" in inspect.signature(spec.views).parameters:  # multi-crop views (SwAV)
        transform_kwargs["n_local"] = args.n_local
    transform = spec.views(size, **transform_kwargs)
    slices = synthetic_slices(args.batch_size, size)
    start = time.perf_counter()
    per_slice = [transform(image) for image in slices]
    aug_rate = len(slices) / (time.perf_counter() - start)
    views = [torch.stack(group) for group in zip(*per_slice)]
    if spec.positions:
        views.append(torch.linspace(0.0, 0.99, args.batch_size))  # every part of the short axis present
    return views, aug_rate


def method_model(method: str) -> torch.nn.Module:
    """The method's LightningModule with its registered defaults (model keyword arguments, lr, max_epochs)."""
    settings = ssl.method_settings(method, None)
    kwargs = {k: v for k, v in settings.items()
              if k not in ssl.registry.TRAINING_KEYS and k != "transform_kwargs" or k in ("lr", "max_epochs")}
    return ssl.get_method(method).model(**kwargs)


def rows(methods: list[str]) -> list[tuple[str, str, str | None]]:
    """(label, method, stage): one row per method, one per stage of a stage-wise method (``model.stages``)."""
    out = []
    for method in methods:
        stages = ssl.get_method(method).model.stages
        out += [(f"{method}:{stage}", method, stage) for stage in stages] or [(method, method, None)]
    return out


def time_method(method: str, stage: str | None, size: int, args: argparse.Namespace) -> dict[str, float]:
    device = torch.device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    views, aug_rate = make_views(method, size, args)
    views = [v.to(device).contiguous(memory_format=memory_format) if v.ndim == 4 else v.to(device) for v in views]
    torch.manual_seed(0)
    module = method_model(method).to(device).to(memory_format=memory_format).train()
    if stage is not None:
        module.stage = stage
        module.on_train_epoch_start()  # what the stage freezes at the start of its epochs
    configured = module.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss, _ = module.compute_loss(views)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    durations = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - start)
    median = statistics.median(durations)
    n_views = sum(v.ndim == 4 for v in views)
    return {
        "views": n_views,
        "step_ms": 1000 * median,
        "min_ms": 1000 * min(durations),
        "max_ms": 1000 * max(durations),
        "slices_per_s": args.batch_size / median,
        "views_per_s": args.batch_size * n_views / median,
        "aug_slices_per_s": aug_rate,
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"torch {torch.__version__} | {name} | batch {args.batch_size} slices | "
        f"{'bf16' if args.bf16 else 'fp32'} | {'channels_last' if args.channels_last else 'NCHW'} | "
        f"median of {args.steps} steps after {args.warmup} warm-up | SwAV: 2 global + {args.n_local} local crops"
    )
    header = (f"{'method':<12} {'size':>5} {'views':>5} {'step ms':>9} {'min-max ms':>15} {'slices/s':>9} "
              f"{'views/s':>9} {'aug slices/s':>13} {'x SimSiam':>10}")
    print(header)
    print("-" * len(header))
    # SimSiam first: the reference of the ratio column
    methods = sorted(args.methods, key=lambda m: m != "simsiam")
    for size in args.sizes:
        reference = None
        for label, method, stage in rows(methods):
            r = time_method(method, stage, size, args)
            reference = r["step_ms"] if method == "simsiam" else reference
            ratio = f"{r['step_ms'] / reference:>10.2f}" if reference else f"{'-':>10}"
            print(
                f"{label:<12} {size:>5} {r['views']:>5} {r['step_ms']:>9.1f} "
                f"{r['min_ms']:>7.0f}-{r['max_ms']:<7.0f} {r['slices_per_s']:>9.1f} "
                f"{r['views_per_s']:>9.1f} {r['aug_slices_per_s']:>13.1f} {ratio}",
                flush=True,
            )


if __name__ == "__main__":
    main()
