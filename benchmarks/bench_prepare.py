"""Benchmark: how long stage 01 takes to prepare a labelled ACDC source (and optional extra sources).

    python benchmarks/bench_prepare.py [--data FOLDER[,FOLDER...]] [--size 224] [--geometry physical|pixel]

Without --data it uses $CMR_ACDC_DIR (and $CMR_LA2018_DIR as extra source when set), else an 80-patient
phantom. The target on a 2-core machine: the 80 real ACDC patients at 224 px in under 60 s.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cmr_utils.phantom import ensure_phantom  # noqa: E402
from cmr_utils.prepare import prepare_dataset  # noqa: E402
from cmr_utils.readers import open_source  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--geometry", default="physical", choices=("physical", "pixel"),
                        help="physical: resampled to one spacing in mm where the data carry it (the CPU profiles)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folders = [f for f in args.data.split(",") if f]
        if not folders:
            folders = [os.environ[v] for v in ("CMR_ACDC_DIR", "CMR_LA2018_DIR") if os.environ.get(v)]
        if not folders:
            print("no --data and no CMR_ACDC_DIR: using an 80-patient phantom")
            folders = list(ensure_phantom(Path(tmp) / "phantom", n_patients=80, n_extra=4, n_frames=12))
        sources = [open_source(f) for f in folders]
        started = time.perf_counter()
        manifest = prepare_dataset(sources, Path(tmp) / "prepared", image_size=args.size, resize="pad",
                                   split_fractions=(0.7, 0.1, 0.2), split_seed=0, geometry=args.geometry)
        elapsed = time.perf_counter() - started
    counts = manifest["counts"]
    labelled = sum(counts[f"{s}_slices"] for s in ("train", "val", "test"))
    print(f"prepare_dataset at {args.size} px, {args.geometry} geometry, {os.cpu_count()} cores")
    for s in manifest["sources"]:
        print(f"  {s['layout']:11s} {s['patients']:4d} patients  {s['folder']}")
    print(f"  labelled slices {labelled}, pretraining pool {counts['pool_slices']}")
    print(f"  wall time {elapsed:.1f} s  ({labelled / elapsed:.0f} labelled slices/s)")


if __name__ == "__main__":
    main()
