"""The PyTorch fast path, for CPU tensors.

Same math as :mod:`fastcal.reference`, restructured for memory and speed: the
pixels are walked in chunks of about ``CHUNK_ELEMENTS`` logits, read in the
tensor's own layout (no permuted copy of the batch), and every intermediate is a
chunk-sized buffer. Within a chunk the sums run in float32; chunks are added
into float64 totals. Distances use the expanded form
``||P[k]||^2 - 2 p . P[k]`` (``||p||^2`` is the same for every k), one GEMM per
chunk.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from ._common import split_skipped

CHUNK_ELEMENTS = 1 << 19  # 2 MiB of float32 logits: a chunk and its buffers stay in L2


def _chunk_index(shape: tuple[int, ...], budget: int) -> Iterator[tuple]:
    """Index tuples over the pixel dims ``shape`` ([N, *spatial]), each covering at most
    ``budget`` pixels (one row at least), in C order."""
    if not shape:
        yield ()
        return
    inner = math.prod(shape[1:])
    if inner > budget and len(shape) > 1:
        for i in range(shape[0]):
            for rest in _chunk_index(shape[1:], budget):
                yield (i, *rest)
        return
    step = max(1, budget // max(inner, 1))
    for start in range(0, shape[0], step):
        yield (slice(start, min(start + step, shape[0])),)


def _chunks(logits: torch.Tensor):
    """Yield ``(index, z)``: ``z`` is a [C, n] float32 tensor of the pixels ``index`` selects in
    a [N, *spatial] tensor; a view where the layout allows, else a chunk-sized copy."""
    C = logits.shape[1]
    by_class = logits.movedim(1, 0)
    budget = max(1, CHUNK_ELEMENTS // C)
    for index in _chunk_index(tuple(by_class.shape[1:]), budget):
        yield index, by_class[(slice(None), *index)].reshape(C, -1)


def _softmax_chunk(z: torch.Tensor, temperature: float):
    """``e = exp((z - max z) / T)`` (a new buffer), ``1 / sum e`` = conf, argmax, finiteness."""
    z32 = z.float()
    z_min, z_max = torch.aminmax(z32, dim=0)
    cls = z32.argmax(dim=0)
    e = z32 - z_max if z32 is z else z32.sub_(z_max)
    if temperature != 1.0:
        e.mul_(1.0 / temperature)
    e.exp_()
    conf = e.sum(dim=0).reciprocal_()
    finite = torch.isfinite(z_min) & torch.isfinite(z_max)
    return e, conf, cls, finite


def prototype_stats(logits: torch.Tensor, temperature: float, valid: torch.Tensor | None,
                    deterministic: bool = True):
    C = logits.shape[1]
    S_t = torch.zeros(C, C, dtype=torch.float64, device=logits.device)  # S transposed: [j, k]
    W = torch.zeros(C, dtype=torch.float64, device=logits.device)
    nonfinite = 0
    for index, z in _chunks(logits):
        e, conf, cls, use = _softmax_chunk(z, temperature)
        if valid is not None:
            in_mask = valid[index].reshape(-1)
            nonfinite += int((in_mask & ~use).sum())
            use &= in_mask
        else:
            nonfinite += int((~use).sum())
        weight = torch.where(use, conf, torch.zeros((), device=conf.device))
        e.mul_(weight * conf)  # conf * p = conf^2 * e
        if not bool(use.all()):
            e.masked_fill_(~use, 0.0)  # NaN or inf at masked pixels must not leak into the sums
        S_chunk = torch.zeros(C, C, dtype=torch.float32, device=e.device)
        S_chunk.index_add_(1, cls, e)
        S_t += S_chunk
        W += torch.zeros(C, dtype=torch.float32, device=e.device).index_add_(0, cls, weight)
    return S_t.T.contiguous(), W, nonfinite


def predict(logits: torch.Tensor, prototypes: torch.Tensor, temperature: float, label_dtype=torch.int64):
    P, sq_norms = split_skipped(prototypes)
    labels = torch.empty((logits.shape[0], *logits.shape[2:]), dtype=label_dtype, device=logits.device)
    for index, z in _chunks(logits):
        e, conf, _, _ = _softmax_chunk(z, temperature)
        e.mul_(conf)
        distance = torch.addmm(sq_norms[:, None], P, e, alpha=-2.0)
        out = labels[index]
        out.copy_(distance.argmin(dim=0).view(out.shape))
    return labels
