"""Pretrained encoders for other libraries: a plain ResNet18 state dict in safetensors, and its model card.

``export_encoder(ws, method, manifest)`` (stage 02, after ``cmr_utils.ssl.train.save_pretrained``) reads the
method's ``encoder.pt`` and writes beside it (``cmr_utils.paths``):

- ``encoder.safetensors``: the encoder with the keys of ``torchvision.models.resnet18()`` (also timm's ``resnet18``,
  and smp's ResNet18 encoder, which is torchvision's ResNet without ``fc``), no ``fc.*``: load it with
  ``strict=False`` into torchvision or timm (the classifier stays as built), strictly into smp's encoder. The project's
  encoder is single-channel; the file's ``conv1`` takes the usual 3 channels, the single-channel kernel divided by 3
  on each, so that a grey image repeated on 3 channels gives exactly the project's features (summing ``conv1`` over
  its channels gives the single-channel kernel back, smp's rule for ``in_channels=1``);
- ``MODEL_CARD.md``: the method, the data (sources, slice counts), epochs, the project's commit, the input
  conventions (channels, normalisation, pixel spacing and image size) and where the downstream numbers are: the
  report of the same workspace, which stage 06 writes later (the card names its path, it does not copy numbers).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .encoders import load_encoder_state
from .files import atomic_write
from .paths import Workspace, output_root

RGB = 3  # the input channels of torchvision's, timm's and smp's default ResNet18


def torchvision_state(encoder_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The project's single-channel encoder state as a 3-channel torchvision ResNet18 state (no ``fc.*``):
    ``conv1`` repeated on 3 channels, divided by 3 (a grey image on 3 channels gives the same features)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in encoder_state.items()}
    conv = state["conv1.weight"]
    if conv.shape[1] != 1:
        raise ValueError(f"conv1.weight: expected the project's single-channel kernel (64, 1, 7, 7), got "
                         f"{tuple(conv.shape)}")
    state["conv1.weight"] = (conv / RGB).repeat(1, RGB, 1, 1).contiguous()
    return state


def _sidecar(encoder_path: Path) -> dict:
    path = encoder_path.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the encoder's metadata is written by stage 02 with encoder.pt "
                                "(rerun stage 02)")
    return json.loads(path.read_text())


def _input_conventions(manifest: dict) -> list[str]:
    low, high = manifest.get("normalise_percentiles", (1.0, 99.0))
    lines = ["- channels: single-channel grey slices; the file's `conv1` takes 3 channels: repeat the slice on "
             "3 channels (or sum `conv1.weight` over its input channels for a 1-channel model);",
             f"- intensities: each volume clipped between its percentiles {low:g} and {high:g} and scaled to [0, 1] "
             "(no ImageNet mean and standard deviation);"]
    if manifest.get("geometry") == "physical":
        lines.append(f"- geometry: short-axis slices resampled to {manifest['target_spacing']:g} mm per pixel, a "
                     f"{manifest['image_size']} px window ({manifest['window_mm']:g} mm) around the slice centre.")
    else:
        lines.append(f"- geometry: each slice made square ({manifest['resize']}), its central "
                     f"{float(manifest.get('field_of_view', 1.0)):g} kept, resized to {manifest['image_size']} px "
                     "(pixel geometry: no physical spacing).")
    return lines


def model_card(method: str, metadata: dict, manifest: dict, report: str, commit: str) -> str:
    """The text of ``MODEL_CARD.md`` (module docstring)."""
    from .ssl import get_method

    spec = get_method(method)
    pool = metadata.get("pool_slices", {})
    by_source = ", ".join(f"{name}: {n}" for name, n in pool.get("train_by_source", {}).items())
    sources = "\n".join(f"- `{Path(s['folder']).name}` ({s['layout']}, {s['patients']} patients, {s['role']})"
                        for s in manifest.get("sources", []))
    parts = ", ".join(metadata.get("parts", ["encoder"]))
    return "\n".join([
        f"# {spec.display} ResNet18 encoder for cardiac MRI (self-supervised)",
        "",
        f"A ResNet18 encoder pretrained with {spec.display} (`{method}`) on unlabelled cine short-axis MRI slices "
        "by the cmr-ssl compendium (stage 02)."
        + (f" What it learns: {spec.summary.rstrip('.')}." if spec.summary else ""),
        "",
        "## Files",
        "",
        "- `encoder.safetensors`: the encoder with the key names of `torchvision.models.resnet18()` (and timm's "
        "`resnet18`, and smp's ResNet18 encoder), without `fc.*`;",
        f"- `encoder.pt` and `encoder.json`: the project's own format and metadata (pretrained parts: {parts}).",
        "",
        "```python",
        "import torchvision, safetensors.torch",
        "model = torchvision.models.resnet18()",
        "model.load_state_dict(safetensors.torch.load_file(\"encoder.safetensors\"), strict=False)  # fc stays new",
        "```",
        "",
        "In segmentation-models-pytorch: `smp.FPN(\"resnet18\", encoder_weights=None, classes=4).encoder"
        ".load_state_dict(safetensors.torch.load_file(\"encoder.safetensors\"))` (strict: its encoder has no `fc`).",
        "",
        "## Training",
        "",
        f"- method: {spec.display} (`{method}`); epochs run: {metadata.get('epochs_run')}, kept: "
        f"{metadata.get('best_epoch')} (validation loss {metadata.get('best_val_loss')}); collapsed: "
        f"{metadata.get('collapsed')};",
        f"- slices: {pool.get('train')} for training ({by_source}), {pool.get('val')} for validation (other "
        f"patients); pretraining image size {metadata.get('image_size')} px;",
        f"- parameters: `{json.dumps(metadata.get('parameters', {}), sort_keys=True)}`;",
        f"- the project's commit: {commit}; data manifest SHA-256 {metadata.get('data_manifest_sha256')}.",
        "",
        "Data sources (test patients of the labelled source are never in the pool):",
        "",
        sources,
        "",
        "## Input conventions",
        "",
        *_input_conventions(manifest),
        "",
        "## Downstream results",
        "",
        f"Fine-tuning results (Dice and IoU per label budget against random and ImageNet initialisations) are in the "
        f"report of the same run of the compendium, written after this file: `{report}` (tables beside it, in "
        "`tables/`).",
        "",
    ])


def export_encoder(ws: Workspace, method: str, manifest: dict) -> list[Path]:
    """Write ``encoder.safetensors`` and ``MODEL_CARD.md`` for ``method``'s pretrained encoder in ``ws`` (module
    docstring), each atomically; return their paths."""
    from safetensors.torch import save_file

    from .provenance import git_state

    encoder_path = ws.encoder_path(method)
    state = torchvision_state(load_encoder_state(encoder_path))
    metadata = _sidecar(encoder_path)
    commit = git_state()
    try:
        report = str(ws.report_html.relative_to(output_root()))
    except ValueError:
        report = str(ws.report_html)
    card = model_card(method, metadata, manifest, report, commit)
    header = {"format": "pt", "architecture": "resnet18", "keys": "torchvision", "in_channels": str(RGB),
              "method": method, "commit": commit}
    tensors_path, card_path = ws.encoder_export_path(method), ws.model_card_path(method)
    atomic_write(tensors_path, lambda temp: save_file(state, temp, metadata=header))
    atomic_write(card_path, lambda temp: temp.write_text(card))
    return [tensors_path, card_path]
