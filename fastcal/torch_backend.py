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
  images of at least ``DIRECT_MIN_PIXELS`` pixels, or of at most
  ``SMALL_BATCH_IMAGES`` images, are read in place; any other layout is copied a
  chunk at a time into a float32 ``[C, n]`` buffer first. How a pass covers the
  pixels (:class:`_Walk`) is planned once per plan (see :mod:`fastcal._plan`).
- Everything else (more classes, or tensors on another device) runs PyTorch
  operations on each chunk (float32 softmax and distances); the products
  ``conf * p`` are added into float64 sums.

Between the passes of ``calibrate`` the prototypes and the loops' operands come from two
small serial loops (:func:`operands_pass`). The backend interface, shared with
:mod:`fastcal.reference` and :mod:`fastcal._triton`: ``stats_pass(logits, valid, plan)``,
``operands_pass(S, W, plan)``, ``predict_pass(logits, operands, plan)`` and
``scores_pass(logits, operands, plan)``.
"""
from __future__ import annotations

import functools
import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import _process

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
        finite = torch.isfinite(z).all(dim=0)  # per pixel, on the device: nothing read back
        cls = _first_zero(e, buffers.view(buffers.scratch, n), buffers)
    if temperature != 1.0:
        e.mul_(1.0 / temperature)
    e.exp_()
    return (e, cls, finite) if with_argmax else e


def uses_fused_loops(logits: torch.Tensor) -> bool:
    """Whether the chunk math runs the fused CPU loops: CPU tensors with at most
    ``cpu_kernels.MAX_CLASSES`` classes, in a process where they may run (see
    :func:`fastcal.cpu_kernels.available`)."""
    if logits.device.type != "cpu":
        return False
    cpu_kernels = _cpu_kernels()
    return logits.shape[1] <= cpu_kernels.MAX_CLASSES and cpu_kernels.available()


@functools.lru_cache(maxsize=None)
def _cpu_kernels():
    """:mod:`fastcal.cpu_kernels`, imported on the first CPU call (it imports Numba)."""
    from . import cpu_kernels

    return cpu_kernels


# how the fused loops read each dtype in place: float16 and bfloat16 as their bits
_IN_PLACE = {torch.float32: torch.float32, torch.float16: torch.uint16, torch.bfloat16: torch.int16}
SMALL_BATCH_IMAGES = 4  # batches of at most this many images are read in place whatever their size


def host_array(t: torch.Tensor) -> np.ndarray:
    """The one route from a tensor to host memory on the fast path: a NumPy view of a CPU tensor
    for the loops. Tests replace it to see that no other backend, and no CUDA tensor, goes here."""
    return t.numpy()


class _Walk:
    """How a pass of the fused loops covers the pixels, planned once per plan (see
    :mod:`fastcal._plan`): from shapes, strides and dtypes only.

    ``in_place``: the loops read the logits' own memory (NCHW float32 / float16 / bfloat16, or the
    small float32 copy of an upsampling source); else each chunk is copied into a float32
    ``[C, n]`` buffer. ``ranges``: per call of a loop, ``(g, start, n, select)`` (in place) or
    ``(index, select)`` (copied chunks), ``select(t)`` viewing the same pixels in a C-contiguous
    [N, *spatial] tensor ``t`` (``select(t, classes=True)``: their [C, ...] view in
    [N, C, *spatial]). ``tables``: the loop's trailing arguments (the upsampling tables, after
    the thread count when the loop splits each call into one run of blocks a thread)."""

    def __init__(self, logits, upsample, plain_loop, upsampled_loop, pixels=None, thread_runs=True):
        N, C = logits.shape[:2]
        self.upsampled = upsample is not None
        contiguous = logits.dtype in _IN_PLACE and logits.is_contiguous()
        self.buffer_pixels = 0
        if self.upsampled:
            from numba import get_num_threads

            self.loop, self.in_place = upsampled_loop, contiguous
            L = math.prod(upsample.size)
            # a whole image a call by default: each work unit interpolates a source row once
            self.ranges = _image_ranges(N, C, L, pixels or L)
            tables = _upsample_tables(logits, upsample)
            self.tables = (get_num_threads(), *tables) if thread_runs else tables
            return
        self.loop, self.tables = plain_loop, ()
        L = math.prod(logits.shape[2:])
        pixels = max(1, CHUNK_ELEMENTS // C)
        self.in_place = contiguous and (L >= DIRECT_MIN_PIXELS or N <= SMALL_BATCH_IMAGES)
        if self.in_place:
            self.ranges = _image_ranges(N, C, L, pixels)
        else:
            self.ranges = [(index, _indexed(index)) for index in _chunk_index((N, *logits.shape[2:]), pixels)]
            self.buffer_pixels = min(pixels, N * L)

    def pieces(self, logits: torch.Tensor):
        """Yield ``(select, z, g, start, n)`` covering every pixel once: the loop reads pixels
        ``start .. start + n`` of image ``g`` of ``z``, a C-contiguous [G, C, L] array."""
        N, C = logits.shape[:2]
        if self.upsampled or self.in_place:  # the logits themselves, or the small upsampling source
            view = (logits if self.in_place else logits.float().contiguous()).view(N, C, -1)
            z = host_array(view if view.dtype == torch.float32 else view.view(_IN_PLACE[view.dtype]))
            for g, start, n, select in self.ranges:
                yield select, z, g, start, n
            return
        by_class = logits.movedim(1, 0)
        buffer = torch.empty(C * self.buffer_pixels, dtype=torch.float32, device=logits.device)
        for index, select in self.ranges:
            chunk = by_class[(slice(None), *index)].reshape(C, -1)
            n = chunk.shape[1]
            z = buffer[: C * n].view(C, n).copy_(chunk)  # upcasts half precision, gathers other layouts
            yield select, host_array(z.view(1, C, n)), 0, 0, n


def _walk(plan, logits, name: str, plain_loop, upsampled_loop, **options) -> _Walk:
    """The plan's walk for pass ``name``, planned on first use."""
    walk = plan.walks.get(name)
    if walk is None:
        walk = plan.walks[name] = _Walk(logits, plan.upsample, plain_loop, upsampled_loop, **options)
    return walk


