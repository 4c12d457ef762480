"""Where a pixel lives: what it adds to the statistics and where its distance is measured.

Label calibration measures every pixel by a vector ``v`` and a weight ``w``, set by the temperature::

    finite T:   v = softmax(z / T),        w = max_k v_k ** gamma     (the paper: T = 1, gamma = 1)
    T = inf:    v = z - mean_j z_j,        w = 1                      (the limit; gamma has no effect)

and the rest is the same for both: over the valid pixels whose argmax logit is ``k``,
``S[k] += w v``, ``W[k] += w``, ``N[k] += 1``; the prototypes are ``P[k] = S[k] / W[k]``; a pixel's
label is ``argmin_k ||v - P[k]||^2`` (lowest k on ties) and its scores ``-||v - P[k]||^2``.

**The limit.** For large T, ``softmax(z / T) = 1/C + (z - mean z) / (C T) + O(1/T^2)`` and every
confidence tends to ``1/C``: the weights become equal and the distances, scaled by ``(C T)^2``,
become those of the centred logits. ``temperature=math.inf`` computes that limit exactly, with no
exponential (never as a large finite T): the statistics are an argmax and a sum, prediction a
C x C linear map and an argmin. Each ``P[k]`` then sums to 0, so ``||v - P[k]||^2`` differs from
``||z - P[k]||^2 - ...`` only by terms equal for every k: the mean of ``z`` drops out of the label.

**Empty classes at the limit.** A one-hot prototype is infinitely far from every near-uniform
``p``, so an empty class is never chosen while any class has statistics (its row is NaN, as with
``empty="skip"``). With no statistics at all, ``"onehot"`` gives the argmax (the centred one-hot
rows ``e_k - 1/C``: ``||v - (e_k - 1/C)||^2 = const - 2 v_k``) and ``"skip"`` raises, as at any T.

**One seam.** Every backend reads the space from ``inv_temperature`` (:func:`inverse`): ``1 / T``,
and exactly 0 at the limit, which no accepted finite T gives. The reference, torch-ops and the
export head build the vectors with :func:`pixel_vectors` or its chunked twin in
:mod:`fastcal.torch_ops`; the fused CPU loops branch once per block in ``cpu_kernels._block_exp``, ``_stats_block`` and
``_centred_block``; the Triton kernels take a ``LIMIT`` constexpr (``kernels/stats.py``,
``kernels/predict.py``); the empty rows of the prototypes come from :func:`empty_rows` (and its twin in
``cpu_kernels.prototypes_from_sums``).
"""
from __future__ import annotations

import math

import torch

LIMIT = math.inf


def is_limit(temperature) -> bool:
    """Whether ``temperature`` (a checked float) is the limit ``math.inf``."""
    return temperature == LIMIT


def inverse(temperature: float) -> float:
    """``1 / T``, 0 at the limit: how every backend is told which space it works in."""
    return 0.0 if is_limit(temperature) else 1.0 / temperature


def pixel_vectors(z: torch.Tensor, temperature: float, confidence_power: float = 1.0):
    """``(v, w)`` of the pixels ``z`` [..., C] (float32, class axis last): ``v`` [..., C] float32 and
    ``w`` [...] float32 as the module docstring defines them.

    The max logit is subtracted first (softmax does not change; at the limit the centring is then
    of numbers near 0), so no finite float32 logit and no accepted temperature overflows."""
    shifted = z - z.amax(dim=-1, keepdim=True)
    if is_limit(temperature):
        return shifted - shifted.mean(dim=-1, keepdim=True), torch.ones_like(shifted[..., 0])
    p = torch.softmax(shifted / temperature, dim=-1)
    return p, p.amax(dim=-1) ** confidence_power


def empty_rows(W: torch.Tensor, empty: str, temperature: float) -> torch.Tensor:
    """[C, C] float64: the prototype rows of empty classes (``W[k] == 0``), on ``W``'s device, built
    without reading ``W`` back: ``e_k`` (``"onehot"``) or NaN (``"skip"``, never chosen) at a finite
    T; at the limit NaN while any class has weight, else the centred one-hot ``e_k - 1/C``
    (``"onehot"``: the argmax)."""
    C = W.shape[0]
    eye = torch.eye(C, dtype=torch.float64, device=W.device)
    nan = torch.full((), math.nan, dtype=torch.float64, device=W.device)
    if empty == "skip":
        return nan.expand(C, C)
    if not is_limit(temperature):
        return eye
    return torch.where((W == 0).all(), eye - 1.0 / C, nan)
