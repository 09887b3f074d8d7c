"""The one segmentation-model factory: an FPN with a ResNet18 encoder, from every initialisation (random,
imagenet, or a pretraining method of ``cmr_utils.ssl``'s registry, which loads the encoder and, for methods
that pretrain it, the decoder).

Channel convention (``cmr_utils.encoders.IN_CHANNELS``): images are single-channel. 3-channel checkpoints
(ImageNet) are folded into ``conv1`` by summing the RGB kernels, which is what segmentation-models-pytorch
does for ``in_channels=1``. The backbone that SSL pretrains, and its encoder files, are defined in
``cmr_utils.encoders``; their keys are exactly those of smp's ResNet18 encoder.
"""
from __future__ import annotations

import torch
from torch import nn

from .encoders import IN_CHANNELS, load_encoder_state
from .fpn import N_CLASSES, SumMerge, build_fpn  # noqa: F401  (the factory's public names)

class WeightsUnavailable(RuntimeError):
    """Pretrained weights that are neither cached nor downloadable."""


def known_inits() -> tuple[str, ...]:
    """Every initialisation: random, imagenet (``BUILT_IN_INITS``) and each method of the pretraining registry
    (``METHODS``), both defined in ``cmr_utils.ssl.registry``."""
    from .ssl.registry import BUILT_IN_INITS, METHODS  # imported here: the methods bring Lightning with them

    return BUILT_IN_INITS + tuple(METHODS)


def pretrained_parts(init: str) -> tuple[str, ...]:
    """The parts of the FPN that ``init`` loads from stage 02 (``()`` for random and imagenet)."""
    from .ssl.registry import BUILT_IN_INITS, get_method

    if init in BUILT_IN_INITS:
        return ()
    return get_method(init).transfers


def imagenet_state_dict(timeout_s: float = 3.0) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet ResNet18 weights through the standard torch-hub download-and-cache path.

    Works wherever the user has internet or a filled cache (``$TORCH_HOME/hub/checkpoints``). Without
    either, it fails within a few seconds (``CMR_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``: at once) with a
    message that says where to put the file. It never falls back to random weights.
    """
    import os
    import socket
    from pathlib import Path

    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    help_text = (f"ImageNet weights for ResNet18 are not in the torch hub cache ({cached}) and could not be "
                 f"downloaded. On a machine with internet, download {weights.url} and copy it to {cached} "
                 f"(or point TORCH_HOME at a cache that has hub/checkpoints/{cached.name}).")
    if not cached.is_file():
        if os.environ.get("CMR_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
            raise WeightsUnavailable(help_text + " (offline mode is set)")
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout_s)  # urllib honours it: no minutes-long retries when offline
        try:
            return weights.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # URLError, socket.timeout, gaierror, partial downloads...
            raise WeightsUnavailable(f"{help_text} ({type(err).__name__}: {err})") from err
        finally:
            socket.setdefaulttimeout(previous)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:
        raise WeightsUnavailable(f"{cached}: cannot load the cached ImageNet weights ({err})") from err


def fold_to_one_channel(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum a 3-channel ``conv1`` over its RGB kernels (smp's rule for ``in_channels=1``); drop ``fc.*``."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    conv = state.get("conv1.weight")
    if conv is not None and conv.shape[1] == 3 and IN_CHANNELS == 1:
        state["conv1.weight"] = conv.sum(dim=1, keepdim=True)
    return state


def load_encoder_strict(encoder: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` into an smp encoder; any missing, unexpected or mis-shaped key is an error."""
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{origin}: encoder weights do not match the ResNet18 encoder "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {shapes[:3]})")
    nn.Module.load_state_dict(encoder, state, strict=True)


def load_decoder_state(path) -> dict[str, torch.Tensor]:
    """A decoder saved by stage 02 (keys of smp's FPN decoder), read on the CPU, weights only."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decoder file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable torch state_dict ({type(error).__name__}: {error})") from error


def load_decoder_strict(decoder: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` into the FPN decoder; any missing, unexpected or mis-shaped key is an error."""
    expected = decoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{origin}: decoder weights do not match the FPN decoder (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatch {shapes[:3]})")
    decoder.load_state_dict(state, strict=True)


def build_segmentation_model(init: str = "random", encoder_path=None, n_classes: int = N_CLASSES,
                             decoder_path=None) -> nn.Module:
    """FPN with a ResNet18 encoder, initialised from ``init``.

    ``random``: PyTorch's default initialisation; ``imagenet``: torchvision's ImageNet weights (see
    ``imagenet_state_dict``); a pretraining method: the encoder exported by stage 02 (``encoder_path``), and for a
    method that pretrains the decoder too, its decoder (``decoder_path``), each loaded strictly. The output head is
    always new.
    """
    inits = known_inits()
    if init not in inits:
        raise ValueError(f"init: expected one of {inits}, got {init!r}")
    model = build_fpn(n_classes)
    parts = pretrained_parts(init)
    if init == "imagenet":
        load_encoder_strict(model.encoder, fold_to_one_channel(imagenet_state_dict()), "ImageNet ResNet18")
    if "encoder" in parts:
        if encoder_path is None:
            raise ValueError(f"init {init!r} needs encoder_path (the encoder exported by stage 02)")
        load_encoder_strict(model.encoder, load_encoder_state(encoder_path), str(encoder_path))
    elif encoder_path is not None:
        raise ValueError(f"init {init!r} takes no encoder_path")
    if "decoder" in parts:
        if decoder_path is None:
            raise ValueError(f"init {init!r} needs decoder_path (the decoder exported by stage 02)")
        load_decoder_strict(model.decoder, load_decoder_state(decoder_path), str(decoder_path))
    elif decoder_path is not None:
        raise ValueError(f"init {init!r} takes no decoder_path (it pretrains the encoder only)")
    return model


def set_encoder_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) the encoder's parameters; a frozen encoder's BatchNorm statistics are kept too
    (the fine-tuning module keeps it in eval mode)."""
    for p in model.encoder.parameters():
        p.requires_grad_(not frozen)
