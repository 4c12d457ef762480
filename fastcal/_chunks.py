"""How the CPU backends walk the pixels a chunk at a time (torch-ops, and the fused loops' GEMM path):
the chunks of the pixel dims, the views that select them, and the scores written from their
distance pieces."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch

CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 logits a chunk: per-op overhead vanishes, buffers stay small


def chunk_index(shape: tuple[int, ...], budget: int) -> Iterator[tuple]:
    """Index tuples over the pixel dims ``shape`` ([N, *spatial]), each covering at most
    ``budget`` pixels (one row at least), in C order."""
    if not shape:
        yield ()
        return
    inner = math.prod(shape[1:])
    if inner > budget and len(shape) > 1:
        for i in range(shape[0]):
            for rest in chunk_index(shape[1:], budget):
                yield (i, *rest)
        return
    step = max(1, budget // max(inner, 1))
    for start in range(0, shape[0], step):
        yield (slice(start, min(start + step, shape[0])),)


def indexed(index: tuple):
    """The selector (``select(t)``: the [n] pixels of a C-contiguous
    [N, *spatial] ``t``; ``select(t, classes=True)``: their [C, ...] view in [N, C, *spatial]) of the
    pixels ``index`` selects in [N, *spatial]."""
    def select(t, classes=False):
        return t.movedim(1, 0)[(slice(None), *index)] if classes else t[index].view(-1)
    return select


def write_scores(out: torch.Tensor, bias: torch.Tensor, pieces) -> torch.Tensor:
    """``-(bias - 2 A d + ||d||^2) = -||v - P[k]||^2`` into the float32 [N, C, *spatial] ``out``
    (``-inf`` for a skipped class), from ``(select, d, distance)`` pieces: ``d = v - c`` [C, n] and
    ``distance = -2 A d`` [C, n] (both fast CPU backends' distance walks)."""
    for select, d, distance in pieces:
        distance.add_(bias[:, None]).add_(torch.linalg.vector_norm(d, dim=0).square_()).neg_()
        view = select(out, classes=True)
        view.copy_(distance.view(view.shape))
    return out
