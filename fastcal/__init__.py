"""fastcal: label calibration for semantic segmentation under domain shift.

Fused Triton kernels on CUDA (:mod:`fastcal._triton`), fused CPU loops compiled by Numba for
CPU tensors (:mod:`fastcal.numba_backend`, with PyTorch operations where they cannot go:
:mod:`fastcal.torch_ops`), and a plain reference implementation (:mod:`fastcal.reference`)
they are all checked against. :func:`fastcal._backends.resolve` chooses among them.
"""
from . import (
    _process,  # noqa: F401  (first: the fork hook, before any op runs)
    nn,  # noqa: F401  (fastcal.nn.LabelCalibration, the model wrapper)
)
from ._version import __version__
from .api import calibrate, predict, prototype_stats, prototypes_from_stats
from .calibrator import LabelCalibrator

__all__ = ["calibrate", "predict", "prototype_stats", "prototypes_from_stats", "LabelCalibrator", "__version__"]
