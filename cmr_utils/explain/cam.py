"""Seg-Grad-CAM of a segmentation model: which pixels of a layer's activations drive one class's logits.

Seg-Grad-CAM (Vinogradova et al. 2020) is Grad-CAM with a segmentation target: the sum of one class's
logits over a region of pixels. It is computed here with pytorch-grad-cam (``GradCAM`` +
``SemanticSegmentationTarget``); the region is the model's own predicted mask of the class by default,
or any given mask (for instance the ground truth). :func:`resolve_layer` names the explained layer.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..inference import LogitsWrapper, as_input_tensor, as_logits_model, check_batch_size, model_device, predict

DEFAULT_LAYER = "encoder.layer4"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, LogitsWrapper) else model


def resolve_layer(model: nn.Module, name: str = DEFAULT_LAYER) -> nn.Module:
    """The sub-module of ``model`` called ``name`` (dotted path, e.g. ``"encoder.layer4"``).

    A :class:`LogitsWrapper` is looked through. An unknown name raises ``ValueError`` listing the
    valid names two levels deep (``encoder.layer3``, ``decoder.p5``, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"layer name must be a non-empty string, got {name!r}")
    inner = _unwrap(model)
    try:
        return inner.get_submodule(name)
    except AttributeError:
        candidates = []
        for top_name, top in inner.named_children():
            candidates.append(top_name)
            candidates.extend(f"{top_name}.{child}" for child, _ in top.named_children())
        raise ValueError(
            f"unknown layer {name!r}; valid layers include: {', '.join(candidates)}"
        ) from None


class _GradientCut:
    """Make ``layer``'s output a fresh leaf that requires grad, for the duration of a ``with`` block.

    Grad-CAM needs only d(target)/d(activations of the layer). Cutting the graph at the layer skips the
    backward pass through the earlier layers, and lets the CAM be computed whatever the parameters'
    ``requires_grad`` are (a frozen encoder included). Registered before GradCAM's own hooks so that
    those see the leaf.
    """

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.handle = None

    def __enter__(self):
        def cut(module, inputs, output):
            return output.detach().requires_grad_(True)

        self.handle = self.layer.register_forward_hook(cut)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def seg_grad_cam(
    model: nn.Module,
    images,
    category: int,
    masks: np.ndarray | None = None,
    layer: str = DEFAULT_LAYER,
    batch_size: int = 16,
) -> np.ndarray:
    """Seg-Grad-CAM of class ``category`` for each slice: (N, H, W) float32 in [0, 1].

    Parameters
    ----------
    model : segmentation model returning logits (B, C, H, W) (dict/tuple outputs are unwrapped).
    images : (N, H, W) numpy array or (N, 1, H, W) tensor, float in [0, 1].
    category : class whose logits are explained (1 RV, 2 MYO, 3 LV; 0 background is allowed).
    masks : (N, H, W) region per slice (bool or 0/1), e.g. the ground truth of ``category``. ``None``
        (default) uses the model's predicted mask of ``category`` (argmax of its logits).
    layer : dotted name of the layer whose activations are weighted (see :func:`resolve_layer`).

    The target of slice i is the sum of class-``category`` logits over its region. A slice whose region
    is empty has no target, so its CAM is all zeros (a documented value, not an error). Otherwise each
    CAM is min-max scaled to [0, 1] by pytorch-grad-cam, after a ReLU; so a CAM is also all zeros when
    no location has a positive weighted activation, or when the layer's map is constant (a layer at
    1x1 resolution, e.g. ``encoder.layer4`` of a 32 px input, always gives zeros: use >= 64 px).

    The model is run in eval mode throughout (as pytorch-grad-cam does), so the result is deterministic.
    Gradients are switched on whatever the caller's context (``no_grad`` or ``inference_mode``); every
    module's train/eval mode and the parameters' ``requires_grad`` and ``.grad`` are restored on exit.
    """
    wrapped = as_logits_model(model)
    if not isinstance(category, (int, np.integer)) or isinstance(category, bool) or category < 0:
        raise ValueError(f"category must be a non-negative integer class index, got {category!r}")
    check_batch_size(batch_size)
    x = as_input_tensor(images)
    target_layer = resolve_layer(wrapped, layer)
    if any(p.is_inference() for p in wrapped.parameters()):
        raise ValueError(
            "the model's parameters are inference tensors (created under torch.inference_mode); "
            "build or load the model outside inference mode to compute gradients"
        )

    # pytorch-grad-cam puts the model in eval mode; do it for the whole computation (the predicted
    # region included) and give every module its own mode back afterwards.
    saved_modes = [(module, module.training) for module in wrapped.modules()]
    wrapped.eval()
    try:
        n_classes = _probe(wrapped, x, target_layer, layer)
        if category >= n_classes:
            raise ValueError(f"category must be < the model's {n_classes} classes, got {category}")
        regions = _target_regions(wrapped, x, category, masks, batch_size)
        cams = _grad_cam(wrapped, x, category, regions, target_layer, batch_size)
    finally:
        for module, training in saved_modes:
            module.training = training
    if not np.isfinite(cams).all():
        raise RuntimeError("Grad-CAM produced non-finite values; check the model's outputs and gradients")
    return np.clip(cams, 0.0, 1.0)


