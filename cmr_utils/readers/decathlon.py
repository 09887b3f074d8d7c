"""The Medical Segmentation Decathlon's Task02_Heart (``decathlon``): ``imagesTr/`` and ``labelsTr/``."""
from __future__ import annotations

from pathlib import Path

from .base import (LA_LABELS, CardiacVolume, Source, _check_image, _check_label, _depth, _nifti_shape,
                   _read_nifti, _spacing)


class Decathlon(Source):
    layout = "decathlon"
    description = "Medical Segmentation Decathlon Task02_Heart: imagesTr/la_NNN.nii.gz, labelsTr/la_NNN.nii.gz"
    labels = LA_LABELS
    has_spacing = True

    @classmethod
    def matches(cls, folder):
        return (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir()

    def _images(self) -> list[Path]:
        # macOS archives of the Decathlon carry '._la_003.nii.gz' resource files: skip hidden names
        return sorted(p for p in (self.folder / "imagesTr").glob("*.nii.gz") if not p.name.startswith("."))

    def patients(self):
        return [p.name[: -len(".nii.gz")] for p in self._images()]

    def volumes(self, patients=None):
        for case in self._select(patients):
            img_path = self.folder / "imagesTr" / f"{case}.nii.gz"
            lab_path = self.folder / "labelsTr" / f"{case}.nii.gz"
            image, zooms = _read_nifti(img_path)
            image = _check_image(image, img_path)
            label = None
            if lab_path.exists():
                label, _ = _read_nifti(lab_path)
                label = _check_label(label, image, lab_path, self.labels)
            yield CardiacVolume(case, "3D", image, label, _spacing(zooms, img_path), self.layout, img_path,
                                None, None, self.labels)

    def n_slices(self, patient):
        self._select([patient])
        path = self.folder / "imagesTr" / f"{patient}.nii.gz"
        return _depth(_nifti_shape(path), 2, path)  # nibabel's (X, Y, Z)

    def files(self):
        meta = [self.folder / "dataset.json"] if (self.folder / "dataset.json").exists() else []
        labels = [self.folder / "labelsTr" / p.name for p in self._images()]
        return meta + self._images() + [p for p in labels if p.exists()]
