"""Small helpers shared by the fast backends."""
from __future__ import annotations

import torch


def centred_prototypes(prototypes: torch.Tensor):
    """Prototypes prepared for the expanded distance, centred so that it keeps float32 precision.

    For any vector ``c``, with ``d = p - c`` and ``A[k] = P[k] - c``::

        ||p - P[k]||^2 = ||d||^2 + ||A[k]||^2 - 2 d . A[k]

    and ``||d||^2`` is the same for every k, so ``argmin_k ||A[k]||^2 - 2 d . A[k]`` is the label.
    Uncentred (``c = 0``) the terms are of the size of ``||P[k]||^2`` while the distances can be
    far smaller (at a high temperature every ``p`` and every prototype is close to uniform):
    the differences that decide a label drown in the rounding of the large terms. With ``c``
    the mean of the prototypes every term is bounded by a few times the largest distance of
    the pixel, so the rounding error is relative to the distances themselves, as in the direct
    form ``sum_j (p_j - P[k, j])^2``.

    Returns ``(A, c, bias)`` in float32: ``A`` [C, C], ``c`` [C] and ``bias[k] = ||A[k]||^2``.
    NaN rows ("skip" classes) get a zero row in ``A`` and ``bias = +inf``, so their distance is
    ``+inf`` and they are never the argmin while any other class is left.
    """
    P = prototypes.double()
    skipped = torch.isnan(P).all(dim=1)
    kept = torch.where(skipped[:, None], torch.zeros((), dtype=P.dtype, device=P.device), P)
    # the mean of the kept rows without indexing by a mask, which would read the mask back (on CUDA
    # a synchronisation, which a captured CUDA graph cannot contain)
    c = (kept.sum(dim=0) / (~skipped).sum().clamp_min(1)).float()
    A = torch.where(skipped[:, None], torch.zeros((), dtype=P.dtype, device=P.device), P - c.double())
    bias = (A * A).sum(dim=1)
    bias = torch.where(skipped, torch.full_like(bias, float("inf")), bias)
    return A.float().contiguous(), c.contiguous(), bias.float()
