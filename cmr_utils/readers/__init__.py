"""One reader interface for every supported cardiac MRI layout.

``open_source(folder)`` recognises the layout of a folder and returns a ``Source`` whose ``volumes()``
yield ``CardiacVolume`` objects: image (Z, H, W) float32, label (Z, H, W) uint8 or None, voxel spacing
(z, y, x) in mm when the files carry it, patient id, phase (ED / ES, or the cine frame) and source name.
``n_slices(patient)`` / ``slice_counts()`` give the number of 2D slices of those labelled volumes (the sum of
their Z) from the file headers and HDF5 dataset shapes only, without reading any voxel (the plan uses it).

Supported layouts (see ``LAYOUTS``):

=================  ==================================================================  ============
layout             files                                                               spacing
=================  ==================================================================  ============
``acdc-nifti``     official ACDC release: ``patientNNN/patientNNN_frameFF[_gt].nii.gz``,  from header
                   ``patientNNN_4d.nii.gz``, ``Info.cfg``
``acdc-h5``        SSL4MIS / WSL4MIS HDF5: ``patientNNN_frameFF.h5`` (``image``, ``label``,  none
                   Z first); ED = the lower frame number of a patient
``decathlon``      Medical Segmentation Decathlon Task02_Heart: ``imagesTr/la_NNN.nii.gz``,  from header
                   ``labelsTr/la_NNN.nii.gz``, ``dataset.json``
``la2018-h5``      2018 Atrial Segmentation Challenge, UA-MT HDF5: ``<case>/mri_norm2.h5``   none
                   (``image``, ``label``, Z last)
``mnms``           M&Ms challenge release: ``<code>/<code>_sa.nii.gz`` (4D cine),          from header
                   ``<code>/<code>_sa_gt.nii.gz`` (ED and ES frames labelled 1 LV, 2 MYO,
                   3 RV; remapped to ACDC's), the release's CSV (vendor, centre, ED, ES)
``dicom``          DICOM files as a scanner exports them, any depth, grouped by PatientID  from headers
                   and SeriesInstanceUID, ordered by the headers (``readers.dicom``);
                   Sunnybrook's ``contourfiles/`` + ``link.csv`` label LV and MYO
``nifti-pairs``    a folder of ``<case>.nii.gz`` (3D, or 4D cine) with an optional          from header
                   ``<case>_gt.nii.gz`` beside each; ACDC's labels unless remapped
=================  ==================================================================  ============

A folder that holds no layout itself but whose one subfolder does (the SSL4MIS download:
``data/ACDC/ACDC_training_volumes/``) is read from that subfolder (``locate_layout``; a line on stderr says
which); with several such subfolders the error names them.

``Source.scans()`` yields the image *files* of a source (``Scan``: a 3D volume, or every frame of a 4D cine),
which ``cmr_utils.predict_scans`` segments and writes back as NIfTI beside the input's header.

The source data are only ever read. Every problem with a file raises ``DataError`` naming the file.
"""
from .acdc import AcdcH5, AcdcNifti, parse_info_cfg
from .base import ACDC_LABELS, LA_LABELS, CardiacVolume, DataError, Scan, Source, parse_label_map
from .decathlon import Decathlon
from .dicom import Dicom
from .la2018 import La2018H5
from .layouts import LAYOUTS, detect_layout, locate_layout, open_source
from .mnms import MnMs
from .nifti_pairs import NiftiPairs

__all__ = [
    "ACDC_LABELS", "LA_LABELS", "LAYOUTS", "AcdcH5", "AcdcNifti", "CardiacVolume", "DataError", "Decathlon", "Dicom",
    "La2018H5", "MnMs", "NiftiPairs", "Scan", "Source", "detect_layout", "locate_layout", "open_source",
    "parse_info_cfg", "parse_label_map",
]
