"""Small helpers shared by the fast backends."""
from __future__ import annotations

import torch


def split_skipped(prototypes: torch.Tensor):
    """Prepare prototypes for ``||P[k]||^2 - 2 p . P[k]``.

    Returns ``(P, sq_norms)`` in float32: NaN rows ("skip" classes) become zero
    rows with an infinite squared norm, so their distance is ``+inf`` and they
    are never the argmin while any other class is left.
    """
    P = prototypes.float()
    skipped = torch.isnan(P).all(dim=1)
    P = torch.where(skipped[:, None], torch.zeros((), device=P.device), P).contiguous()
    sq_norms = (P * P).sum(dim=1)
    sq_norms = torch.where(skipped, torch.full_like(sq_norms, float("inf")), sq_norms)
    return P, sq_norms
