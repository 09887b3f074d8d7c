"""Parameter profiles: ``params/<profile>.yaml``, checked against one schema.

A profile holds every parameter of every stage (``tiny`` for tests and CI, ``default`` for the whole study
on the phantom on a 2-core machine, ``paper`` for the study's full protocol on a GPU). Notebooks receive
only the profile name, the data folders and the loop variables (method, init, budget, seed) from Papermill,
and read everything else here, so derived values are always computed after injection.

A profile may extend another and state only what differs: ``extends: paper`` takes ``params/paper.yaml`` (itself
possibly extending another) and merges this file over it, mapping by mapping; a list or a value replaces the
parent's. The schema checks the merged result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .paths import PARAMS_DIR

# The schema: a leaf is the expected type (or tuple of types); a dict is a nested section.
# Lists are given as ("list", element type); a number or a list of exactly two numbers as NUMBER_OR_PAIR.
NUMBER = (int, float)
NUMBER_OR_PAIR = ("number_or_pair",)
# the finetune keys that make a run's training recipe (recorded in result.json and plans.json)
RECIPE_KEYS = ("loss", "optimizer", "weight_decay", "schedule", "warmup_epochs", "pretrained_lr_scale", "augment")
SCHEMA: dict[str, Any] = {
    "data": {
        "image_size": int,
        "geometry": str,
        "target_spacing": (str, int, float),
        "resize": str,
        "field_of_view": NUMBER,
        "split": {"train": NUMBER, "val": NUMBER, "test": NUMBER, "seed": int},
        "phantom": {"patients": int, "extra_cases": int, "frames": int, "seed": int},
    },
    "pretrain": {
        "methods": ("list", str),
        "image_size": int,
        "val_fraction": NUMBER,
        "batch_size": int,
        "max_epochs": int,
        "patience": int,
        "keep": str,
        "seed": int,
        # and, optionally, a block per method (``simsiam: {lr: 0.05}``): what differs from the method's defaults
    },
    "finetune": {
        "inits": ("list", str),
        "budgets": ("list", (int, str)),
        "seeds": ("list", int),
        "seeds_all": ("list", int),
        "epochs": int,
        "epochs_budget": int,
        "steps_patients": int,
        "val_every": int,
        "val_every_budget": int,
        "batch_size_all": int,
        "batch_size_budget": int,
        "lr": NUMBER,
        "freeze_below": int,
        "budgets_below_freeze": str,
        "loss": str,
        "optimizer": str,
        "weight_decay": NUMBER,
        "schedule": str,
        "warmup_epochs": NUMBER,
        "pretrained_lr_scale": NUMBER,
        "augment": {"flips": bool, "rotation_deg": NUMBER, "scale": NUMBER_OR_PAIR, "gamma": NUMBER, "crop": int,
                    "whole_epochs": int, "contrast": NUMBER, "brightness": NUMBER, "noise": NUMBER, "blur": NUMBER},
    },
    "evaluate": {"test_time_flips": bool},
    "trainer": {"accelerator": str, "devices": (int, str), "num_nodes": int, "precision": str, "strategy": str,
                "num_workers": int, "channels_last": bool, "compile": bool, "deterministic": bool},
    "explain": {
        "layers": ("list", str),
        "target": str,
        "n_best": int,
        "n_median": int,
        "n_worst": int,
        "deletion_steps": int,
        "max_slices": int,
    },
}
CHOICES = {
    "data.resize": {"pad", "crop"},
    # physical: resampled to data.target_spacing mm where the data carry spacing; pixel: the scan's own field of view
    "data.geometry": {"physical", "pixel"},
    "pretrain.keep": {"best", "last"},
    # budgets below freeze_below: the study's frozen encoder only, or each also run with the encoder trained
    "finetune.budgets_below_freeze": {"frozen", "frozen_and_trained"},
    "finetune.loss": {"dice", "dice_ce"},
    "finetune.optimizer": {"adam", "adamw"},
    "finetune.schedule": {"constant", "warmup_cosine", "poly"},
    "trainer.precision": {"auto", "32-true", "bf16-mixed", "16-mixed"},
    # ddp_notebook: Lightning forks the processes from the notebook's kernel; ddp: torchrun / srun started them
    "trainer.strategy": {"auto", "ddp_notebook", "ddp"},
    "explain.target": {"predicted", "ground_truth"},
}


class ParameterError(ValueError):
    """A parameter file or value that does not match the schema."""


def _type_name(t) -> str:
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__


def _check(value: Any, expected: Any, where: str, source: str) -> None:
    if isinstance(expected, dict):
        if not isinstance(value, dict):
            raise ParameterError(f"{source}: {where}: expected a mapping, got {type(value).__name__}")
        missing = sorted(set(expected) - set(value))
        unknown = sorted(set(value) - set(expected))
        if missing:
            raise ParameterError(f"{source}: {where or 'top level'}: missing key(s) {missing}")
        if unknown:
            raise ParameterError(f"{source}: {where or 'top level'}: unknown key(s) {unknown}")
        for key, sub in expected.items():
            _check(value[key], sub, f"{where}.{key}" if where else key, source)
        return
    if isinstance(expected, tuple) and expected and expected[0] == "list":
        if not isinstance(value, list) or not value:
            raise ParameterError(f"{source}: {where}: expected a non-empty list, got {value!r}")
        for i, item in enumerate(value):
            _check(item, expected[1], f"{where}[{i}]", source)
        return
    if expected is NUMBER_OR_PAIR:
        if isinstance(value, list):
            if len(value) != 2:
                raise ParameterError(f"{source}: {where}: expected a number or a list of two numbers, got {value!r}")
            for i, item in enumerate(value):
                _check(item, NUMBER, f"{where}[{i}]", source)
        else:
            _check(value, NUMBER, where, source)
        return
    # bool is an int in Python: never accept it where a number is expected, and vice versa
    types = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ParameterError(
            f"{source}: {where}: expected {_type_name(expected)}, got {type(value).__name__} {value!r}")
    if where in CHOICES and value not in CHOICES[where]:
        raise ParameterError(f"{source}: {where}: expected one of {sorted(CHOICES[where])}, got {value!r}")


def _method_blocks(params: dict, source: str) -> dict:
    """The ``pretrain`` section's per-method blocks, checked against the registry (``cmr_utils.ssl``): a block
    names a registered method and sets only its training keys, its model's arguments or ``transform_kwargs``."""
    import inspect

    from .ssl import METHODS
    from .ssl.registry import TRAINING_KEYS

    pretrain = params.get("pretrain")
    if not isinstance(pretrain, dict):
        return {}
    blocks = {k: v for k, v in pretrain.items() if k in METHODS}
    for name, block in blocks.items():
        if not isinstance(block, dict):
            raise ParameterError(f"{source}: pretrain.{name}: expected a mapping of {name}'s settings, got {block!r}")
        arguments = set(inspect.signature(METHODS[name].model.__init__).parameters) - {"self", "max_epochs"}
        allowed = set(TRAINING_KEYS) | arguments | {"transform_kwargs"}
        unknown = sorted(set(block) - allowed)
        if unknown:
            raise ParameterError(f"{source}: pretrain.{name}: unknown key(s) {unknown}; expected some of "
                                 f"{sorted(allowed)}")
        lr = block.get("lr", METHODS[name].defaults.get("lr"))
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, NUMBER) or lr <= 0):
            raise ParameterError(f"{source}: pretrain.{name}.lr: expected a positive number, got {lr!r}")
        if "keep" in block and block["keep"] not in CHOICES["pretrain.keep"]:
            raise ParameterError(f"{source}: pretrain.{name}.keep: expected one of {sorted(CHOICES['pretrain.keep'])}, "
                                 f"got {block['keep']!r}")
    return blocks


