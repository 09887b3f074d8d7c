"""The 2018 Atrial Segmentation Challenge in UA-MT's HDF5 (``la2018-h5``): ``<case>/mri_norm2.h5``, Z last."""
from __future__ import annotations

import numpy as np

from .base import LA_LABELS, CardiacVolume, DataError, Source, _check_image, _check_label, _depth, _h5_shape, _read_h5


class La2018H5(Source):
    layout = "la2018-h5"
    description = "2018 Atrial Segmentation Challenge (UA-MT HDF5): <case>/mri_norm2.h5, Z last"
    labels = LA_LABELS

    @classmethod
    def matches(cls, folder):
        return any((p / "mri_norm2.h5").is_file() for p in folder.iterdir() if p.is_dir())

    def patients(self):
        return sorted(p.name for p in self.folder.iterdir() if (p / "mri_norm2.h5").is_file())

    def volumes(self, patients=None):
        for case in self._select(patients):
            path = self.folder / case / "mri_norm2.h5"
            image, label = _read_h5(path)
            if image.ndim != 3:
                raise DataError(f"{path}: expected a 3D (X, Y, Z) image, got shape {image.shape}")
            image = _check_image(np.transpose(image, (2, 1, 0)), path)  # (X, Y, Z) -> (Z, Y, X)
            label = _check_label(np.transpose(label, (2, 1, 0)) if label.ndim == 3 else label, image, path,
                                 self.labels)
            yield CardiacVolume(case, "3D", image, label, None, self.layout, path, None, None, self.labels)

    def n_slices(self, patient):
        self._select([patient])
        path = self.folder / patient / "mri_norm2.h5"
        return _depth(_h5_shape(path), 2, path)  # (X, Y, Z): Z last

    def files(self):
        return [self.folder / c / "mri_norm2.h5" for c in self.patients()]
