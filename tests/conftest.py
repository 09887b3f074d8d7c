"""Shared fixtures: synthetic data written by the tests themselves, and the real data where the environment
names it (CMR_ACDC_DIR, CMR_LA2018_DIR, CMR_SUNNYBROOK_DIR; see README)."""
import os
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _outputs_in_tmp(tmp_path_factory):
    """Every test (and every fixture, whatever its scope) writes its data, runs and reports under a temporary
    root, never into the project; ImageNet weights are not fetched unless a test asks for the attempt."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CMR_OUTPUT_ROOT", str(tmp_path_factory.getbasetemp() / "outputs"))
        mp.setenv("CMR_OFFLINE", "1")
        mp.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch-home"))  # an empty weights cache
        yield


@pytest.fixture(autouse=True)
def _no_figure_left_open():
    """Each test starts with no matplotlib figure open, so that a test asserting its code closed its figures sees
    only its own."""
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")
    yield


@pytest.fixture(scope="session")
def phantom_sources(tmp_path_factory):
    """A small phantom in the official ACDC NIfTI layout plus a Decathlon-style extra source."""
    from cmr_utils.phantom import ensure_phantom

    root = tmp_path_factory.mktemp("phantom")
    return ensure_phantom(root, n_patients=6, n_extra=2, seed=3, n_frames=4)


def real_dir(variable: str) -> Path:
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"{variable} is not set (point it at the real data to run this test)")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"{variable}={value} is not a folder")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for modules of many tiny convolutions: faster than two on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_evaluated():
    """The phantom taken through stage 04 with the tiny profile (`make evaluate PROFILE=tiny`) under the session's
    CMR_OUTPUT_ROOT: what 05_explain reads. A later `make report PROFILE=tiny` in the session goes on from it."""
    import subprocess

    from cmr_utils.paths import PROJ_ROOT, workspace

    cmd = ["make", "--no-print-directory", "evaluate", "PROFILE=tiny"]
    done = subprocess.run(cmd, cwd=PROJ_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return workspace("tiny", "")