def _target_regions(wrapped: nn.Module, x: torch.Tensor, category: int, masks, batch_size: int) -> np.ndarray:
    """The (N, H, W) boolean region of each slice: the given masks, or the predicted mask of ``category``."""
    n_slices, height, width = x.shape[0], x.shape[2], x.shape[3]
    if masks is None:
        predicted, _ = predict(wrapped, x, batch_size=batch_size)
        return predicted == category
    regions = np.asarray(masks)
    if regions.shape != (n_slices, height, width):
        raise ValueError(f"masks must have shape {(n_slices, height, width)}, got {regions.shape}")
    if not np.isin(regions, (0, 1)).all():
        raise ValueError("masks must be binary (bool or 0/1)")
    return regions.astype(bool)


def _grad_cam(wrapped: nn.Module, x: torch.Tensor, category: int, regions: np.ndarray,
              target_layer: nn.Module, batch_size: int) -> np.ndarray:
    """pytorch-grad-cam's GradCAM over the slices with a non-empty region; zeros for the others."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    n_slices = x.shape[0]
    cams = np.zeros((n_slices, x.shape[2], x.shape[3]), dtype=np.float32)
    to_explain = np.flatnonzero(regions.reshape(n_slices, -1).any(axis=1))
    if to_explain.size == 0:
        return cams

    parameters = list(wrapped.parameters())
    saved_requires_grad = [p.requires_grad for p in parameters]
    saved_grads = [p.grad for p in parameters]  # GradCAM calls model.zero_grad(), which drops them
    with torch.inference_mode(False), torch.enable_grad():
        try:
            # No weight gradients are needed: only those of the layer's activations (see _GradientCut).
            for p in parameters:
                p.requires_grad_(False)
            with _GradientCut(target_layer):
                cam = GradCAM(model=wrapped, target_layers=[target_layer])
                try:
                    for start in range(0, to_explain.size, batch_size):
                        batch = to_explain[start:start + batch_size]
                        targets = [
                            SemanticSegmentationTarget(category, regions[i].astype(np.float32))
                            for i in batch
                        ]
                        cams[batch] = cam(input_tensor=x[batch], targets=targets)
                finally:
                    cam.activations_and_grads.release()
        finally:
            for p, requires_grad, grad in zip(parameters, saved_requires_grad, saved_grads):
                p.requires_grad_(requires_grad)
                p.grad = grad
    return cams


def _probe(wrapped: nn.Module, x: torch.Tensor, target_layer: nn.Module, layer: str) -> int:
    """Run one slice to check that ``layer`` is called and yields a (B, K, h, w) tensor; return the
    number of output classes (to validate ``category`` before explaining)."""
    seen = []
    handle = target_layer.register_forward_hook(lambda module, inputs, output: seen.append(output))
    try:
        with torch.no_grad():
            n_classes = int(wrapped(x[:1].to(model_device(wrapped))).shape[1])
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"layer {layer!r} is not called in the model's forward pass; pick another layer")
    if not isinstance(seen[-1], torch.Tensor) or seen[-1].ndim != 4:
        raise ValueError(f"layer {layer!r} must output a (B, K, h, w) tensor to be explained by Grad-CAM")
    return n_classes
