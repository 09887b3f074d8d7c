"""Where an output came from: the project's commit and the versions of the packages that made it (the report's
colophon, a run's ``plans.json``, a pretrained encoder's model card)."""
from __future__ import annotations

import platform
import subprocess
from importlib import metadata

from .paths import PROJ_ROOT

# the packages whose versions the report and each run record
PACKAGES = ("torch", "torchvision", "pytorch-lightning", "lightly", "segmentation-models-pytorch", "timm",
            "grad-cam", "numpy", "scipy", "pandas", "nibabel", "h5py", "pydicom", "highdicom", "matplotlib",
            "papermill", "jupytext")


def git_state() -> str:
    """The project's commit, marked when tracked files have uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJ_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJ_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def package_versions(names=PACKAGES) -> dict[str, str]:
    """``{"python": ..., package: version or "not installed"}``."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
