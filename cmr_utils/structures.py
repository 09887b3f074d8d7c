"""The heart structures the study segments, by label value (ACDC's convention; 0 is background): the one definition
that readers, preparation, training, metrics, plots and the viewer read. Imports nothing, so any module may."""
from __future__ import annotations

STRUCTURES: dict[int, str] = {1: "RV", 2: "MYO", 3: "LV"}  # right ventricle, myocardium, left ventricle
STRUCTURE_LABELS: dict[str, int] = {name: label for label, name in STRUCTURES.items()}
N_CLASSES = 1 + len(STRUCTURES)  # background and each structure: the segmentation model's outputs
