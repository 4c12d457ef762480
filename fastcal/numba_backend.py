"""The "numba" backend: the fused CPU loops of :mod:`fastcal.cpu_kernels` on CPU tensors.

Same math as :mod:`fastcal.reference`, in one read of the logits per pass (sums in float32
over a block of 256 pixels, then in float64 per work unit, the units added in a fixed order).
NCHW batches (float32, float16 or bfloat16) with images of at least ``DIRECT_MIN_PIXELS``
pixels, or of at most ``SMALL_BATCH_IMAGES`` images, are read in place; any other layout is
copied a chunk at a time (``_chunks.CHUNK_ELEMENTS`` logits) into a float32 ``[C, n]`` buffer
first. How a pass covers the pixels (:class:`_Walk`) is planned once per plan (see
:func:`fastcal._prepared.prepared`). Distances use the expanded form, centred on the mean prototype
``c`` for precision (see :func:`fastcal._operands.centred_prototypes`): summed in the fused
loops up to ``cpu_kernels.NEAREST_MAX_CLASSES`` classes, else one GEMM per chunk.

Takes at most ``cpu_kernels.MAX_CLASSES`` classes, and never runs in a forked child (see
:mod:`fastcal._process`): the ``"auto"`` and ``"torch"`` choices of :mod:`fastcal._backends` take
:mod:`fastcal.torch_ops` there. Between the passes of ``calibrate`` the prototypes and the loops' operands come from two
small serial loops (:func:`operands_pass`). ``host_array`` is the one route from a tensor to
host memory. The backend interface, shared with :mod:`fastcal.reference`,
:mod:`fastcal.torch_ops` and :mod:`fastcal._triton`: ``stats_pass(logits, valid, plan)``,
``operands_pass(S, W, plan)``, ``predict_pass(logits, operands, plan)`` and
``scores_pass(logits, operands, plan)``.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from . import _chunks, _prepared, _process, _space
from ._chunks import chunk_index, indexed
from ._operands import DistanceOperands

DIRECT_MIN_PIXELS = 4096  # an NCHW batch is read in place when its images are this large
SMALL_BATCH_IMAGES = 4  # batches of at most this many images are read in place whatever their size
# how the loops read each dtype in place: float16 and bfloat16 as their bits
_IN_PLACE = {torch.float32: torch.float32, torch.float16: torch.uint16, torch.bfloat16: torch.int16}


@functools.cache
def _cpu_kernels():
    """:mod:`fastcal.cpu_kernels`, imported on the first call (it imports Numba)."""
    from . import cpu_kernels  # imports Numba: on the first call of the loops

    return cpu_kernels


REQUIRES = ("the fused CPU loops take CPU tensors of at most 256 classes (cpu_kernels.MAX_CLASSES), "
            "outside a forked child")
prototype_operands = None  # a caller's prototypes: prepared as fastcal._operands does


def can_run(logits, limit: bool = False) -> bool:
    """Whether this backend takes ``logits``: a CPU tensor of at most ``cpu_kernels.MAX_CLASSES``
    classes, outside a forked child (the loops take the limit as any temperature)."""
    return (logits.device.type == "cpu" and logits.shape[1] <= _cpu_kernels().MAX_CLASSES
            and not _process.forked_child())


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
    [N, C, *spatial]). ``tables``: the loop's trailing arguments: how many runs of blocks a call
    makes (absent for the stats loop, which always makes ``cpu_kernels.UNITS``; one a thread with
    upsampling), then ``width, rows, cols``: the upsampling tables, or ``0`` and empty tables
    (``cpu_kernels.NO_ROWS``, ``NO_COLS``), which choose the loop's reader."""

    def __init__(self, logits, upsample, pixels=None, thread_runs=True):
        N, C = logits.shape[:2]
        self.upsampled = upsample is not None
        contiguous = logits.dtype in _IN_PLACE and logits.is_contiguous()
        self.buffer_pixels = 0
        cpu_kernels = _cpu_kernels()
        units = cpu_kernels.UNITS
        if self.upsampled:
            from numba import get_num_threads  # Numba: imported with the loops, on first use

            self.in_place = contiguous
            L = math.prod(upsample.size)
            # a whole image a call by default: each work unit interpolates a source row once
            self.ranges = _image_ranges(N, C, L, pixels or L)
            tables = _upsample_tables(logits, upsample)
            self.tables = ((get_num_threads(),) if thread_runs else ()) + tables
            return
        self.tables = ((units,) if thread_runs else ()) + (0, cpu_kernels.NO_ROWS, cpu_kernels.NO_COLS)
        L = math.prod(logits.shape[2:])
        pixels = pixels or max(1, _chunks.CHUNK_ELEMENTS // C)  # a chunk a call by default
        self.in_place = contiguous and (L >= DIRECT_MIN_PIXELS or N <= SMALL_BATCH_IMAGES)
        if self.in_place:
            self.ranges = _image_ranges(N, C, L, pixels)
        else:
            self.ranges = [(index, indexed(index)) for index in chunk_index((N, *logits.shape[2:]), pixels)]
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


def _walk(plan, logits, name: str, **options) -> _Walk:
    """The plan's walk for pass ``name``, planned on first use (:func:`fastcal._prepared.prepared`)."""
    return _prepared.prepared(plan, ("walk", name), lambda: _Walk(logits, plan.upsample, **options))


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


def _column_bands(x0: torch.Tensor, wx: torch.Tensor, band: int, tile: int):
    """The bands of :func:`fastcal.cpu_kernels._source_row` for output columns (whole tiles) with
    source column ``x0`` and weight ``wx`` of ``x0 + 1``: ``(first, weights)``, the first source
    column of each tile [T] and the weights of its ``band`` source columns for each of its
    output columns [T, band, tile]. Empty when a tile spans more than ``band`` source columns."""
    x0, wx = x0.view(-1, tile), wx.view(-1, tile)
    first = x0[:, 0].contiguous()  # a column view would type the loops' argument as strided ('A')
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
    BAND, TILE = _cpu_kernels().BAND, _cpu_kernels().TILE
    # the loops read the input as a contiguous [C, H*W] image: rows W apart, columns adjacent
    in_width = logits.shape[3]
    rows, (x0, _, wx) = upsample.source_offsets(tuple(logits.shape[2:]), (in_width, 1))
    pad = -len(x0) % TILE  # repeats of the last column
    x0, wx = torch.cat([x0, x0[-1:].expand(pad)]), torch.cat([wx, wx[-1:].expand(pad)])
    cols = (in_width, x0.numpy(), wx.numpy(), *_column_bands(x0, wx, BAND, TILE))
    return upsample.size[1], tuple(t.numpy() for t in rows), cols


def stats_pass(logits: torch.Tensor, valid: torch.Tensor | None, plan):
    """``(S, W, N, nonfinite)``: the sums, the pixel count per argmax class (float64) and the
    number of valid pixels with a non-finite logit (an int, counted by the loops)."""
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
    walk = _walk(plan, logits, "stats", thread_runs=False)
    inv_temperature, power = np.float32(_space.inverse(plan.temperature)), np.float32(plan.confidence_power)
    for select, z, g, start, n in walk.pieces(logits):
        mask = all_valid if valid is None else host_array(select(valid))
        nonfinite += int(cpu_kernels.run(cpu_kernels.stats_chunk, z, g, start, n, inv_temperature, power, mask,
                                         S_parts, W_parts,
                                         N_parts, *walk.tables))
    S, W, N = np.empty((C, C)), np.empty(C), np.empty(C)
    cpu_kernels.sum_units(S_parts, W_parts, N_parts, S, W, N)
    return torch.from_numpy(S), torch.from_numpy(W), torch.from_numpy(N), nonfinite


def _fused_distances(logits, operands, plan):
    """Yield ``(select, d, distance)`` per piece (see :class:`_Walk`): ``d = p - c`` [C, n] from the
    fused loops and ``distance = -2 A d`` [C, n], in buffers the next piece reuses."""
    cpu_kernels = _cpu_kernels()

    C = logits.shape[1]
    A_times_minus_2, centre, _ = _host_operands(operands)
    A_times_minus_2 = torch.from_numpy(A_times_minus_2)
    inv_temperature = np.float32(_space.inverse(plan.temperature))
    # chunk-sized calls: d and the distances fill the chunk buffers
    walk = _walk(plan, logits, "distances", pixels=_chunks.CHUNK_ELEMENTS // C)
    size = C * min(_chunks.CHUNK_ELEMENTS // C, plan.pixels)
    d_buffer, distance_buffer = torch.empty(size), torch.empty(size)
    for select, z, g, start, n in walk.pieces(logits):
        d = d_buffer[: C * n].view(C, n)
        cpu_kernels.run(cpu_kernels.centred_softmax_chunk, z, g, start, n, inv_temperature, centre, host_array(d),
                        *walk.tables)
        yield select, d, torch.mm(A_times_minus_2, d, out=distance_buffer[: C * n].view(C, n))


def _host_operands(operands):
    """``(-2 A, c, bias)`` of :func:`fastcal._operands.centred_prototypes`, as the float32 NumPy arrays
    the loops take, made once per prepared prototypes (see
    :class:`fastcal._operands.DistanceOperands`): a pixel's label is ``argmin_k bias[k] + (-2 A (p -
    c))[k]`` (scaling by -2 is exact)."""
    # .float(): NumPy has no bfloat16; float32 is what the loops take (exact for half precision)
    return operands.derived("cpu", lambda o: _centred_on_host(host_array(o.prototypes.float())))


def operands_pass(S: torch.Tensor, W: torch.Tensor, plan):
    """The prototypes (as :func:`fastcal.reference.prototypes_from_stats`) and the loops' operands,
    in two small serial loops where the sums are on the host (a few hundred values, for which
    PyTorch's or NumPy's per-operation overhead would be most of the time)."""
    C = W.shape[0]
    P = np.empty((C, C), np.float32)
    _cpu_kernels().prototypes_from_sums(host_array(S), host_array(W), plan.empty == "skip",
                                        _space.is_limit(plan.temperature), P)
    return DistanceOperands(torch.from_numpy(P), derived={"cpu": _centred_on_host(P)})


def _centred_on_host(P: np.ndarray):
    """``(-2 A, c, bias)`` of :func:`fastcal._operands.centred_prototypes` for float32 prototypes on
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
    inv_temperature = np.float32(_space.inverse(plan.temperature))
    walk = _walk(plan, logits, "predict")
    for select, z, g, start, n in walk.pieces(logits):
        cpu_kernels.run(cpu_kernels.predict_chunk, z, g, start, n, inv_temperature, centre, A_times_minus_2, bias,
                        host_array(select(labels)), *walk.tables)
    return labels


def predict_pass(logits: torch.Tensor, operands, plan):
    """The argmin of ``bias - 2 A (p - c)`` (see :func:`_host_operands`): in the fused loops up to
    ``cpu_kernels.NEAREST_MAX_CLASSES`` classes, else one GEMM a chunk and ``argmin_chunk``."""
    cpu_kernels = _cpu_kernels()

    labels = plan.output(logits.device)
    if logits.shape[1] <= cpu_kernels.NEAREST_MAX_CLASSES:
        return _fused_predict(logits, operands, plan, labels)
    bias = _host_operands(operands)[2]
    for select, d, distance in _fused_distances(logits, operands, plan):
        cpu_kernels.run(cpu_kernels.argmin_chunk, host_array(distance), bias, d.shape[1], host_array(select(labels)))
    return labels


def scores_pass(logits: torch.Tensor, operands, plan):
    """``-||v - P[k]||^2`` a chunk at a time (:func:`fastcal._chunks.write_scores`)."""
    bias = _cpu_operands(operands)[2]
    return _chunks.write_scores(plan.output(logits.device), bias, _fused_distances(logits, operands, plan))


def _cpu_operands(operands):
    """The arrays of :func:`_host_operands` viewed as CPU tensors (no copy)."""
    return tuple(torch.from_numpy(a) for a in _host_operands(operands))
