"""The PyTorch fast path, for CPU tensors.

Same math as :mod:`fastcal.reference`, restructured for memory and speed: the
pixels are walked in chunks of about ``CHUNK_ELEMENTS`` logits, read in the
tensor's own layout (no permuted copy of the batch), and every intermediate is a
chunk-sized buffer. Distances use the expanded form, centred on the mean
prototype ``c`` for precision: ``||A[k]||^2 - 2 d . A[k]`` with ``d = p - c`` and
``A[k] = P[k] - c`` (see :func:`fastcal._common.centred_prototypes`): summed in the
fused loops up to ``cpu_kernels.NEAREST_MAX_CLASSES`` classes, else one GEMM per chunk.

Two implementations of the chunk math, chosen by :func:`uses_fused_loops`:

- CPU tensors with at most ``cpu_kernels.MAX_CLASSES`` classes run the fused
  loops of :mod:`fastcal.cpu_kernels` (one read of the logits per pass; sums in
  float32 over a block of 256 pixels, then in float64 per work unit, the units
  added in a fixed order). NCHW batches (float32, float16 or bfloat16) with
  images of at least ``DIRECT_MIN_PIXELS`` pixels are read in place; any other
  layout is copied a chunk at a time into a float32 ``[C, n]`` buffer first.
- Everything else (more classes, or tensors on another device) runs PyTorch
  operations on each chunk (float32 softmax and distances); the products
  ``conf * p`` are added into float64 sums.
"""
from __future__ import annotations

import functools
import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import _upsample
from ._common import centred_prototypes

CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 logits a chunk: per-op overhead vanishes, buffers stay small
DIRECT_MIN_PIXELS = 4096  # fused loops read an NCHW batch in place when its images are this large


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
    """Yield ``(index, z)``: ``z`` is a [C, n] tensor (input dtype) of the pixels ``index`` selects in
    a [N, *spatial] tensor; a view where the layout allows, else a chunk-sized copy."""
    C = logits.shape[1]
    by_class = logits.movedim(1, 0)
    budget = max(1, CHUNK_ELEMENTS // C)
    for index in _chunk_index(tuple(by_class.shape[1:]), budget):
        yield index, by_class[(slice(None), *index)].reshape(C, -1)


_TWO_126 = 2.0**126


class _Buffers:
    """Chunk-sized float32 scratch space, allocated once per call: fresh multi-MiB tensors per
    chunk would cost a page fault per 4 KiB on every chunk. ``e`` holds exp values; ``scratch``
    the argmax key or the distances (PyTorch operations), or the float32 copy of a chunk that
    the fused loops read."""

    def __init__(self, num_classes: int, device: torch.device):
        size = num_classes * max(1, CHUNK_ELEMENTS // num_classes)
        self.num_classes = num_classes
        self.e = torch.empty(size, dtype=torch.float32, device=device)
        self.scratch = torch.empty(size, dtype=torch.float32, device=device)
        self.descending = torch.arange(num_classes, 0, -1, dtype=torch.float32, device=device)[:, None]

    def view(self, flat: torch.Tensor, n: int) -> torch.Tensor:
        return flat[: self.num_classes * n].view(self.num_classes, n)


def _first_zero(gap: torch.Tensor, out: torch.Tensor, buffers: _Buffers) -> torch.Tensor:
    """Per column, the lowest k with ``gap[k] == 0``, given ``gap <= 0`` (NaN columns: some class).

    Same as ``argmax``/``argmin`` along dim 0 when ``gap`` is the distance to the column's
    extremum, without their slow strided reduction: two multiplies by 2^126 send every
    nonzero gap (denormals too) to -inf, so after adding ``C - k`` the column max is
    ``C - k`` of the first zero. ``out`` (which may be ``gap``) is overwritten.
    """
    C = gap.shape[0]
    key = torch.mul(gap, _TWO_126, out=out).mul_(_TWO_126).add_(buffers.descending)
    first = C - key.amax(dim=0)
    return first.nan_to_num_(0.0).clamp_(0, C - 1).long()


def _shifted_exp(z: torch.Tensor, temperature: float, buffers: _Buffers, with_argmax: bool):
    """``e = exp((z - max z) / T)`` in a scratch buffer (the max entry is exactly 1), and with
    ``with_argmax`` the argmax and whether every logit of the pixel is finite."""
    n = z.shape[1]
    if z.dtype not in _IN_PLACE:  # float64 is read as float32, like everywhere: beyond its range is inf
        z = z.float()
    z_max = z.amax(dim=0).float()
    e = torch.sub(z, z_max, out=buffers.view(buffers.e, n))  # upcasts half-precision chunks
    if with_argmax:
        # one full reduction tells whether the chunk is clean (a sum of finite logits that
        # overflows only sends the chunk down the exact per-pixel check)
        if bool(torch.isfinite(z.sum())):
            finite = torch.ones(n, dtype=torch.bool, device=z.device)
        else:
            finite = torch.isfinite(z).all(dim=0)
        cls = _first_zero(e, buffers.view(buffers.scratch, n), buffers)
    if temperature != 1.0:
        e.mul_(1.0 / temperature)
    e.exp_()
    return (e, cls, finite) if with_argmax else e


def uses_fused_loops(logits: torch.Tensor) -> bool:
    """Whether the chunk math runs the fused CPU loops: CPU tensors with at most
    ``cpu_kernels.MAX_CLASSES`` classes, in a process where they may run (see
    :func:`fastcal.cpu_kernels.available`)."""
    from . import cpu_kernels

    return logits.device.type == "cpu" and logits.shape[1] <= cpu_kernels.MAX_CLASSES and cpu_kernels.available()


# how the fused loops read each dtype in place: float16 and bfloat16 as their bits
_IN_PLACE = {torch.float32: torch.float32, torch.float16: torch.uint16, torch.bfloat16: torch.int16}


def _pieces(logits: torch.Tensor, buffers: _Buffers):
    """Yield ``(select, z, g, start, n)`` covering every pixel once: the fused loops read pixels
    ``start .. start + n`` of image ``g`` of ``z``, a C-contiguous [G, C, L] array (see
    :mod:`fastcal.cpu_kernels` for its dtypes), and ``select(t)`` is the flat [n] view of the same
    pixels in a C-contiguous [N, *spatial] tensor ``t`` (``select(t, classes=True)``: their
    [C, ...] view in a C-contiguous [N, C, *spatial] tensor)."""
    N, C = logits.shape[:2]
    L = math.prod(logits.shape[2:])
    pixels = max(1, CHUNK_ELEMENTS // C)
    if logits.dtype in _IN_PLACE and logits.is_contiguous() and L >= DIRECT_MIN_PIXELS:
        z = logits.view(N, C, L).view(_IN_PLACE[logits.dtype]).numpy()
        for g in range(N):
            for start in range(0, L, pixels):
                n = min(pixels, L - start)
                yield _image_range(N, C, L, g, start, n), z, g, start, n
        return
    for index, chunk in _chunks(logits):
        n = chunk.shape[1]
        z = buffers.view(buffers.scratch, n).copy_(chunk)  # upcasts half precision, gathers other layouts
        yield _indexed(index), z.view(1, C, n).numpy(), 0, 0, n


def _image_range(N: int, C: int, L: int, g: int, start: int, n: int):
    """The selector (see :func:`_pieces`) of pixels ``start .. start + n`` of image ``g``."""
    def select(t, classes=False):
        return t.view(N, C, L)[g, :, start:start + n] if classes else t.view(N, L)[g, start:start + n]
    return select


def _indexed(index: tuple):
    """The selector (see :func:`_pieces`) of the pixels ``index`` selects in [N, *spatial]."""
    def select(t, classes=False):
        return t.movedim(1, 0)[(slice(None), *index)] if classes else t[index].view(-1)
    return select


def _column_bands(x0: torch.Tensor, wx: torch.Tensor, band: int, tile: int):
    """The bands of :func:`fastcal.cpu_kernels._source_row` for output columns (whole tiles) with
    source column ``x0`` and weight ``wx`` of ``x0 + 1``: ``(first, weights)``, the first source
    column of each tile [T] and the weights of its ``band`` source columns for each of its
    output columns [T, band, tile]. Empty when a tile spans more than ``band`` source columns."""
    x0, wx = x0.view(-1, tile), wx.view(-1, tile)
    first = x0[:, 0]
    if int((x0[:, -1] - first).max()) + 2 > band:
        return np.zeros(0, np.int64), np.zeros((0, band, tile), np.float32)
    weights = torch.zeros(x0.shape[0], band, tile)
    tiles, columns, slot = torch.arange(x0.shape[0])[:, None], torch.arange(tile)[None, :], x0 - first[:, None]
    weights[tiles, slot, columns] = 1.0 - wx
    weights[tiles, slot + 1, columns] = wx
    return first.numpy(), weights.numpy()


def _upsample_tables(logits: torch.Tensor, upsample):
    """The loops' tables (see :func:`fastcal.cpu_kernels._block_upsample`): the output width, and
    ``rows`` and ``cols`` as NumPy arrays, the column tables padded to whole tiles."""
    from .cpu_kernels import BAND, TILE

    # the loops read the input as a contiguous [C, H*W] image: rows W apart, columns adjacent
    in_width = logits.shape[3]
    rows, (x0, _, wx) = upsample.source_offsets(tuple(logits.shape[2:]), (in_width, 1))
    pad = -len(x0) % TILE  # repeats of the last column
    x0, wx = torch.cat([x0, x0[-1:].expand(pad)]), torch.cat([wx, wx[-1:].expand(pad)])
    cols = (in_width, x0.numpy(), wx.numpy(), *_column_bands(x0, wx, BAND, TILE))
    return upsample.size[1], tuple(t.numpy() for t in rows), cols


def _upsampled_pieces(logits: torch.Tensor, upsample, pixels: int):
    """As :func:`_pieces`, over the output pixels of the upsampling, ``pixels`` at a time; ``z``
    [N, C, H*W] holds the input-resolution logits (in place for NCHW float32 / float16 / bfloat16,
    else a float32 copy of the small input)."""
    N, C, H, W = logits.shape
    L = math.prod(upsample.size)
    if logits.dtype in _IN_PLACE and logits.is_contiguous():
        z = logits.view(N, C, H * W).view(_IN_PLACE[logits.dtype]).numpy()
    else:
        z = logits.float().contiguous().view(N, C, H * W).numpy()
    for g in range(N):
        for start in range(0, L, pixels):
            n = min(pixels, L - start)
            yield _image_range(N, C, L, g, start, n), z, g, start, n


def _fused_walk(logits, upsample, buffers, plain_loop, upsampled_loop, *, pixels=None, thread_runs=True):
    """``(loop, pieces, tables)`` of one pass of the fused loops: ``plain_loop`` over :func:`_pieces`, or
    with ``upsample`` ``upsampled_loop`` over :func:`_upsampled_pieces` of ``pixels`` output pixels a
    call (default a whole image: each work unit then interpolates each source row along x once).
    ``tables`` follow the loop's own arguments: the upsampling tables, after the thread count when
    the loop splits each call into one contiguous run of blocks a thread (``thread_runs``)."""
    if upsample is None:
        return plain_loop, _pieces(logits, buffers), ()
    from numba import get_num_threads

    pieces = _upsampled_pieces(logits, upsample, pixels or math.prod(upsample.size))
    tables = _upsample_tables(logits, upsample)
    return upsampled_loop, pieces, (get_num_threads(), *tables) if thread_runs else tables


def _fused_prototype_stats(logits, temperature, valid, upsample, confidence_power):
    from . import cpu_kernels

    C = logits.shape[1]
    S_parts = np.zeros((cpu_kernels.UNITS, C, C))
    W_parts = np.zeros((cpu_kernels.UNITS, C))
    N_parts = np.zeros((cpu_kernels.UNITS, C))
    all_valid = np.empty(0, dtype=np.uint8)
    nonfinite = 0
    if valid is not None:
        valid = valid.contiguous().view(torch.uint8)
    # the stats loops' fixed work units keep the sums independent of the thread count
    loop, pieces, tables = _fused_walk(logits, upsample, _Buffers(C, logits.device), cpu_kernels.stats_chunk,
                                       cpu_kernels.upsampled_stats_chunk, thread_runs=False)
    for select, z, g, start, n in pieces:
        mask = all_valid if valid is None else select(valid).numpy()
        nonfinite += int(cpu_kernels.run(loop, z, g, start, n, np.float32(1.0 / temperature),
                                         np.float32(confidence_power), mask, S_parts, W_parts, N_parts, *tables))
    return (torch.from_numpy(S_parts.sum(axis=0)), torch.from_numpy(W_parts.sum(axis=0)),
            torch.from_numpy(N_parts.sum(axis=0)), nonfinite)


def _fused_distances(logits, A_times_minus_2, centre, temperature, upsample):
    """Yield ``(select, d, distance)`` per piece (see :func:`_pieces`): ``d = p - c`` [C, n] from the
    fused loops and ``distance = -2 A d`` [C, n], in buffers the next piece reuses."""
    from . import cpu_kernels

    buffers = _Buffers(logits.shape[1], logits.device)
    distance_buffer = torch.empty_like(buffers.e)
    inv_temperature = np.float32(1.0 / temperature)
    # chunk-sized calls: d and the distances fill the chunk buffers
    loop, pieces, tables = _fused_walk(logits, upsample, buffers, cpu_kernels.centred_softmax_chunk,
                                       cpu_kernels.upsampled_centred_softmax_chunk,
                                       pixels=CHUNK_ELEMENTS // logits.shape[1])
    for select, z, g, start, n in pieces:
        d = buffers.view(buffers.e, n)
        cpu_kernels.run(loop, z, g, start, n, inv_temperature, centre.numpy(), d.numpy(), *tables)
        yield select, d, torch.mm(A_times_minus_2, d, out=buffers.view(distance_buffer, n))


def _chunk_distances(logits, A_times_minus_2, centre, temperature, upsample):
    """As :func:`_fused_distances`, with PyTorch operations on each chunk (:func:`_chunks`)."""
    buffers = _Buffers(logits.shape[1], logits.device)
    for index, z in _chunks(logits) if upsample is None else _upsampled_chunks(logits, upsample):
        d = _shifted_exp(z, temperature, buffers, with_argmax=False)
        d.div_(d.sum(dim=0)).sub_(centre[:, None])
        yield _indexed(index), d, torch.mm(A_times_minus_2, d, out=buffers.view(buffers.scratch, d.shape[1]))


def _centred_distances(logits, prototypes, temperature, upsample):
    """``(bias, pieces)``: ``pieces`` yields ``(select, d, distance)``, where ``bias + distance`` is
    ``||p - P[k]||^2 - ||d||^2`` (see :func:`_distance_operands`), from the fused loops or chunks."""
    A_times_minus_2, centre, bias = _distance_operands(prototypes)
    walk = _fused_distances if uses_fused_loops(logits) else _chunk_distances
    return bias, walk(logits, A_times_minus_2, centre, temperature, upsample)


def _fork_safe(function):
    """Run ``function`` on one thread in a forked child (see :func:`fastcal.cpu_kernels.forked_child`),
    as PyTorch's DataLoader workers do: a parallel region there would wait forever for the parent's
    OpenMP threads. The caller's thread count is restored afterwards."""
    @functools.wraps(function)
    def wrapper(logits, *args, **kwargs):
        from . import cpu_kernels

        if logits.device.type != "cpu" or not cpu_kernels.forked_child():
            return function(logits, *args, **kwargs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(logits, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def _upsampled_chunks(logits: torch.Tensor, upsample):
    """As :func:`_chunks` for the upsampling: ``(index, z)`` with ``z`` [C, n] float32, the bilinear
    values of a band of output rows of one image. Along x, ``F.interpolate`` of the band's source
    rows (their own rows kept: the mapping along y is then the identity, along x the global one);
    along y, a blend of the two source rows of each output row."""
    N, C = logits.shape[:2]
    (y0, y1, wy), _ = upsample.axes(tuple(logits.shape[2:]), logits.device)
    height, width = upsample.size
    rows = max(1, CHUNK_ELEMENTS // (C * width))
    for g in range(N):
        for r0 in range(0, height, rows):
            band = slice(r0, min(r0 + rows, height))
            lo, hi = int(y0[band][0]), int(y1[band][-1]) + 1
            source = logits[g:g + 1, :, lo:hi].float()
            along_x = {"scale_factor": (1.0, upsample.scale_factor[1])} if upsample.scale_factor \
                else {"size": (hi - lo, width)}
            rows_x = F.interpolate(source, mode="bilinear", align_corners=upsample.align_corners, **along_x)[0]
            top, bottom = rows_x.index_select(1, y0[band] - lo), rows_x.index_select(1, y1[band] - lo)
            yield (g, band), torch.lerp(top, bottom, wy[band][:, None]).reshape(C, -1)


@_fork_safe
def prototype_stats(logits: torch.Tensor, temperature: float, valid: torch.Tensor | None,
                    deterministic: bool = True, upsample=None, confidence_power: float = 1.0):
    """``(S, W, N, nonfinite)``: the sums, the pixel count per argmax class (float64) and the
    number of valid pixels with a non-finite logit."""
    if uses_fused_loops(logits):
        return _fused_prototype_stats(logits, temperature, valid, upsample, confidence_power)
    C = logits.shape[1]
    S_t = torch.zeros(C, C, dtype=torch.float64, device=logits.device)  # S transposed: [j, k]
    W = torch.zeros(C, dtype=torch.float64, device=logits.device)
    N = torch.zeros(C, dtype=torch.float64, device=logits.device)
    nonfinite = 0
    buffers = _Buffers(C, logits.device)
    for index, z in _chunks(logits) if upsample is None else _upsampled_chunks(logits, upsample):
        e, cls, use = _shifted_exp(z, temperature, buffers, with_argmax=True)
        conf = e.sum(dim=0).reciprocal_()
        if valid is not None:
            in_mask = valid[index].reshape(-1)
            nonfinite += int((in_mask & ~use).sum())
            use &= in_mask
        else:
            nonfinite += int((~use).sum())
        clean = bool(use.all())
        weight = conf if confidence_power == 1.0 else conf.pow(confidence_power)
        weight = weight if clean else torch.where(use, weight, torch.zeros((), device=conf.device))
        e.mul_(weight * conf)  # weight * p = weight * conf * e
        if not clean:
            e.masked_fill_(~use, 0.0)  # NaN or inf at masked pixels must not leak into the sums
        # float64 from the first add: a chunk holds up to a million pixels of one class, whose
        # float32 running sum would drift by ~1e-5
        S_t.index_add_(1, cls, e.double())
        W.index_add_(0, cls, weight.double())
        N.index_add_(0, cls, use.double())
    return S_t.T.contiguous(), W, N, nonfinite


def _distance_operands(prototypes: torch.Tensor):
    """``(-2 A, c, bias)`` of :func:`fastcal._common.centred_prototypes`: a pixel's label is
    ``argmin_k bias[k] + (-2 A (p - c))[k]`` (scaling by -2 is exact)."""
    A, centre, bias = centred_prototypes(prototypes)
    return A.mul_(-2.0), centre, bias


def _fused_predict(logits, prototypes, temperature, labels, upsample):
    """The fused loops' predict pass: softmax, distances and argmin a block of pixels at a time
    (see :func:`fastcal.cpu_kernels.predict_chunk`), labels written straight into ``labels``."""
    from . import cpu_kernels

    A_times_minus_2, centre, bias = (t.numpy() for t in _distance_operands(prototypes))
    inv_temperature = np.float32(1.0 / temperature)
    loop, pieces, tables = _fused_walk(logits, upsample, _Buffers(logits.shape[1], logits.device),
                                       cpu_kernels.predict_chunk, cpu_kernels.upsampled_predict_chunk)
    for select, z, g, start, n in pieces:
        cpu_kernels.run(loop, z, g, start, n, inv_temperature, centre, A_times_minus_2, bias,
                        select(labels).numpy(), *tables)
    return labels


@_fork_safe
def predict(logits: torch.Tensor, prototypes: torch.Tensor, temperature: float, label_dtype=torch.int64,
            upsample=None):
    """The argmin of ``bias - 2 A (p - c)`` (see :func:`_distance_operands`): in the fused loops
    (up to ``cpu_kernels.NEAREST_MAX_CLASSES`` classes), else with one GEMM a chunk."""
    from . import cpu_kernels

    labels = torch.empty(_upsample.output_shape(logits, upsample), dtype=label_dtype, device=logits.device)
    fused = uses_fused_loops(logits)
    if fused and logits.shape[1] <= cpu_kernels.NEAREST_MAX_CLASSES:
        return _fused_predict(logits, prototypes, temperature, labels, upsample)
    bias, pieces = _centred_distances(logits, prototypes, temperature, upsample)
    if fused:
        for select, d, distance in pieces:
            cpu_kernels.run(cpu_kernels.argmin_chunk, distance.numpy(), bias.numpy(), d.shape[1],
                            select(labels).numpy())
        return labels
    buffers = _Buffers(logits.shape[1], logits.device)
    for select, d, distance in pieces:
        distance.add_(bias[:, None])
        gap = torch.sub(distance.amin(dim=0), distance, out=distance)
        out = select(labels)
        out.copy_(_first_zero(gap, gap, buffers).view(out.shape))
    return labels


@_fork_safe
def scores(logits: torch.Tensor, prototypes: torch.Tensor, temperature: float, upsample=None):
    """``-(bias - 2 A d + ||d||^2) = -||p - P[k]||^2`` a chunk at a time, written into the float32
    [N, C, *spatial] output (``-inf`` for a skipped class)."""
    shape = _upsample.output_shape(logits, upsample)
    out = torch.empty((shape[0], logits.shape[1], *shape[1:]), dtype=torch.float32, device=logits.device)
    bias, pieces = _centred_distances(logits, prototypes, temperature, upsample)
    for select, d, distance in pieces:
        distance.add_(bias[:, None]).add_(torch.linalg.vector_norm(d, dim=0).square_()).neg_()
        view = select(out, classes=True)
        view.copy_(distance.view(view.shape))
    return out
