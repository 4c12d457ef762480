"""fastcal: label calibration for semantic segmentation under domain shift.

Fused Triton kernels on CUDA, fused CPU loops compiled by Numba for CPU tensors
(:mod:`fastcal.torch_backend`), and a plain reference implementation
(:mod:`fastcal.reference`) they are all checked against.
"""
from . import _process  # noqa: F401  (first: the fork hook, before any op runs)
from .api import calibrate, predict, prototype_stats, prototypes_from_stats
from .calibrator import LabelCalibrator
from . import nn  # noqa: F401  (fastcal.nn.LabelCalibration, the model wrapper)

__all__ = ["calibrate", "predict", "prototype_stats", "prototypes_from_stats", "LabelCalibrator"]
__version__ = "0.1.0"