def _image_ranges(N: int, C: int, L: int, pixels: int) -> list:
    """``(g, start, n, select)`` for every run of at most ``pixels`` pixels of each image."""
    return [(g, start, min(pixels, L - start), _image_range(N, C, L, g, start, min(pixels, L - start)))
            for g in range(N) for start in range(0, L, pixels)]


def _image_range(N: int, C: int, L: int, g: int, start: int, n: int):
    """The selector (see :class:`_Walk`) of pixels ``start .. start + n`` of image ``g``."""
    if N == 1 and start == 0 and n == L:  # the whole tensor: a view, no indexing
        def whole(t, classes=False):
            return t.view(C, L) if classes else t.view(L)
        return whole

    def select(t, classes=False):
        return t.view(N, C, L)[g, :, start:start + n] if classes else t.view(N, L)[g, start:start + n]
    return select


def _indexed(index: tuple):
    """The selector (see :class:`_Walk`) of the pixels ``index`` selects in [N, *spatial]."""
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
    ``rows`` and ``cols`` as NumPy arrays, the column tables padded to whole tiles. Built from
    shapes alone, on the host, once per plan."""
    from .cpu_kernels import BAND, TILE

    # the loops read the input as a contiguous [C, H*W] image: rows W apart, columns adjacent
    in_width = logits.shape[3]
    rows, (x0, _, wx) = upsample.source_offsets(tuple(logits.shape[2:]), (in_width, 1))
    pad = -len(x0) % TILE  # repeats of the last column
    x0, wx = torch.cat([x0, x0[-1:].expand(pad)]), torch.cat([wx, wx[-1:].expand(pad)])
    cols = (in_width, x0.numpy(), wx.numpy(), *_column_bands(x0, wx, BAND, TILE))
    return upsample.size[1], tuple(t.numpy() for t in rows), cols


def _fused_prototype_stats(logits, valid, plan):
    cpu_kernels = _cpu_kernels()
    C = logits.shape[1]
    S_parts = np.zeros((cpu_kernels.UNITS, C, C))
    W_parts = np.zeros((cpu_kernels.UNITS, C))
    N_parts = np.zeros((cpu_kernels.UNITS, C))
    all_valid = np.empty(0, dtype=np.uint8)
    nonfinite = 0
    if valid is not None:
        valid = valid.contiguous().view(torch.uint8)
    # the stats loops' fixed work units keep the sums independent of the thread count
    walk = _walk(plan, logits, "stats", cpu_kernels.stats_chunk, cpu_kernels.upsampled_stats_chunk,
                 thread_runs=False)
    inv_temperature, power = np.float32(1.0 / plan.temperature), np.float32(plan.confidence_power)
    for select, z, g, start, n in walk.pieces(logits):
        mask = all_valid if valid is None else host_array(select(valid))
        nonfinite += int(cpu_kernels.run(walk.loop, z, g, start, n, inv_temperature, power, mask, S_parts, W_parts,
                                         N_parts, *walk.tables))
    S, W, N = np.empty((C, C)), np.empty(C), np.empty(C)
    cpu_kernels.sum_units(S_parts, W_parts, N_parts, S, W, N)
    return torch.from_numpy(S), torch.from_numpy(W), torch.from_numpy(N), nonfinite


def _fused_distances(logits, operands, plan):
    """Yield ``(select, d, distance)`` per piece (see :class:`_Walk`): ``d = p - c`` [C, n] from the
    fused loops and ``distance = -2 A d`` [C, n], in buffers the next piece reuses."""
    cpu_kernels = _cpu_kernels()

    C = logits.shape[1]
    A_times_minus_2, centre, _ = _cpu_operands(operands)
    inv_temperature = np.float32(1.0 / plan.temperature)
    # chunk-sized calls: d and the distances fill the chunk buffers
    walk = _walk(plan, logits, "distances", cpu_kernels.centred_softmax_chunk,
                 cpu_kernels.upsampled_centred_softmax_chunk, pixels=CHUNK_ELEMENTS // C)
    size = C * min(CHUNK_ELEMENTS // C, plan.pixels)
    d_buffer, distance_buffer = torch.empty(size), torch.empty(size)
    for select, z, g, start, n in walk.pieces(logits):
        d = d_buffer[: C * n].view(C, n)
        cpu_kernels.run(walk.loop, z, g, start, n, inv_temperature, host_array(centre), host_array(d), *walk.tables)
        yield select, d, torch.mm(A_times_minus_2, d, out=distance_buffer[: C * n].view(C, n))


def _chunk_distances(logits, operands, plan):
    """As :func:`_fused_distances`, with PyTorch operations on each chunk (:func:`_chunks`)."""
    A_times_minus_2, centre, _ = _cpu_operands(operands)
    buffers = _Buffers(logits.shape[1], logits.device)
    upsample = plan.upsample
    for index, z in _chunks(logits) if upsample is None else _upsampled_chunks(logits, upsample):
        d = _shifted_exp(z, plan.temperature, buffers, with_argmax=False)
        d.div_(d.sum(dim=0)).sub_(centre[:, None])
        yield _indexed(index), d, torch.mm(A_times_minus_2, d, out=buffers.view(buffers.scratch, d.shape[1]))


def _centred_distances(logits, operands, plan):
    """``(bias, pieces)``: ``pieces`` yields ``(select, d, distance)``, where ``bias + distance`` is
    ``||p - P[k]||^2 - ||d||^2`` (see :func:`_cpu_operands`), from the fused loops or chunks."""
    walk = _fused_distances if uses_fused_loops(logits) else _chunk_distances
    return _cpu_operands(operands)[2], walk(logits, operands, plan)


def _fork_safe(function):
    """Run ``function`` on one thread in a forked child (see :func:`fastcal.cpu_kernels.forked_child`),
    as PyTorch's DataLoader workers do: a parallel region there would wait forever for the parent's
    OpenMP threads. The caller's thread count is restored afterwards."""
    @functools.wraps(function)
    def wrapper(logits, *args, **kwargs):
        if logits.device.type != "cpu" or not _process.forked_child():
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
    (y0, y1, wy), _ = upsample.axes(tuple(logits.shape[2:]))  # from the shapes alone, on the host
    first_rows, last_rows = y0.tolist(), y1.tolist()
    y0, y1, wy = y0.to(logits.device), y1.to(logits.device), wy.to(logits.device)
    height, width = upsample.size
    rows = max(1, CHUNK_ELEMENTS // (C * width))
    for g in range(N):
        for r0 in range(0, height, rows):
            band = slice(r0, min(r0 + rows, height))
            lo, hi = first_rows[band.start], last_rows[band.stop - 1] + 1
            source = logits[g:g + 1, :, lo:hi].float()
            along_x = {"scale_factor": (1.0, upsample.scale_factor[1])} if upsample.scale_factor \
                else {"size": (hi - lo, width)}
            rows_x = F.interpolate(source, mode="bilinear", align_corners=upsample.align_corners, **along_x)[0]
            top, bottom = rows_x.index_select(1, y0[band] - lo), rows_x.index_select(1, y1[band] - lo)
            yield (g, band), torch.lerp(top, bottom, wy[band][:, None]).reshape(C, -1)


@_fork_safe
def stats_pass(logits: torch.Tensor, valid: torch.Tensor | None, plan):
    """``(S, W, N, nonfinite)``: the sums, the pixel count per argmax class (float64) and the
    number of valid pixels with a non-finite logit (an int counted on the host by the loops, a
    0-dim tensor from the PyTorch operations)."""
    if uses_fused_loops(logits):
        return _fused_prototype_stats(logits, valid, plan)
    C = logits.shape[1]
    S_t = torch.zeros(C, C, dtype=torch.float64, device=logits.device)  # S transposed: [j, k]
    W = torch.zeros(C, dtype=torch.float64, device=logits.device)
    N = torch.zeros(C, dtype=torch.float64, device=logits.device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=logits.device)
    buffers = _Buffers(C, logits.device)
    upsample = plan.upsample
    for index, z in _chunks(logits) if upsample is None else _upsampled_chunks(logits, upsample):
        e, cls, use = _shifted_exp(z, plan.temperature, buffers, with_argmax=True)
        conf = e.sum(dim=0).reciprocal_()
        if valid is not None:
            in_mask = valid[index].reshape(-1)
            nonfinite += (in_mask & ~use).sum()
            use &= in_mask
        else:
            nonfinite += (~use).sum()
        weight = conf if plan.confidence_power == 1.0 else conf.pow(plan.confidence_power)
        weight = torch.where(use, weight, torch.zeros((), device=conf.device))
        e.mul_(weight * conf)  # weight * p = weight * conf * e
        e.masked_fill_(~use, 0.0)  # NaN or inf at masked pixels must not leak into the sums
        # float64 from the first add: a chunk holds up to a million pixels of one class, whose
        # float32 running sum would drift by ~1e-5
        S_t.index_add_(1, cls, e.double())
        W.index_add_(0, cls, weight.double())
        N.index_add_(0, cls, use.double())
    return S_t.T.contiguous(), W, N, nonfinite


def _cpu_operands(operands):
    """``(-2 A, c, bias)`` of :func:`fastcal._common.centred_prototypes` as float32 CPU tensors, made
    once per prepared prototypes (see :class:`fastcal._common.DistanceOperands`): a pixel's label
    is ``argmin_k bias[k] + (-2 A (p - c))[k]`` (scaling by -2 is exact)."""
    return tuple(torch.from_numpy(a) for a in _host_operands(operands))


def _host_operands(operands):
    """:func:`_cpu_operands` as the NumPy arrays the loops take."""
    return operands.derived("cpu", lambda o: _centred_on_host(host_array(o.prototypes)))


def operands_pass(S: torch.Tensor, W: torch.Tensor, plan):
    """The prototypes (as :func:`fastcal.reference.prototypes_from_stats`) and the loops' operands,
    in two small serial loops where the sums are on the host (a few hundred values, for which
    PyTorch's or NumPy's per-operation overhead would be most of the time)."""
    from . import reference
    from ._common import DistanceOperands

    if S.device.type != "cpu" or not uses_fused_loops(S[None]):
        return reference.operands_pass(S, W, plan)
    C = W.shape[0]
    P = np.empty((C, C), np.float32)
    _cpu_kernels().prototypes_from_sums(host_array(S), host_array(W), plan.empty == "skip", P)
    return DistanceOperands(torch.from_numpy(P), derived={"cpu": _centred_on_host(P)})


def _centred_on_host(P: np.ndarray):
    """``(-2 A, c, bias)`` of :func:`fastcal._common.centred_prototypes` for float32 prototypes on
    the host (see :func:`fastcal.cpu_kernels.centred_operands`; the tests check both agree)."""
    C = P.shape[0]
    A_times_minus_2, centre, bias = np.empty((C, C), np.float32), np.empty(C, np.float32), np.empty(C, np.float32)
    _cpu_kernels().centred_operands(np.ascontiguousarray(P, dtype=np.float32), A_times_minus_2, centre, bias)
    return A_times_minus_2, centre, bias


def _fused_predict(logits, operands, plan, labels):
    """The fused loops' predict pass: softmax, distances and argmin a block of pixels at a time
    (see :func:`fastcal.cpu_kernels.predict_chunk`), labels written straight into ``labels``."""
    cpu_kernels = _cpu_kernels()

    A_times_minus_2, centre, bias = _host_operands(operands)
    inv_temperature = np.float32(1.0 / plan.temperature)
    walk = _walk(plan, logits, "predict", cpu_kernels.predict_chunk, cpu_kernels.upsampled_predict_chunk)
    for select, z, g, start, n in walk.pieces(logits):
        cpu_kernels.run(walk.loop, z, g, start, n, inv_temperature, centre, A_times_minus_2, bias,
                        host_array(select(labels)), *walk.tables)
    return labels


@_fork_safe
def predict_pass(logits: torch.Tensor, operands, plan):
    """The argmin of ``bias - 2 A (p - c)`` (see :func:`_cpu_operands`): in the fused loops
    (up to ``cpu_kernels.NEAREST_MAX_CLASSES`` classes), else with one GEMM a chunk."""
    cpu_kernels = _cpu_kernels()

    labels = plan.output(logits.device)
    fused = uses_fused_loops(logits)
    if fused and logits.shape[1] <= cpu_kernels.NEAREST_MAX_CLASSES:
        return _fused_predict(logits, operands, plan, labels)
    bias, pieces = _centred_distances(logits, operands, plan)
    if fused:
        for select, d, distance in pieces:
            cpu_kernels.run(cpu_kernels.argmin_chunk, host_array(distance), host_array(bias), d.shape[1],
                            host_array(select(labels)))
        return labels
    buffers = _Buffers(logits.shape[1], logits.device)
    for select, d, distance in pieces:
        distance.add_(bias[:, None])
        gap = torch.sub(distance.amin(dim=0), distance, out=distance)
        out = select(labels)
        out.copy_(_first_zero(gap, gap, buffers).view(out.shape))
    return labels


@_fork_safe
def scores_pass(logits: torch.Tensor, operands, plan):
    """``-(bias - 2 A d + ||d||^2) = -||p - P[k]||^2`` a chunk at a time, written into the float32
    [N, C, *spatial] output (``-inf`` for a skipped class)."""
    out = plan.output(logits.device)
    bias, pieces = _centred_distances(logits, operands, plan)
    for select, d, distance in pieces:
        distance.add_(bias[:, None]).add_(torch.linalg.vector_norm(d, dim=0).square_()).neg_()
        view = select(out, classes=True)
        view.copy_(distance.view(view.shape))
    return out
