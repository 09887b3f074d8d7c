"""The heart structures the study segments, by label value (ACDC's convention; 0 is background): the one definition
that readers, preparation, training, metrics, plots and the viewer read. Imports nothing, so any module may."""
from __future__ import annotations

from numbers import Integral

STRUCTURES: dict[int, str] = {1: "RV", 2: "MYO", 3: "LV"}  # right ventricle, myocardium, left ventricle
STRUCTURE_LABELS: dict[str, int] = {name: label for label, name in STRUCTURES.items()}
N_CLASSES = 1 + len(STRUCTURES)  # background and each structure: the segmentation model's outputs


def structure_label(structure) -> int:
    """Label of a structure given as its label (1, 2, 3) or its name ("RV", "MYO", "LV")."""
    if isinstance(structure, str):
        if structure not in STRUCTURE_LABELS:
            raise ValueError(f"structure must be one of {sorted(STRUCTURE_LABELS)}, got {structure!r}")
        return STRUCTURE_LABELS[structure]
    if isinstance(structure, bool) or not isinstance(structure, Integral):  # numpy integers are Integral
        raise TypeError(f"structure must be a label {sorted(STRUCTURES)} or a name, got {structure!r}")
    if int(structure) not in STRUCTURES:
        raise ValueError(f"structure must be one of the labels {sorted(STRUCTURES)}, got {structure}")
    return int(structure)
