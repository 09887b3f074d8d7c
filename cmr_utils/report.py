"""The report's building blocks: figures and tables gathered from the stages, and the colophon that ties the
report to a state of the code, the packages, the parameters and the data."""
from __future__ import annotations

import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd

from .paths import PROJ_ROOT, Workspace
from .params import profile_path

PACKAGES = ("torch", "torchvision", "pytorch-lightning", "lightly", "segmentation-models-pytorch", "timm",
            "grad-cam", "numpy", "scipy", "pandas", "nibabel", "h5py", "matplotlib", "papermill", "jupytext")


def stage_durations(executed: Path) -> pd.DataFrame:
    """Wall time of every executed notebook, from the metadata Papermill records."""
    rows = []
    for nb in sorted(Path(executed).glob("*.ipynb")):
        if nb.name.endswith((".tmp.ipynb", ".src.ipynb", ".failed.ipynb")):
            continue
        meta = json.loads(nb.read_text()).get("metadata", {}).get("papermill", {})
        rows.append({"notebook": nb.stem, "wall_s": meta.get("duration"), "finished": meta.get("end_time")})
    return pd.DataFrame(rows, columns=["notebook", "wall_s", "finished"])


def git_state() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJ_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJ_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}) x {torch.cuda.device_count()}"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def colophon(ws: Workspace, manifest: dict) -> dict[str, pd.DataFrame | str]:
    """When, from which commit, with which packages, parameters, data and device this report was made."""
    import hashlib

    versions = []
    for name in PACKAGES:
        try:
            versions.append({"package": name, "version": metadata.version(name)})
        except metadata.PackageNotFoundError:
            versions.append({"package": name, "version": "not installed"})
    params_file = profile_path(ws.profile)
    sources = pd.DataFrame([{k: s[k] for k in ("folder", "layout", "role", "patients", "content_sha256")}
                            for s in manifest["sources"]])
    return {
        "made": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_state(),
        "python": platform.python_version(),
        "profile": f"{ws.profile} ({params_file.name}, sha256 "
                   f"{hashlib.sha256(params_file.read_bytes()).hexdigest()[:12]})",
        "device": device_description(),
        "packages": pd.DataFrame(versions),
        "sources": sources,
        "durations": stage_durations(ws.executed),
    }
