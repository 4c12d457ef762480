"""Between the two passes of ``calibrate``: the prototypes and the predict pass's operands, in one
launch.

Math (float64, one program, ``C <= FUSED_MAX_CLASSES``; as ``fastcal.reference.prototypes_from_stats``
and ``fastcal._operands.centred_prototypes``)::

    P[k]    = S[k] / W[k]                       empty class (W[k] = 0): e_k, or NaN with SKIP
    kept[k] = not (SKIP and W[k] = 0)           a row of NaN is never predicted
    c       = (sum_{kept k} P[k]) / max(#kept, 1)          rounded to float32
    A[k]    = P[k] - c  (kept k; else 0)        bias[k] = ||A[k]||^2  (kept k; else +inf)

``P`` is rounded to float32 first, as the prototypes a caller would pass; ``A``, ``c`` and
``bias`` are written zero-padded to ``C_PAD`` classes (``bias = +inf`` there), the layout
``_predict_kernel`` reads. The same steps as PyTorch operations are some thirty launches of
a few elements each: on the host, tens of microseconds a call.

Memory traffic: reads ``8 (C^2 + C)`` bytes, writes ``4 (C^2 + C_PAD^2 + 2 C_PAD)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import Launch
from .configs import TARGETS, target_of


@triton.jit
def _operands_kernel(S_ptr, W_ptr, P_ptr, A_ptr, centre_ptr, bias_ptr, C, C_PAD,
                     SKIP: tl.constexpr, C_BLOCK: tl.constexpr):
    o_k = tl.arange(0, C_BLOCK)
    o_j = tl.arange(0, C_BLOCK)
    m_k = o_k < C
    m_j = o_j < C
    m_kj = m_k[:, None] & m_j[None, :]
    b_S = tl.load(S_ptr + o_k[:, None] * C + o_j[None, :], mask=m_kj, other=0.0).to(tl.float64)
    b_W = tl.load(W_ptr + o_k, mask=m_k, other=0.0).to(tl.float64)
    m_empty = b_W == 0.0
    b_P = b_S / tl.where(m_empty, 1.0, b_W)[:, None]
    if SKIP:
        b_fill = tl.full((C_BLOCK, C_BLOCK), float("nan"), tl.float64)
        m_kept = m_k & ~m_empty
    else:
        b_fill = (o_k[:, None] == o_j[None, :]).to(tl.float64)
        m_kept = m_k
    b_P = tl.where(m_empty[:, None], b_fill, b_P).to(tl.float32)
    tl.store(P_ptr + o_k[:, None] * C + o_j[None, :], b_P, mask=m_kj)

    m_kept_kj = m_kept[:, None] & m_j[None, :]
    b_kept = tl.where(m_kept_kj, b_P.to(tl.float64), 0.0)
    n_kept = tl.maximum(tl.sum(m_kept.to(tl.float64), axis=0), 1.0)
    b_centre = (tl.sum(b_kept, axis=0) / n_kept).to(tl.float32)
    b_A = tl.where(m_kept_kj, b_kept - b_centre.to(tl.float64)[None, :], 0.0)
    b_bias = tl.where(m_kept, tl.sum(b_A * b_A, axis=1), float("inf"))
    m_pad_k = o_k < C_PAD
    tl.store(A_ptr + o_k[:, None] * C_PAD + o_j[None, :], b_A.to(tl.float32),
             mask=m_pad_k[:, None] & (o_j < C_PAD)[None, :])
    tl.store(centre_ptr + o_j, tl.where(m_j, b_centre, 0.0), mask=o_j < C_PAD)
    tl.store(bias_ptr + o_k, b_bias.to(tl.float32), mask=m_pad_k)


def operands_launch(S: torch.Tensor, W: torch.Tensor, skip: bool, c_block: int, target: str | None = None):
    """The launch, and the tensors it fills: ``(launch, P [C, C], A [C_PAD, C_PAD], c [C_PAD],
    bias [C_PAD])`` with ``C_PAD = c_block`` (one block of the predict pass holds every class).
    ``target``: the configuration table (default: the device's, ``configs.target_of``)."""
    C, device = W.shape[0], W.device
    table = TARGETS[target] if target else target_of(device)
    P = torch.empty(C, C, dtype=torch.float32, device=device)
    A = torch.empty(c_block, c_block, dtype=torch.float32, device=device)
    centre = torch.empty(c_block, dtype=torch.float32, device=device)
    bias = torch.empty(c_block, dtype=torch.float32, device=device)
    launch = Launch(_operands_kernel, (1,), (S, W, P, A, centre, bias, C, c_block),
                    {"SKIP": skip, "C_BLOCK": c_block},
                    {"num_warps": table.operands["num_warps"]["large" if c_block >= 64 else "small"],
                     "num_stages": table.operands["num_stages"]})
    return launch, P, A, centre, bias


def operands(S: torch.Tensor, W: torch.Tensor, skip: bool, c_block: int):
    """``(P, A, c, bias)``, see :func:`operands_launch`."""
    launch, *tensors = operands_launch(S, W, skip, c_block)
    launch()
    return tensors
