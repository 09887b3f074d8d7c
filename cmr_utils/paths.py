"""Where everything lives: the one module that knows the file layout of data, runs and reports.

Every output path of the compendium is derived here from three things: the project root (or
``$CMR_OUTPUT_ROOT``, which tests use to work in a temporary folder), the data sources (``DATA=``) and the
parameter profile (``PROFILE=``). Outputs of different data or profiles live in different folders::

    <root>/data/phantom/<phantom-id>/{acdc,decathlon}    the built-in phantom (generated on first use)
    <root>/runs/<data-tag>/<profile>/                     prepared slices, checkpoints, per-run results
    <root>/reports/<data-tag>/<profile>/                  executed notebooks, figures, tables, report.html

Run names are deterministic (``{init}-{budget}-s{seed}``), never timestamps, so that Make can reason
about them.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

PROJ_ROOT = Path(__file__).resolve().parents[1]
PARAMS_DIR = PROJ_ROOT / "params"
NOTEBOOKS_DIR = PROJ_ROOT / "notebooks"


def output_root() -> Path:
    """Folder under which data/, runs/ and reports/ are written (``$CMR_OUTPUT_ROOT`` or the project)."""
    return Path(os.environ.get("CMR_OUTPUT_ROOT") or PROJ_ROOT).resolve()


def parse_data(data: str | None, what: str = "DATA") -> list[Path]:
    """``DATA=`` value -> list of existing folders (labelled source first). Empty -> [] (the phantom).
    ``what`` names the variable in errors (``EXTERNAL`` for the external-validation folders)."""
    if data is None:
        return []
    if not isinstance(data, str):
        raise TypeError(f"{what.lower()}: expected a comma-separated string of folders, got {type(data).__name__}")
    folders = [Path(p.strip()).expanduser() for p in data.split(",") if p.strip()]
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder {folder} does not exist or is not a folder")
    return [f.resolve() for f in folders]


def data_tag(data: str | None) -> str:
    """Stable, readable name of a data selection: ``phantom`` or ``<first-folder-name>-<hash8>``."""
    folders = parse_data(data)
    if not folders:
        return "phantom"
    digest = hashlib.sha256("\n".join(str(f) for f in folders).encode()).hexdigest()[:8]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", folders[0].name).strip("_") or "data"
    return f"{slug}-{digest}"


def run_name(init: str, budget: str | int, seed: int) -> str:
    """Deterministic name of one fine-tuning run, e.g. ``simsiam-150-s0``."""
    return f"{init}-{budget}-s{seed}"


def phantom_dir(patients: int, extra_cases: int, frames: int, seed: int) -> Path:
    """Where the built-in phantom of these parameters is generated; the generator's format version is in the name,
    so a newer generator writes beside an older phantom rather than refusing it."""
    from .phantom import FORMAT_VERSION

    return output_root() / "data" / "phantom" / f"n{patients}-e{extra_cases}-f{frames}-s{seed}-v{FORMAT_VERSION}"


@dataclass(frozen=True)
class Workspace:
    """All paths of one (data, profile) combination."""

    profile: str
    tag: str
    root: Path

    @property
    def runs(self) -> Path:
        return self.root / "runs" / self.tag / self.profile

    @property
    def reports(self) -> Path:
        return self.root / "reports" / self.tag / self.profile

    # stage 01
    @property
    def prepared(self) -> Path:
        return self.runs / "prepared"

    # stage 02
    def pretrain_dir(self, method: str) -> Path:
        return self.runs / "pretrain" / method

    def encoder_path(self, method: str) -> Path:
        return self.pretrain_dir(method) / "encoder.pt"

    def decoder_path(self, method: str) -> Path:
        """The FPN decoder of a method that pretrains it (``cmr_utils.ssl.train.save_pretrained``)."""
        return self.pretrain_dir(method) / "decoder.pt"

    def encoder_export_path(self, method: str) -> Path:
        """The encoder for other libraries: torchvision's ResNet18 keys, in safetensors (``cmr_utils.export``)."""
        return self.pretrain_dir(method) / "encoder.safetensors"

    def model_card_path(self, method: str) -> Path:
        return self.pretrain_dir(method) / "MODEL_CARD.md"

    # stage 03
    def finetune_dir(self, name: str) -> Path:
        return self.runs / "finetune" / name

    # stages 04 and 06
    @property
    def evaluation(self) -> Path:
        return self.runs / "evaluate"

    @property
    def explanation(self) -> Path:
        return self.runs / "explain"

    # reports
    @property
    def executed(self) -> Path:
        return self.reports / "executed"

    @property
    def figures(self) -> Path:
        return self.reports / "figures"

    @property
    def tables(self) -> Path:
        return self.reports / "tables"

    @property
    def report_html(self) -> Path:
        return self.reports / "report.html"

    def figure(self, name: str) -> Path:
        self.figures.mkdir(parents=True, exist_ok=True)
        return self.figures / name

    def table(self, name: str) -> Path:
        self.tables.mkdir(parents=True, exist_ok=True)
        return self.tables / name


def run_folder(run: str | os.PathLike, profile: str = "default", data: str | None = "") -> Path:
    """The folder of a fine-tuning run: ``run`` itself where it is a path (it has a ``/``, or is a folder holding a
    run's ``plans.json`` or ``result.json``; a copied run folder anywhere), else the run named ``run``
    (``{init}-{budget}-s{seed}``) of the workspace of ``profile`` and ``data``. A name that is not a run there is an
    error naming the profiles and data that have it, and this workspace's runs."""
    text = os.fspath(run)
    if not text.strip():
        raise ValueError("run: expected a run folder or a run name like random-all-s0, got an empty string")
    folder = Path(text).expanduser()
    if isinstance(run, os.PathLike) or "/" in text or os.sep in text or \
            any((folder / marker).is_file() for marker in ("plans.json", "result.json")):
        if not folder.is_dir():
            raise FileNotFoundError(f"run folder {folder} does not exist")
        return folder.resolve()
    ws = workspace(profile, data)
    folder = ws.finetune_dir(text)
    if (folder / "result.json").is_file() or (folder / "plans.json").is_file():
        return folder
    elsewhere = sorted(p.parent for p in ws.root.glob(f"runs/*/*/finetune/{text}/result.json"))
    hint = ""
    if elsewhere:
        hint = "; it exists for " + ", ".join(f"profile {p.parents[1].name} on data {p.parents[2].name}"
                                               for p in elsewhere) + " (pass that PROFILE= and DATA=)"
    available = sorted(p.parent.name for p in ws.runs.glob("finetune/*/result.json"))
    raise FileNotFoundError(f"run {text!r} does not exist for profile {profile!r} on data {ws.tag} "
                            f"({folder} has no result.json){hint}; runs of this workspace: "
                            f"{available or 'none (run make finetune)'}; or give the path of a run folder")


def workspace(profile: str, data: str | None = "") -> Workspace:
    if not isinstance(profile, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", profile):
        raise ValueError(f"profile: expected a profile name like 'default', got {profile!r}")
    return Workspace(profile=profile, tag=data_tag(data), root=output_root())
