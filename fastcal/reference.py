"""Label calibration in plain PyTorch, line for line as in the paper.

This is the oracle every faster backend is tested against: clear before fast.
It materialises the softmax of the whole batch (float32, class axis last), so it
needs several times the memory of the logits.

    p(x)    = softmax(z(x) / T)                 over the class axis
    cls(x)  = argmax_k z(x)_k                   lowest k on ties
    conf(x) = max_k p(x)_k
    w(x)    = conf(x) ** gamma                  the confidence power (gamma = 1 in the paper)
    S[k, :] = sum_{x: cls(x)=k} w(x) p(x)       W[k] = sum_{x: cls(x)=k} w(x)
    P[k]    = S[k] / W[k]
    label(x) = argmin_k ||p(x) - P[k]||^2       lowest k on ties
    score(x)_k = -||p(x) - P[k]||^2

At ``T = math.inf`` (the limit) ``p(x)`` is the centred logits ``z - mean z`` and ``w(x) = 1``
(:mod:`fastcal._space`); the rest reads the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _space
from ._operands import DistanceOperands

REQUIRES = "any tensor"
prototype_operands = None  # a caller's prototypes: prepared as fastcal._operands does


def can_run(logits, limit: bool = False) -> bool:
    """Every call: the paper's math in PyTorch operations, on any device, at any temperature."""
    return True


def upsampled(logits: torch.Tensor, upsample) -> torch.Tensor:
    """``F.interpolate`` (bilinear) of the float32 logits, with the caller's ``size`` or ``scale_factor``."""
    resize = {"size": upsample.size} if upsample.scale_factor is None else {"scale_factor": upsample.scale_factor}
    return F.interpolate(logits.float(), mode="bilinear", align_corners=upsample.align_corners, **resize)


def soft_labels(logits: torch.Tensor, temperature: float, confidence_power: float = 1.0):
    """Per pixel, class last: ``p`` [..., C], ``cls`` [...] and the weight ``w = conf ** power``
    [...], in float32 (at the limit: the centred logits and 1; see :func:`fastcal._space.pixel_vectors`)."""
    z = logits.movedim(1, -1).float()
    p, weight = _space.pixel_vectors(z, temperature, confidence_power)
    return p, z.argmax(dim=-1), weight


def prototype_stats(logits: torch.Tensor, temperature: float, valid: torch.Tensor | None = None,
                    upsample=None, confidence_power: float = 1.0):
    """``S`` [C, C], ``W`` [C] and the pixel count ``N`` [C] per argmax class in float64, and the
    number of valid pixels with a non-finite logit (a 0-dim tensor: the caller reads it).

    Logits are read as float32, so a float64 logit beyond float32's range is non-finite. With
    ``upsample``, the statistics of ``F.interpolate`` of the float32 logits. A pixel left out
    (masked, or non-finite) weighs 0 and counts 0, so nothing is indexed by a mask (which would
    read the mask back)."""
    if upsample is not None:
        logits = upsampled(logits, upsample)
    num_classes = logits.shape[1]
    p, cls, weight = soft_labels(logits, temperature, confidence_power)
    finite = torch.isfinite(logits.movedim(1, -1).float()).all(dim=-1)
    used = finite if valid is None else valid & finite
    zero = torch.zeros((), device=p.device)
    weight = torch.where(used, weight, zero).double()
    p = torch.where(used[..., None], p, zero).double()  # a non-finite pixel's p is NaN
    cls = cls.reshape(-1)
    S = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=logits.device)
    S.index_add_(0, cls, (weight[..., None] * p).reshape(-1, num_classes))
    W = torch.zeros(num_classes, dtype=torch.float64, device=logits.device).index_add_(0, cls, weight.reshape(-1))
    N = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
    N.index_add_(0, cls, used.reshape(-1).double())
    nonfinite = ~finite if valid is None else valid & ~finite
    return S, W, N, nonfinite.sum()


def prototypes_from_stats(S: torch.Tensor, W: torch.Tensor, empty: str, temperature: float = 1.0) -> torch.Tensor:
    """``P[k] = S[k] / W[k]``; an empty class gets ``e_k`` ("onehot") or a NaN row ("skip"); at the
    limit a NaN row while any class has weight (see :func:`fastcal._space.empty_rows`)."""
    is_empty = (W == 0)[:, None]
    P = S.double() / torch.where(is_empty, 1.0, W.double()[:, None])
    return torch.where(is_empty, _space.empty_rows(W, empty, temperature), P).float()


def _distance_blocks(logits: torch.Tensor, prototypes: torch.Tensor, temperature: float, upsample):
    """Yield ``(block, distance)``: ``||p(x) - P[k]||^2`` [n, C] for the pixels ``block`` of the flat
    [N * spatial] pixel order, with ``+inf`` for a NaN row of ``prototypes``. Returns the soft-label
    shape [N, *spatial, C] first.

    The pixels x classes x classes differences are formed a block of pixels at a time, so memory
    stays bounded (about 64 MiB) whatever the batch size.
    """
    if upsample is not None:
        logits = upsampled(logits, upsample)
    p, _, _ = soft_labels(logits, temperature)
    P = prototypes.float()
    skipped = torch.isnan(P).all(dim=1)
    pixels = p.reshape(-1, P.shape[0])
    yield p.shape
    block = max(1, (1 << 24) // P.numel())
    for start in range(0, pixels.shape[0], block):
        distance = ((pixels[start:start + block, None, :] - P) ** 2).sum(dim=-1)
        distance = torch.where(skipped, float("inf"), distance)
        yield slice(start, start + block), distance


def predict(logits: torch.Tensor, prototypes: torch.Tensor, temperature: float, label_dtype=torch.int64,
            upsample=None):
    """``argmin_k ||p(x) - P[k]||^2``; a NaN row of ``prototypes`` is never chosen."""
    blocks = _distance_blocks(logits, prototypes, temperature, upsample)
    shape = next(blocks)
    labels = torch.empty(shape[:-1].numel(), dtype=torch.int64, device=logits.device)
    for block, distance in blocks:
        labels[block] = distance.argmin(dim=-1)
    return labels.view(shape[:-1]).to(label_dtype)


def scores(logits: torch.Tensor, prototypes: torch.Tensor, temperature: float, upsample=None):
    """``-||p(x) - P[k]||^2`` as float32 [N, C, *spatial] (``-inf`` for a NaN row of ``prototypes``):
    the argmax over classes is :func:`predict`'s label."""
    blocks = _distance_blocks(logits, prototypes, temperature, upsample)
    shape = next(blocks)
    out = torch.empty(shape.numel(), dtype=torch.float32, device=logits.device).view(-1, shape[-1])
    for block, distance in blocks:
        out[block] = -distance
    return out.view(shape).movedim(-1, 1).contiguous()


# ----- the backend interface (see fastcal._plan): the functions above, run with a plan ----------
def stats_pass(logits, valid, plan):
    return prototype_stats(logits, plan.temperature, valid, plan.upsample, plan.confidence_power)


def predict_pass(logits, operands, plan):
    return predict(logits, operands.prototypes, plan.temperature, plan.label_dtype, plan.upsample)


def scores_pass(logits, operands, plan):
    return scores(logits, operands.prototypes, plan.temperature, plan.upsample)


def operands_pass(S, W, plan):
    return DistanceOperands(prototypes_from_stats(S, W, plan.empty, plan.temperature))
