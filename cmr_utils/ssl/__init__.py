"""SimSiam and SwAV pretraining of the ResNet18 backbone on 2D cardiac MRI slices.

One module per concern, in reading order; the public names are gathered here so that notebooks read
``ssl.train_ssl(...)``:

- ``views``     grayscale augmentations on tensors ``(1, H, W)`` in [0, 1] and the two methods' view
  transforms (``make_simsiam_transform``: two views; ``make_swav_transform``: lightly's multi-crop);
- ``data``      ``SliceDataset``: a stack of slices ``(N, H, W)`` (a numpy memmap is fine) -> list of views;
- ``collapse``  the collapse monitor ``embedding_std`` / ``is_collapsed`` (SimSiam paper, section 4.1);
- ``methods``   ``SimSiamModule`` and ``SwAVModule`` (one LightningModule per method) and ``METHODS`` /
  ``get_method``;
- ``train``     ``train_ssl``: seeded training with early stopping on ``val_loss``;
- ``checks``    the argument checks they share.

The backbone and its files (``build_backbone``, ``save_encoder``, ``load_encoder_state``) live in
:mod:`cmr_utils.encoders`, which the segmentation models load from too; ``save_encoder`` and
``load_encoder_state`` are re-exported here for the pretraining notebook.
"""
from ..encoders import load_encoder_state, save_encoder
from .collapse import COLLAPSE_THRESHOLD, embedding_std, is_collapsed
from .data import SliceDataset
from .methods import METHODS, SimSiamModule, SwAVModule, get_method
from .train import ENCODER_PREFIX, HISTORY_COLUMNS, train_ssl
from .views import RandomGamma, make_grayscale_augmentation, make_simsiam_transform, make_swav_transform

__all__ = [
    "COLLAPSE_THRESHOLD", "ENCODER_PREFIX", "HISTORY_COLUMNS", "METHODS", "RandomGamma", "SimSiamModule",
    "SliceDataset", "SwAVModule", "embedding_std", "get_method", "is_collapsed", "load_encoder_state",
    "make_grayscale_augmentation", "make_simsiam_transform", "make_swav_transform", "save_encoder", "train_ssl",
]