def pretrain_settings(params: dict, method: str) -> tuple[dict, dict]:
    """``(training, model)`` settings of one method: the ``pretrain`` section's common keys, then the method's
    registered defaults, then the profile's block for it; ``training`` holds ``train_ssl``'s own arguments
    (image_size, batch_size, max_epochs, patience, keep, lr), ``model`` the method's (and ``transform_kwargs``)."""
    from .ssl import method_settings
    from .ssl.registry import TRAINING_KEYS

    cfg = params["pretrain"]
    merged = method_settings(method, cfg.get(method))
    training = {k: cfg[k] for k in TRAINING_KEYS if k in cfg}
    training.update({k: merged.pop(k) for k in TRAINING_KEYS if k in merged})
    return training, merged


def validate(params: dict, source: str = "parameters") -> dict:
    """Check ``params`` against the schema and the cross-field rules; return it unchanged."""
    blocks = _method_blocks(params, source)
    _check({**params, "pretrain": {k: v for k, v in params["pretrain"].items() if k not in blocks}}
           if blocks else params, SCHEMA, "", source)
    split = params["data"]["split"]
    fractions = [split[k] for k in ("train", "val", "test")]
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ParameterError(f"{source}: data.split: train/val/test must be positive and sum to 1, got {fractions}")
    if params["data"]["image_size"] < 32 or params["data"]["image_size"] % 32:
        raise ParameterError(f"{source}: data.image_size: expected a multiple of 32 (FPN strides), "
                             f"got {params['data']['image_size']}")
    if params["pretrain"]["image_size"] < 32 or params["pretrain"]["image_size"] > params["data"]["image_size"]:
        raise ParameterError(f"{source}: pretrain.image_size: expected at least 32 and at most data.image_size "
                             f"({params['data']['image_size']}), got {params['pretrain']['image_size']}")
    target = params["data"]["target_spacing"]
    if target != "auto" and (isinstance(target, (bool, str)) or not 0 < target < float("inf")):
        raise ParameterError(f"{source}: data.target_spacing: expected 'auto' (from the training data) or a positive "
                             f"number of mm, got {target!r}")
    fov = params["data"]["field_of_view"]
    if not 0 < fov <= 1:
        raise ParameterError(f"{source}: data.field_of_view: expected a fraction in (0, 1] of the squared slice, "
                             f"got {fov!r}")
    aug = params["finetune"]["augment"]
    for key, high in (("rotation_deg", 180), ("gamma", 0.9), ("contrast", 0.9), ("brightness", 0.5), ("noise", 0.5),
                      ("blur", 3)):
        if not 0 <= aug[key] <= high:
            raise ParameterError(f"{source}: finetune.augment.{key}: expected a number in [0, {high}], got {aug[key]!r}")
    scale = aug["scale"]
    if not (0 < scale[0] <= 1 <= scale[1] <= 2 if isinstance(scale, list) else 0 <= scale <= 0.5):
        raise ParameterError(f"{source}: finetune.augment.scale: expected a number in [0, 0.5] (zoom in "
                             f"[1 - s, 1 + s]) or a pair [low, high] with 0 < low <= 1 <= high <= 2 (zoom "
                             f"log-uniform), got {scale!r}")
    size, crop, whole = params["data"]["image_size"], aug["crop"], aug["whole_epochs"]
    if crop and (crop < 32 or crop % 32 or crop >= size):
        raise ParameterError(f"{source}: finetune.augment.crop: expected 0 (no crops) or a multiple of 32 (FPN strides) "
                             f"below data.image_size ({size}), got {crop!r}")
    shortest = min(params["finetune"]["epochs"], params["finetune"]["epochs_budget"])
    if (not 1 <= whole < shortest) if crop else whole != 0:
        raise ParameterError(f"{source}: finetune.augment.whole_epochs: expected, with crops, the number of last epochs "
                             f"on whole slices, at least 1 and below the shortest run's {shortest} epochs (0 without "
                             f"crops); got {whole!r} with crop {crop!r}")
    ft = params["finetune"]
    for key, epochs in (("val_every", "epochs"), ("val_every_budget", "epochs_budget")):
        every = ft[key]
        if every < 1 or ft[epochs] % every:
            raise ParameterError(f"{source}: finetune.{key}: expected a positive number that divides finetune.{epochs} "
                                 f"({ft[epochs]}), so that the last epoch is validated; got {every!r}")
    from .models import known_inits
    from .ssl import METHODS

    inits = known_inits()
    for init in params["finetune"]["inits"]:
        if init not in inits:
            raise ParameterError(f"{source}: finetune.inits: unknown initialisation {init!r}; expected one of {inits}")
    from .budgets import patient_count

    for budget in params["finetune"]["budgets"]:
        if budget != "all" and patient_count(budget) is None and not (isinstance(budget, int) and
                                                                      not isinstance(budget, bool) and budget > 0):
            raise ParameterError(f"{source}: finetune.budgets: expected 'all', a positive number of slices or p<k> "
                                 f"(every slice of k training patients, e.g. p3), got {budget!r}")
    methods = list(METHODS)
    for method in params["pretrain"]["methods"]:
        if method not in methods:
            raise ParameterError(f"{source}: pretrain.methods: unknown method {method!r}; expected some of {methods}")
        if METHODS[method].check is not None:  # the method's own rules on its merged settings (registry)
            training, model = pretrain_settings(params, method)
            try:
                METHODS[method].check({**training, **model})
            except ValueError as error:
                raise ParameterError(f"{source}: pretrain.{method}: {error}") from None
    missing = [i for i in params["finetune"]["inits"] if i in methods and i not in params["pretrain"]["methods"]]
    if missing:
        raise ParameterError(f"{source}: finetune.inits {missing}: not pretrained; add them to pretrain.methods")
    return params


