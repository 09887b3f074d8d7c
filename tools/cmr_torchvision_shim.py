"""Lets a CUDA-built torchvision import beside a CPU-only torch (installed by tools/setup_env.py).

PyPI only ships CUDA builds of torchvision for x86_64. Next to the CPU build of torch its compiled
extension cannot load, and ``import torchvision`` then fails with
``RuntimeError: operator torchvision::nms does not exist`` (torchvision registers fake kernels for
operators its extension should have defined). This module installs a one-shot import hook: just before
torchvision is first imported, it tries to load the extension; only if that fails does it define the
two missing operator schemas so that the pure-Python parts of torchvision work. Compiled ops
(``torchvision.ops.nms``, ``torchvision.io`` decoders) still raise. The hook costs nothing in a process
that never imports torchvision, and does nothing where the extension loads.
"""
import glob
import importlib.abc
import importlib.util
import os
import sys

_fragment = None  # keeps the operator library alive for the life of the process


def _define_missing_ops():
    global _fragment
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    import torch

    for lib in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
        try:
            torch.ops.load_library(lib)
            return  # the extension works: nothing to do
        except (OSError, RuntimeError):
            pass
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    _fragment.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _fragment.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            _define_missing_ops()
        return None  # the normal finders do the import


def install():
    if "torchvision" not in sys.modules and not any(
        isinstance(f, _BeforeTorchvision) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _BeforeTorchvision())
