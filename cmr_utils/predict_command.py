"""Segment new scans with a trained run (make predict): NIfTI masks on each input's grid, volumes.csv and, with
--dicom-seg, DICOM Segmentation objects; see cmr_utils.predict_scans and docs/predict.md.

Exit codes: 0 written (quality warnings, if any, on stderr and in volumes.csv), 2 bad input or run (one line
"error: ..." naming the file or parameter; nothing written), 130 interrupted (one line; nothing written).

This module imports only the standard library; numpy, torch, scipy... are imported inside ``main``'s guard, so
that Ctrl-C at any moment, while Python imports them, while the model loads, while the scans are read or
predicted, ends in one line, "interrupted: nothing was written to OUTPUT", exit code 130, and no folder the run
created. A SIGINT inside an extension module's import can surface as another exception of a half-initialised
module (scipy's "ImportError: generic_type: type "ObjSense" is already registered!"): any exception after a
SIGINT counts as the interrupt.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C
USAGE = "usage: make predict RUN=<run folder or name> INPUT=<folder> OUTPUT=<folder> [DICOM_SEG=1]"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="make predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder (its path), or a run name of PROFILE and DATA, e.g. random-all-s0")
    parser.add_argument("--input", required=True, help="folder of scans in a supported layout")
    parser.add_argument("--output", required=True, help="folder for <case>_pred.nii.gz and volumes.csv")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--data", default="", help="the DATA= the run was trained on (empty: the phantom)")
    parser.add_argument("--label-map", default=None, help="nifti-pairs label values -> ACDC's, e.g. 1:3,2:2,3:1")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, or auto: the GPU where there is one and the run's profile allows it")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dicom-seg", action="store_true",
                        help="also write a DICOM Segmentation per series (DICOM input only; make predict DICOM_SEG=1)")
    return parser


def _identity(path: Path) -> tuple[int, int] | None:
    """What tells whether ``path`` was replaced: its inode and modification time (None if absent)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _missing_parents(output: Path) -> list[Path]:
    """OUTPUT's parent folders that do not exist yet, deepest first: what a failed run must not leave behind."""
    return [p for p in [output.parent, *output.parent.parents] if not p.exists()]


def _clean_up(output: Path, created: list[Path]) -> None:
    """Remove what an unfinished run may have left: its staging folder and the parents of OUTPUT it created (only
    where empty). ``predict_folder`` does this itself; this covers an interrupt that lands between its steps."""
    shutil.rmtree(output.parent / f".{output.name}.tmp-{os.getpid()}", ignore_errors=True)
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break


def _run(args) -> None:
    from . import predict_scans  # numpy, pandas, the readers: from here on, everything heavy
    from .params import load_profile

    device = args.device
    if device == "auto":  # the GPU where there is one and the profile's trainer.accelerator allows it
        from .training import inference_device

        device = inference_device(load_profile(args.profile)["trainer"]["accelerator"])
    predict_scans.predict_run(args.run, args.input, args.output, profile=args.profile, data=args.data,
                              label_map=args.label_map, batch_size=args.batch_size, device=device,
                              dicom_seg=args.dicom_seg)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    for name in ("run", "input", "output"):
        if not getattr(args, name).strip():
            print(f"error: {name.upper()}= is empty; {USAGE}", file=sys.stderr)
            return 2
    output = Path(args.output)
    before, created = _identity(output), _missing_parents(output)
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(signum)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        raise KeyboardInterrupt

    handler = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if handler else None
    try:
        try:
            _run(args)
        except BaseException as err:
            if interrupted or isinstance(err, KeyboardInterrupt):
                _clean_up(output, created)
                written = _identity(output) not in (None, before)
                print(f"interrupted after {output} was written" if written
                      else f"interrupted: nothing was written to {output}", file=sys.stderr, flush=True)
                return INTERRUPTED
            _clean_up(output, created)
            if isinstance(err, (ValueError, FileNotFoundError)):  # DataError included: a clear message, no traceback
                print(f"error: {err}", file=sys.stderr)
                return 2
            raise
    finally:
        if handler:
            signal.signal(signal.SIGINT, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
