"""Helpers of the compendium "Self-supervised pretraining for cardiac MRI segmentation".

The notebooks in ``notebooks/`` tell the story; the logic they share, and that the tests reach, lives here,
one small module per concern:

- ``paths``     where data, runs and reports live (the only module that knows the layout)
- ``params``    parameter profiles (``params/<profile>.yaml``) and their validation
- ``readers``   one reader interface over the supported cardiac MRI layouts
- ``phantom``   the built-in synthetic cardiac MRI dataset (official ACDC layout)
- ``prepare``   patient-level splits and the 2D slice sets
- ``models``    the one model factory (ResNet18 backbone, FPN, every initialisation)
- ``ssl``       SimSiam and SwAV pretraining
- ``finetune``  segmentation fine-tuning, label budgets
- ``metrics``   IoU, Dice, HD95, ejection fraction; ``stats`` across seeds
- ``explain``   Seg-Grad-CAM and numbers for explanations; ``viewer`` the slice-by-slice widget
- ``report``    figures, tables and the colophon
"""

__version__ = "0.1.0"
