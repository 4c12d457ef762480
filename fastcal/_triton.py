"""The Triton backend: the kernels of :mod:`fastcal.kernels` behind the backend interface."""
from __future__ import annotations

import contextlib
import os

import torch


def require(device: torch.device) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (for tests)."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(
        f"backend: 'triton' needs CUDA tensors, got a tensor on {device}; use backend='torch' "
        "(or 'auto') for CPU tensors, or set TRITON_INTERPRET=1 before importing triton to run "
        "the kernels in the (slow) interpreter"
    )


def _on_device(device: torch.device):
    """Kernels launch on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def prototype_stats(logits, temperature, valid, deterministic=False, upsample=None, confidence_power=1.0):
    from .kernels.stats import prototype_stats as stats

    with _on_device(logits.device):
        return stats(logits, temperature, valid, deterministic, upsample, confidence_power)


def predict(logits, prototypes, temperature, label_dtype=torch.int64, upsample=None):
    from .kernels.predict import predict as predict_labels

    with _on_device(logits.device):
        return predict_labels(logits, prototypes, temperature, label_dtype, upsample)


def scores(logits, prototypes, temperature, upsample=None):
    from .kernels.predict import scores as predict_scores

    with _on_device(logits.device):
        return predict_scores(logits, prototypes, temperature, upsample)
