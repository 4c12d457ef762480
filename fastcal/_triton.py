"""The Triton backend: the kernels of :mod:`fastcal.kernels` behind the backend interface."""
from __future__ import annotations

import contextlib
import os

import torch

from . import _space, reference
from ._operands import DistanceOperands

REQUIRES = ("the Triton kernels take CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, set before "
            "importing triton: the slow interpreter)")


def can_run(logits, limit: bool = False) -> bool:
    """CUDA tensors (meta ones too: launches built, not run, ``fastcal._plan.meta_plan``), or CPU
    tensors under ``TRITON_INTERPRET=1`` (for tests); the kernels take the limit as any temperature."""
    device = logits.device.type
    interpreted = device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    return device in ("cuda", "meta") or interpreted


def _on_device(device: torch.device):
    """Kernels launch on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def stats_pass(logits, valid, plan):
    from .kernels.stats import prototype_stats  # the kernels import triton: on first use

    with _on_device(logits.device):
        return prototype_stats(logits, plan.temperature, valid, plan.deterministic, plan.upsample,
                               plan.confidence_power)


def predict_pass(logits, operands, plan):
    from .kernels.predict import predict  # the kernels import triton: on first use

    with _on_device(logits.device):
        return predict(logits, operands, plan.temperature, plan.label_dtype, plan.upsample)


def scores_pass(logits, operands, plan):
    from .kernels.predict import scores  # the kernels import triton: on first use

    with _on_device(logits.device):
        return scores(logits, operands, plan.temperature, plan.upsample)


def prototype_operands(prototypes: torch.Tensor):
    """Caller-given prototypes prepared on the device in one launch of the operands kernel, nothing
    read back: they enter as sums ``S = P`` with weights ``W = 1``, a NaN row (a class never
    predicted) as an empty class skipped. Beyond one block of classes, as the reference prepares
    them (a few small launches)."""
    from .kernels.configs import FUSED_MAX_CLASSES  # the kernels import triton: on first use

    if prototypes.shape[0] > FUSED_MAX_CLASSES:
        return DistanceOperands(prototypes.detach())
    P = prototypes.detach().double()
    skipped = torch.isnan(P).all(dim=1)
    return _fused_operands(torch.nan_to_num(P, nan=0.0), (~skipped).double(), True)


def operands_pass(S, W, plan):
    """The prototypes and the predict pass's padded operands in one launch (``kernels/prototypes.py``)
    where one block of the predict pass holds every class at a finite temperature; else (more
    classes, or the limit's empty rows, ``fastcal._space.empty_rows``) as the reference builds them."""
    from .kernels.configs import FUSED_MAX_CLASSES  # the kernels import triton: on first use

    if W.shape[0] > FUSED_MAX_CLASSES or _space.is_limit(plan.temperature):
        return reference.operands_pass(S, W, plan)
    return _fused_operands(S, W, plan.empty == "skip")


def _fused_operands(S, W, skip: bool):
    """One launch of the operands kernel: the prototypes ``S[k] / W[k]`` and the predict pass's
    operands, padded to the class block that holds every class."""
    from .kernels.predict import predict_config  # the kernels import triton: on first use
    from .kernels.prototypes import operands

    c_block = predict_config(W.shape[0])["C_BLOCK"]
    with _on_device(W.device):
        P, A, centre, bias = operands(S, W, skip, c_block)
    return DistanceOperands(P, padded={c_block: (A, centre, bias)})
