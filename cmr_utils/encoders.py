"""The ResNet18 backbone and its files: the one definition of the encoder that SSL pretrains and the FPN loads.

- ``build_backbone``: ResNet18 feature extractor (B, 1, H, W) -> (B, ``FEATURE_DIM``), single-channel
  (``IN_CHANNELS``), with smp-compatible key names;
- ``save_encoder`` / ``load_encoder_state``: the pretrained backbone as a plain, validated state_dict whose
  keys are those of smp's ResNet18 encoder (``validated_encoder_state`` checks keys and shapes).

Channel convention (decided here, once): images are single-channel. Key convention: the backbone is a
torchvision ResNet18 without its classifier, so its ``state_dict`` keys (``conv1.weight``, ``bn1.*``,
``layer1.*`` ... ``layer4.*``) are exactly those of smp's ResNet18 encoder.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .files import atomic_write

IN_CHANNELS = 1
FEATURE_DIM = 512  # ResNet18's pooled feature size


def build_backbone() -> nn.Module:
    """ResNet18 feature extractor (B, 1, H, W) -> (B, 512) with smp-compatible key names."""
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    net.conv1 = nn.Conv2d(IN_CHANNELS, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()  # no parameters: the state_dict has encoder keys only
    return net


@functools.lru_cache(maxsize=1)
def _expected_encoder_shapes() -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in build_backbone().state_dict().items()}


def _first(items: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" ... ({len(items)} in all)" if len(items) > n else "")


def validated_encoder_state(state: Any, *, source: str | os.PathLike) -> dict[str, Tensor]:
    """The state with keys and shapes of build_backbone(); drops a stray classifier ("fc.*")."""
    if not isinstance(state, dict):
        hint = " (a Lightning checkpoint? use train_ssl's backbone_state)" if hasattr(state, "keys") else ""
        raise ValueError(f"{source}: expected a state_dict (dict of tensors), got {type(state).__name__}{hint}")
    if "state_dict" in state and not isinstance(state["state_dict"], Tensor):
        raise ValueError(f"{source}: this is a full training checkpoint, not an encoder state_dict")
    expected = _expected_encoder_shapes()
    # a classifier is not part of an encoder: leave it behind
    state = {key: value for key, value in state.items() if not str(key).startswith("fc.")}
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise ValueError(f"{source}: entries that are not tensors: {_first(not_tensors)}")
    missing = [key for key in expected if key not in state]
    unexpected = [str(key) for key in state if key not in expected]
    mismatched = [
        f"{key} {tuple(state[key].shape)} != {expected[key]}"
        for key in expected
        if key in state and tuple(state[key].shape) != expected[key]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_first(mismatched)}")
    if problems:
        raise ValueError(f"{source} is not a 1-channel ResNet18 encoder state: " + "; ".join(problems))
    return {key: state[key] for key in expected}


def save_encoder(state_dict: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Write the backbone state_dict to ``path`` and ``path.with_suffix(".json")`` (metadata, library
    versions, number of keys), each atomically. Returns ``path``."""
    import lightly
    import pytorch_lightning as pl

    path = Path(path)
    sidecar = path.with_suffix(".json")
    if sidecar == path:
        raise ValueError(f"path must not end in .json (the metadata sidecar is {sidecar.name}), got {path}")
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    reserved = {"versions", "n_keys"} & set(metadata)
    if reserved:
        raise ValueError(f"metadata must not set {sorted(reserved)}: save_encoder writes them")
    state = validated_encoder_state(state_dict, source="state_dict")
    state = {key: value.detach().cpu().clone() for key, value in state.items()}
    sidecar_content = {
        **metadata,
        "versions": {"torch": torch.__version__, "lightly": lightly.__version__, "pytorch_lightning": pl.__version__},
        "n_keys": len(state),
    }
    try:
        sidecar_text = json.dumps(sidecar_content, indent=2, sort_keys=True)
    except TypeError as error:
        raise TypeError(f"metadata must be JSON-serialisable: {error}") from error
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda temp: torch.save(state, temp))
    atomic_write(sidecar, lambda temp: temp.write_text(sidecar_text + "\n"))
    return path


def load_encoder_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a saved encoder state_dict (weights only, on CPU) and check it against build_backbone()."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several kinds for a damaged file
        raise ValueError(f"{path} is not a readable torch state_dict ({type(error).__name__}: {error})") from error
    return validated_encoder_state(state, source=path)