def profile_path(profile: str) -> Path:
    return PARAMS_DIR / f"{profile}.yaml"


def known_profiles() -> list[str]:
    """The profiles that exist: the names of ``params/*.yaml``."""
    return sorted(p.stem for p in PARAMS_DIR.glob("*.yaml"))


def _existing_profile(profile: Any, where: str) -> Path:
    """``params/<profile>.yaml``; an unknown profile is an error listing the ones that exist."""
    if not isinstance(profile, str):
        raise ParameterError(f"{where}expected a profile name (a file params/<name>.yaml), got {profile!r}")
    path = profile_path(profile)
    if "/" in profile or "\\" in profile or not path.is_file():
        raise ParameterError(f"{where}profile {profile!r} does not exist (no file {path}); the profiles that exist: "
                             f"{', '.join(known_profiles()) or 'none'}")
    return path


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``: mappings merged key by key, anything else (lists included) replaced."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def read_profile(profile: str) -> tuple[dict, list[Path]]:
    """``params/<profile>.yaml`` with its ``extends:`` chain merged (``extends: paper``: paper's parameters with this
    file's over them), unchecked; and the files read, the profile's own first. Nothing is validated here."""
    chain: list[Path] = []
    layers: list[dict] = []
    name, where = profile, ""
    while name is not None:
        path = _existing_profile(name, where)
        if path in chain:
            raise ParameterError(f"{chain[-1]}: extends: {name!r} closes a cycle "
                                 f"({' -> '.join(p.stem for p in [*chain, path])})")
        chain.append(path)
        try:
            layer = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ParameterError(f"{path}: not valid YAML ({err})") from err
        if not isinstance(layer, dict):
            raise ParameterError(f"{path}: expected a mapping of parameter sections, got {type(layer).__name__}")
        name = layer.pop("extends", None)
        where = f"{path}: extends: "
        layers.append(layer)
    params: dict = {}
    for layer in reversed(layers):
        params = merge(params, layer)
    return params, chain


def load_profile(profile: str) -> dict:
    """Read (``read_profile``: the ``extends:`` chain merged) and validate ``params/<profile>.yaml``."""
    params, chain = read_profile(profile)
    source = str(chain[0]) + (f" (extends {' -> '.join(p.stem for p in chain[1:])})" if len(chain) > 1 else "")
    return validate(params, source=source)
