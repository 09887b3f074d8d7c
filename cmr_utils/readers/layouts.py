"""The registry of layouts and the entry point: which layout a folder holds (``detect_layout``,
``locate_layout``) and its reader (``open_source``)."""
from __future__ import annotations

import sys
from pathlib import Path

from .acdc import AcdcH5, AcdcNifti
from .base import DataError, Source
from .decathlon import Decathlon
from .dicom import Dicom
from .la2018 import La2018H5
from .mnms import MnMs
from .nifti_pairs import NiftiPairs

# the first layout that matches a folder reads it: nifti-pairs, the most general, comes last
LAYOUTS: dict[str, type[Source]] = {cls.layout: cls for cls in (AcdcNifti, AcdcH5, Decathlon, La2018H5, MnMs,
                                                                  Dicom, NiftiPairs)}


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise DataError(f"{folder}: data folder does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder}: expected a folder of cardiac MRI, got a file")
    if not any(folder.iterdir()):
        raise DataError(f"{folder}: data folder is empty")


def _layout_of(folder: Path) -> str | None:
    return next((name for name, cls in LAYOUTS.items() if cls.matches(folder)), None)


def detect_layout(folder: str | Path) -> str:
    """The layout of ``folder`` itself (``locate_layout`` also looks one level down)."""
    folder = Path(folder)
    _check_folder(folder)
    name = _layout_of(folder)
    if name is None:
        expected = "\n".join(f"  - {cls.layout}: {cls.description}" for cls in LAYOUTS.values())
        raise DataError(f"{folder}: unrecognised data layout; expected one of:\n{expected}")
    return name


def locate_layout(folder: str | Path) -> tuple[Path, str]:
    """``(data folder, layout)``: ``folder`` itself when it holds a known layout, else its one subfolder that
    does (e.g. the SSL4MIS download ``data/ACDC/`` -> ``ACDC_training_volumes/``, said on stderr). Several
    such subfolders are an error that names them."""
    folder = Path(folder)
    _check_folder(folder)
    name = _layout_of(folder)
    if name is not None:
        return folder, name
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    candidates = [(sub, layout) for sub in subfolders if (layout := _layout_of(sub)) is not None]
    if len(candidates) == 1:
        sub, layout = candidates[0]
        print(f"data: {folder} holds no known layout itself; reading its subfolder {sub.name}/ ({layout})",
              file=sys.stderr)
        return sub, layout
    if len(candidates) > 1:
        names = ", ".join(f"{sub.name}/ ({layout})" for sub, layout in candidates)
        raise DataError(f"{folder}: no known layout here, but several subfolders hold one: {names}; "
                        "name the one to use")
    return folder, detect_layout(folder)  # raises the unrecognised-layout error with the list of layouts


def open_source(folder: str | Path, *, label_map: dict | str | None = None) -> Source:
    """Recognise the layout of ``folder`` (or of its one subfolder that has one) and return its reader.

    ``label_map`` (nifti-pairs only): ``{value in the label files: ACDC label}``; see ``NiftiPairs``."""
    folder, layout = locate_layout(folder)
    if label_map is not None and layout != NiftiPairs.layout:
        raise DataError(f"{folder}: label_map applies to the nifti-pairs layout; this folder is {layout}, whose "
                        f"labels the reader maps itself")
    source = NiftiPairs(folder, label_map) if layout == NiftiPairs.layout else LAYOUTS[layout](folder)
    if not source.patients():
        raise DataError(f"{folder}: no patients found for layout {source.layout}")
    return source
