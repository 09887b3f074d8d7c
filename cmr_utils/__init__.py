"""Helpers of the compendium "Self-supervised pretraining for cardiac MRI segmentation".

The notebooks in ``notebooks/`` tell the story; the logic they share, and that the tests reach, lives here,
one small module (or subpackage) per concern:

- ``paths``          where data, runs and reports live (the only module that knows the layout)
- ``params``         parameter profiles (``params/<profile>.yaml``) and their validation
- ``plan``           the study's plan for one (profile, data): which runs exist and where they live
- ``dependencies``   what each stage depends on (modules read from the imports, parameter stamps), for Make
- ``files``          atomic writes: a reader never sees half a file or folder
- ``readers/``       one reader interface over the supported cardiac MRI layouts (``base``: the interface and
                     checked NIfTI / HDF5 reading; ``acdc``, ``decathlon``, ``la2018``, ``mnms``,
                     ``nifti_pairs``: one layout family each; ``layouts``: detection and ``open_source``)
- ``convert``        writes a labelled ACDC source in the other NIfTI layouts (``nifti-pairs``, ``mnms``)
- ``phantom``        the built-in synthetic cardiac MRI dataset (official ACDC layout)
- ``prepare``        stage 01: patient-level splits and the 2D slice sets
- ``structures``     the heart structures (1 RV, 2 MYO, 3 LV): the one label map every module reads
- ``geometry``       the one rule between a slice's original grid and the model's square grid
- ``augment``        joint image + label augmentation of whole batches
- ``encoders``       the ResNet18 backbone and its files
- ``models``         the one model factory (ResNet18 backbone, FPN, every initialisation)
- ``training``       what both training stages share about running PyTorch Lightning
- ``distributed``    several processes training one model (DDP): rank and each process's share of the data
- ``ssl/``           stage 02: self-supervised pretraining, one registry (``registry``) and one module per method
                     (``simsiam``, ``swav``, ``mim``, ``glcl``), with ``base``, ``views``, ``data``, ``collapse``,
                     ``checks``, ``train``
- ``finetune``       stage 03: segmentation fine-tuning on label budgets
- ``inference``      the one prediction path: label maps, logits and softmax probabilities in batches
- ``metrics``        IoU, Dice, HD95, volumes, ejection fraction
- ``evaluate``       stage 04: every run's model on the test split, on the model's and the original grid
- ``stats``          patient-level bootstrap intervals and paired comparisons across initialisations
- ``tables``         the report's tables of segmentation scores, from stage 04's per-run frames
- ``predict_scans``  segments new scans with a trained run, written as NIfTI on each input's own grid
- ``predict_command`` make predict's command line: light to import, one line on error or Ctrl-C
- ``dicom_seg``      a prediction as DICOM Segmentation objects referencing the source images
- ``plausibility``   flags a predicted label map that missed the heart (none, no LV, implausibly small)
- ``explain/``       stage 05: Seg-Grad-CAM (``cam``), its measures, faithfulness checks, slice selection,
                     numbers and figures; ``views``: stage 05's figures and numbers over the runs
- ``viewer``         the slice-by-slice explanation widget and its headless stand-in
- ``plots``          the compendium's figures (matplotlib, headless-safe), each with its alternative text
- ``figures``        the registry of the report's figure and table files: stage, producer, caption
- ``report``         stage 06: figures and tables gathered from the stages, and the colophon
"""

__version__ = "0.1.0"
