"""Post-install step of the project's virtual environment (run by ``make``; idempotent).

1. Decides by testing whether torchvision imports in a fresh interpreter that skips the ``.pth`` files (so
   an installed shim does not take part). Only if it fails with the CPU-torch / CUDA-torchvision mismatch does
   it add tools/cmr_torchvision_shim.py to site-packages with a ``.pth`` file that activates it (no installed
   package is modified). On a machine with a matching torch/torchvision nothing is added, and a shim left over
   from an earlier run is removed. An installed shim is replaced in place, never removed first: processes that
   start meanwhile (other runs of the project) keep importing torchvision.
2. Checks that torchvision (and the libraries that import it) now import.
3. Installs tools/ipython_kernel_config.py as the environment's kernel configuration (<env>/etc/ipython/):
   it drops the two kernel log lines that every Papermill run prints and that are not failures.
"""
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SITE = Path(sysconfig.get_paths()["purelib"])
SHIM, PTH = SITE / "cmr_torchvision_shim.py", SITE / "cmr_torchvision_shim.pth"
# IPython reads <sys.prefix>/etc/ipython/ipython_kernel_config.py in every kernel of this environment
KERNEL_CONFIG = Path(sys.prefix) / "etc" / "ipython" / "ipython_kernel_config.py"


def imports(code: str, *, as_installed: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; ``as_installed``: site-packages on the path, its .pth files unread."""
    if as_installed:
        code = f"import sys; sys.path.append({str(SITE)!r}); {code}"
    return subprocess.run([sys.executable, *(["-S"] if as_installed else []), "-c", code], capture_output=True,
                          text=True)


def replace(path: Path, text: str) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(text)
    temp.replace(path)


def main() -> int:
    probe = imports("import torchvision", as_installed=True)
    if probe.returncode == 0:
        for f in (PTH, SHIM):
            f.unlink(missing_ok=True)
        print("setup_env: torchvision imports as installed; no shim needed")
    elif "torchvision::nms does not exist" in probe.stderr:
        replace(SHIM, (HERE / "cmr_torchvision_shim.py").read_text())
        replace(PTH, "import cmr_torchvision_shim; cmr_torchvision_shim.install()\n")
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
    KERNEL_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    replace(KERNEL_CONFIG, (HERE / "ipython_kernel_config.py").read_text())
    print(f"setup_env: kernel configuration in {KERNEL_CONFIG} (quiet about expected kernel log lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
