"""Post-install step of the project's virtual environment (run by ``make``; idempotent).

1. Decides by testing whether torchvision imports in a fresh interpreter. Only if it fails with the
   CPU-torch / CUDA-torchvision mismatch does it add tools/cmr_torchvision_shim.py to site-packages with a
   ``.pth`` file that activates it (no installed package is modified). On a machine with a matching
   torch/torchvision nothing is added, and a shim left over from an earlier run is removed.
2. Checks that torchvision (and the libraries that import it) now import.
"""
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SITE = Path(sysconfig.get_paths()["purelib"])
SHIM, PTH = SITE / "cmr_torchvision_shim.py", SITE / "cmr_torchvision_shim.pth"


def imports(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def main() -> int:
    for f in (SHIM, PTH):
        f.unlink(missing_ok=True)
    probe = imports("import torchvision")
    if probe.returncode == 0:
        print("setup_env: torchvision imports as installed; no shim needed")
    elif "torchvision::nms does not exist" in probe.stderr:
        shutil.copyfile(HERE / "cmr_torchvision_shim.py", SHIM)
        PTH.write_text("import cmr_torchvision_shim; cmr_torchvision_shim.install()\n")
        print("setup_env: torchvision's CUDA extension cannot load beside CPU torch; installed import shim")
    else:
        sys.stderr.write(probe.stderr)
        print("setup_env: `import torchvision` fails for another reason (above)", file=sys.stderr)
        return 1
    check = imports("import torchvision, segmentation_models_pytorch, lightly, pytorch_grad_cam")
    if check.returncode != 0:
        sys.stderr.write(check.stderr)
        print("setup_env: imports still fail after the shim", file=sys.stderr)
        return 1
    print("setup_env: torchvision, smp, lightly and pytorch_grad_cam import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
