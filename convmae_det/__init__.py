"""convmae_det: ConvMAE-family backbones from pretraining to Detectron2 detection and segmentation.

Importing the package applies the compatibility fixes for the pinned detectron2 snapshot
(:mod:`convmae_det.compat`).
"""

from . import compat as _compat

_compat.apply_all()

__version__ = "0.1.0"
