"""The one registry of pretraining methods: each method module under ``cmr_utils.ssl`` registers itself here.

A ``Method`` holds what every other part of the compendium needs to know about one method: its name (the
initialisation's name in run names), the name and colour the report shows, its LightningModule, its view
transform, its default hyper-parameters, which parts of the FPN it pretrains (``encoder`` or ``encoder`` and
``decoder``) and whether its views need each slice's position along the short axis. The parameter schema, the
plan and Make, notebook 02, the model factory, the plots and the report read ``METHODS``; adding a method is one
module that calls ``register`` and is imported in ``cmr_utils/ssl/__init__.py``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# the settings of train_ssl that a method's defaults or a profile's method block may set
TRAINING_KEYS = ("image_size", "batch_size", "max_epochs", "patience", "keep", "lr")
PARTS = ("encoder", "decoder")
# the initialisations the model factory makes itself; every other one (``models.known_inits``) is a method here
BUILT_IN_INITS = ("random", "imagenet")


@dataclass(frozen=True)
class Method:
    name: str
    display: str
    colour: str
    model: type  # a LightningModule class, ``model(lr=..., max_epochs=..., **model kwargs)``
    views: Callable[..., Any]  # ``views(image_size, **transform_kwargs)`` -> a slice's list of views
    defaults: dict[str, Any] = field(default_factory=dict)  # training keys and model kwargs
    transfers: tuple[str, ...] = ("encoder",)  # the parts of the FPN a fine-tuning run loads
    positions: bool = False  # its batches carry each slice's relative position along the short axis
    summary: str = ""  # one line for the report
    # the method's own rules on its settings (training keys and model arguments merged), checked when a profile
    # loads: raises ValueError naming the key
    check: Callable[[dict], None] | None = None

    def __post_init__(self):
        if not self.name.isidentifier() or self.name != self.name.lower() or "-" in self.name:
            raise ValueError(f"method name {self.name!r}: expected a lower-case identifier (it is part of run names)")
        if not set(self.transfers) <= set(PARTS) or "encoder" not in self.transfers:
            raise ValueError(f"method {self.name}: transfers {self.transfers} must include 'encoder', within {PARTS}")


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (a name registered twice is an error)."""
    if method.name in METHODS or method.name in BUILT_IN_INITS:
        raise ValueError(f"method {method.name!r} is already registered (or is a built-in initialisation)")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``; an unknown name is an error listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown SSL method {name!r}; known methods: {', '.join(METHODS)}")
    return METHODS[name]


def method_settings(name: str, overrides: dict | None) -> dict[str, Any]:
    """The method's defaults with a profile's block (``pretrain.<name>``) laid over them; nested dicts
    (``transform_kwargs``) are merged key by key."""
    settings = {k: (dict(v) if isinstance(v, dict) else v) for k, v in get_method(name).defaults.items()}
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return settings
