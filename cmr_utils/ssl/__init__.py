"""Self-supervised pretraining of the FPN-ResNet18 on 2D cardiac MRI slices: one registry, one module per method.

- ``registry``  ``Method``, ``METHODS``, ``register``, ``get_method``, ``method_settings``: the one registry;
- ``simsiam``, ``swav`` (encoder only), ``mim`` (masked image modelling of the whole FPN), ``glcl`` (global +
  local contrastive, encoder then decoder): one module per method, each registering itself;
- ``base``      ``SSLModule``: the loop every method shares (losses, guards, collapse monitor);
- ``views``     grayscale augmentations and view transforms; ``data``: ``SliceDataset``;
- ``collapse``  the collapse monitor; ``train``: ``train_ssl``; ``checks``: shared argument checks.

Adding a method: a module that subclasses ``SSLModule`` and calls ``register(Method(...))``, imported below, and
its test. The backbone and encoder files live in :mod:`cmr_utils.encoders`.
"""
from ..encoders import load_encoder_state, save_encoder
from .collapse import COLLAPSE_THRESHOLD, embedding_std, is_collapsed
from .data import SliceDataset
from .registry import METHODS, Method, get_method, method_settings, register
from . import simsiam, swav, mim, glcl  # noqa: E402  (each registers its method, in the report's order)
from .simsiam import SimSiamModule
from .swav import SwAVModule
from .mim import MaskedImageModule
from .glcl import GlobalLocalContrastiveModule
from .train import HISTORY_COLUMNS, save_pretrained, train_ssl
from .views import RandomGamma, make_grayscale_augmentation, make_native_views, make_simsiam_transform, make_swav_transform

__all__ = [
    "COLLAPSE_THRESHOLD", "GlobalLocalContrastiveModule", "HISTORY_COLUMNS", "METHODS", "MaskedImageModule", "Method",
    "RandomGamma", "SimSiamModule", "SliceDataset", "SwAVModule", "embedding_std", "get_method", "is_collapsed",
    "load_encoder_state", "make_grayscale_augmentation", "make_native_views", "make_simsiam_transform",
    "make_swav_transform", "method_settings", "register", "save_encoder", "save_pretrained", "train_ssl",
]
