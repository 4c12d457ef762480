"""Fused CPU loops of the "numba" backend (:mod:`fastcal.numba_backend`), compiled by Numba.

Eager PyTorch spends a full pass over the logits on every step of the softmax
(max, subtract, exp, sum), on the argmax and on the scatter-add of the sums.
These loops do all of it in one read of the logits per pass, a block of
``BLOCK`` pixels at a time: the block's ``[C, BLOCK]`` exp values stay in the L1
or L2 cache between the steps. Every inner loop runs along the pixels, the
contiguous axis of NCHW logits, so it compiles to SIMD code.

Input: a C-contiguous ``z`` of shape ``[G, C, L]`` (an NCHW batch viewed as
``[N, C, H*W]``, or a ``[1, C, n]`` float32 chunk copied from any other layout);
a call covers the pixels ``start .. start + n`` of image ``g``. ``z`` is float32,
or the bits of float16 (as uint16) or bfloat16 (as int16) logits, widened to
float32 as they are loaded.

Math per pixel (as :mod:`fastcal.reference`, in float32)::

    m = max_k z_k,  cls = lowest k with z_k == m,  e_k = exp((z_k - m) / T),
    s = sum_k e_k,  conf = 1 / s,  p = e / s,  so  conf * p = e / s^2.

``exp`` is evaluated as ``2^t * poly(r)`` (``t`` an integer, ``|r| <= ln2/2``, a
degree-5 polynomial fitted for relative error; under 2 ulp against float64 ``exp``
in the tests); arguments below
``EXP_FLOOR`` give ``exp(EXP_FLOOR)`` = 1.6e-38, where float32 ``exp`` would give a
denormal or 0: a difference no sum or distance can see.

The stats pass is one call of ``stats_chunk`` per chunk. The predict pass is one call
of ``predict_chunk`` per chunk: per block, ``d = p - c`` (centred on the mean prototype
``c``), then each class's distance ``||A[k]||^2 - 2 d . A[k]`` summed over the block's
pixels and compared with the best so far, so that nothing but the label leaves the
caches. That is ``2C^2`` flops a pixel; from ``NEAREST_MAX_CLASSES`` classes on, a GEMM's
register tiling does them faster, and the pass is ``centred_softmax_chunk`` into a
chunk buffer, one ``torch.mm`` and ``argmin_chunk``.

Given the upsampling tables (``width, rows, cols``; ``0, NO_ROWS, NO_COLS`` without) the same loops read
the logits at the model's resolution and interpolate each block bilinearly where it is used (see
``_block_upsample``).

Memory traffic per pixel: ``stats_chunk`` reads ``C`` logits (``4C`` bytes in float32,
``2C`` in half precision; and one mask byte); ``predict_chunk`` reads the same and writes
one label. Beyond ``NEAREST_MAX_CLASSES``, ``centred_softmax_chunk`` writes ``4C`` bytes
of ``d`` into a chunk buffer and ``argmin_chunk`` reads ``4C`` bytes of distances. The
upsampled loops read each source logit about once per pass (a work unit interpolates
each source row it needs once along x, and keeps two).
"""
from __future__ import annotations

import sys
import time

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import event
from numba.extending import intrinsic

from . import _process

TILE = 16  # output columns a step of the interpolation along x: one 512-bit vector of float32
BAND = 8  # source columns a tile of the interpolation along x reads
BLOCK = 256  # pixels a block: [C, 256] float32 exp values, 19 KiB for C = 19, 256 KiB at most
UNITS = 16  # work items a call: enough for the threads, and fixed, so sums do not depend on the thread count
# Beyond this the float64 sums per work unit (UNITS * C^2 * 8 bytes, 8 MiB at 256) and the block
# outgrow the caches; more classes run PyTorch operations a chunk at a time (:mod:`fastcal.torch_ops`).
MAX_CLASSES = 256
# Up to this many classes the predict pass sums the distances in the loops, a block at a time; beyond,
# in a GEMM a chunk at a time (2 C^2 flops a pixel, where the GEMM's register tiling wins: measured
# faster in the loops at C = 19 and 32, slower from 48)
NEAREST_MAX_CLASSES = 32

# a * b + c may become one FMA; nothing else is relaxed: sums keep their order, and NaN and inf
# their IEEE meaning, which the finiteness check (v - v is NaN only for NaN and +-inf) relies on.
_FAST = {"contract"}

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two so that t * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)
EXP_FLOOR = np.float32(-87.0)  # exp(-87) = 1.6e-38, just above the smallest normal float32


_LOOPS = {}  # name -> dispatcher of the parallel loops, for the compile notice
_CACHED = {}  # name -> whether compiled loops are kept on disk


def _parallel_loop(fn, parallel=True):
    """``njit(parallel=True)``, cached on disk where Numba finds a writable folder (beside the
    package, ``NUMBA_CACHE_DIR`` or the user's cache folder); without one (read-only containers)
    the loops compile once per process instead of failing."""
    dispatcher = njit(parallel=parallel, fastmath=_FAST)(fn)
    try:
        dispatcher.enable_caching()
        _CACHED[fn.__name__] = True
    except RuntimeError:  # "cannot cache function ...: no locator available"
        _CACHED[fn.__name__] = False
    _LOOPS[fn.__name__] = dispatcher
    return dispatcher


# ----- calling the loops safely ---------------------------------------------------------------
# One call at a time: Numba's workqueue threading layer (its fallback without OpenMP or TBB) aborts
# the process on concurrent calls, and each call already keeps every core busy.
_lock = _process.Lock()
_LOGIT_TYPES = {"float32": "float32", "uint16": "float16", "int16": "bfloat16"}


class _CompileNotice(event.Listener):
    """Tells the user on stderr when one of the loops compiles (seconds, once per dtype)."""

    def __init__(self):
        self.started = None

    def on_start(self, ev):
        dispatcher = ev.data["dispatcher"]
        name = next((n for n, d in _LOOPS.items() if d is dispatcher), None)
        if name is None or self.started is not None:
            return
        self.started = time.perf_counter()
        z_type = ev.data["args"][0]
        logits = _LOGIT_TYPES.get(str(getattr(z_type, "dtype", "")), str(z_type))
        where = ("later runs load it from Numba's cache" if _CACHED[name]
                 else "no writable cache folder: set NUMBA_CACHE_DIR to keep it across runs")
        print(f"fastcal: compiling the CPU loop {name} for {logits} data ({where})...", file=sys.stderr, flush=True)

    def on_end(self, ev):
        if self.started is not None and ev.data["dispatcher"] in _LOOPS.values():
            print(f"fastcal: compiled in {time.perf_counter() - self.started:.1f} s", file=sys.stderr, flush=True)
            self.started = None


# registered once: it speaks only of the loops in _LOOPS (the parallel ones ``run`` calls and the
# small serial ones the backend calls directly), whichever way their first call comes
event.register("numba:compile", _CompileNotice())


def run(loop, *args):
    """Call one of the parallel loops below: one call at a time, telling the user when it compiles.

    Small calls go to the pool too: a call of 64 pixels is no slower on the pool than on one
    thread (the loops' OpenMP workers wait spinning between calls; ``python -m benchmarks.overhead``
    measures both, docs/overhead.md)."""
    with _lock:
        return loop(*args)


# ----- the loops ------------------------------------------------------------------------------
@intrinsic
def _float32_from_bits(typingctx, bits):
    """Reinterpret an int32 as a float32 (how ``2^t`` is built without a libm call)."""
    signature = types.float32(types.int32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())

    return signature, codegen


@intrinsic
def _to_float32(typingctx, value):
    """A logit as float32: float32 as is; float16 bits (read as uint16) and bfloat16 bits (read as
    int16) widened exactly, so half-precision logits are read in place at half the bytes."""
    if value == types.float32:
        return types.float32(value), lambda context, builder, sig, args: args[0]
    if value == types.uint16:
        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    elif value == types.int16:
        def codegen(context, builder, sig, args):
            bits = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(bits, ir.FloatType())
    else:
        return None
    return types.float32(value), codegen


@intrinsic
def _prefer_512_bit_vectors(typingctx):
    """Mark the function being compiled (the body of a parallel loop) to use 512-bit vectors, which
    LLVM avoids by default on Intel CPUs; these loops run ~10% faster with them."""
    signature = types.none()

    def codegen(context, builder, sig, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return signature, codegen


@njit(inline="always", fastmath=_FAST)
def _exp_nonpositive(x):
    """``exp(x)`` for ``x <= 0`` in float32, as straight-line code the loop vectorizer can use.
    Arguments below ``EXP_FLOOR`` (and NaN) give ``exp(EXP_FLOOR)``."""
    x = x if x > EXP_FLOOR else EXP_FLOOR
    t = np.floor(x * _LOG2E + np.float32(0.5))  # -126 <= t <= 0; a float (math.floor returns an int64)
    r = x - t * _LN2_HI - t * _LN2_LO
    # exp(r) = 1 + r q(r) on |r| <= ln2/2, q of degree 4 fitted for least relative error;
    # the constant term 1 keeps exp(0), the max class's term, exactly 1
    p = np.float32(0.00829031467)
    p = p * r + np.float32(0.0418979294)
    p = p * r + np.float32(0.166676362)
    p = p * r + np.float32(0.499991495)
    p = p * r + np.float32(0.999999707)
    p = p * r + np.float32(1.0)
    return p * _float32_from_bits((np.int32(t) + np.int32(127)) << np.int32(23))


@njit(inline="always", fastmath=_FAST)
def _block_max(z_image, start, count, z_max, cls, nonfinite):
    """Per pixel of the block: the max logit, the lowest class reaching it and ``nonfinite``, NaN
    when a logit is NaN or infinite (``v - v`` is then NaN) and 0 otherwise."""
    row = z_image[0, start:start + count]
    for i in range(count):
        v = _to_float32(row[i])
        z_max[i] = v
        cls[i] = 0
        nonfinite[i] = v - v
    for k in range(1, z_image.shape[0]):
        row = z_image[k, start:start + count]
        for i in range(count):
            v = _to_float32(row[i])
            greater = v > z_max[i]  # strict: ties keep the lower class
            z_max[i] = v if greater else z_max[i]
            cls[i] = k if greater else cls[i]
            nonfinite[i] += v - v


@njit(inline="always", fastmath=_FAST)
def _block_plain_max(z_image, start, count, z_max):
    """Per pixel of the block: the max logit (what the predict pass needs, and no more)."""
    row = z_image[0, start:start + count]
    for i in range(count):
        z_max[i] = _to_float32(row[i])
    for k in range(1, z_image.shape[0]):
        row = z_image[k, start:start + count]
        for i in range(count):
            v = _to_float32(row[i])
            z_max[i] = v if v > z_max[i] else z_max[i]


@njit(inline="always", fastmath=_FAST)
def _block_exp(z_image, start, count, inv_temperature, z_max, e, e_start, e_sum):
    """``e[k, e_start + i] = exp((z[k, start + i] - max) / T)`` and, when ``e_sum`` has room,
    ``e_sum[i] = sum_k e[k, e_start + i]``. At the limit (``inv_temperature == 0``, see
    ``fastcal._space``) ``e = z - max``, with no exponential: the pixels' vectors are then ``e``
    centred on its mean (by the callers)."""
    with_sum = e_sum.shape[0] > 0
    limit = inv_temperature == np.float32(0.0)
    if with_sum:
        for i in range(count):
            e_sum[i] = 0.0
    for k in range(z_image.shape[0]):
        row = z_image[k, start:start + count]
        e_k = e[k, e_start:e_start + count]
        if limit:
            for i in range(count):
                v = _to_float32(row[i]) - z_max[i]
                e_k[i] = v
                if with_sum:
                    e_sum[i] += v
            continue
        for i in range(count):
            v = _exp_nonpositive((_to_float32(row[i]) - z_max[i]) * inv_temperature)
            e_k[i] = v
            if with_sum:
                e_sum[i] += v


# not inlined: one call per block, compiled once per source type for the variants of the stats
# loop (inlined, each variant compiled it again: a quarter of the loop's compile time)
@njit(fastmath=_FAST)
def _stats_block(src, src_start, count, inv_temperature, power, valid, valid_start, masked, scratch, S_u, W_u, N_u):
    """Add the block's ``S[cls] += w * p``, ``W[cls] += w`` with ``w = conf ** power``, and ``N[cls] += 1``
    (pixels ``src_start ..`` of ``src`` [C, L]) into ``S_u``, ``W_u``, ``N_u`` through float32 block
    sums; returns the non-finite valid pixels. At the limit (``inv_temperature == 0``) ``p`` is the
    centred logits and ``w = 1``."""
    _prefer_512_bit_vectors()
    z_max, cls, nonfinite, e_sum, e, S_block, W_block, N_block = scratch
    C = src.shape[0]
    limit = inv_temperature == np.float32(0.0)
    inv_classes = np.float32(1.0) / np.float32(C)
    _block_max(src, src_start, count, z_max, cls, nonfinite)
    _block_exp(src, src_start, count, inv_temperature, z_max, e, 0, e_sum)
    S_block[:] = 0.0
    W_block[:] = 0.0
    N_block[:] = 0.0
    bad = 0
    for i in range(count):
        if masked and valid[valid_start + i] == 0:
            continue
        if nonfinite[i] != 0.0:
            bad += 1
            continue
        if limit:  # v = e - mean e, w = 1
            k = cls[i]
            mean = e_sum[i] * inv_classes
            W_block[k] += np.float32(1.0)
            N_block[k] += np.float32(1.0)
            for j in range(C):
                S_block[k, j] += e[j, i] - mean
            continue
        conf = np.float32(1.0) / e_sum[i]
        w = conf if power == np.float32(1.0) else conf ** power
        weight = conf * w  # w * p = w * conf * e
        k = cls[i]
        W_block[k] += w
        N_block[k] += np.float32(1.0)
        for j in range(C):
            S_block[k, j] += weight * e[j, i]
    for k in range(C):  # float32 within a block of pixels, float64 beyond
        W_u[k] += W_block[k]
        N_u[k] += N_block[k]
        for j in range(C):
            S_u[k, j] += S_block[k, j]
    return bad


@njit(inline="always")
def _stats_scratch(C):
    return (np.empty(BLOCK, np.float32), np.empty(BLOCK, np.int32), np.empty(BLOCK, np.float32),
            np.empty(BLOCK, np.float32), np.empty((C, BLOCK), np.float32), np.empty((C, C), np.float32),
            np.empty(C, np.float32), np.empty(C, np.float32))


# not inlined, as _stats_block: compiled once per source type for the predict loops' variants
@njit(fastmath=_FAST)
def _centred_block(src, src_start, count, inv_temperature, centre, d, d_start, scratch):
    """``d[k, d_start + i] = p_k - centre[k]`` for the block's pixels ``src_start ..`` of ``src`` (at
    the limit, ``inv_temperature == 0``: ``p`` is the centred logits); ``scratch`` from
    :func:`_centred_scratch`."""
    _prefer_512_bit_vectors()
    z_max, e_sum = scratch
    _block_plain_max(src, src_start, count, z_max)
    _block_exp(src, src_start, count, inv_temperature, z_max, d, d_start, e_sum)
    if inv_temperature == np.float32(0.0):
        inv_classes = np.float32(1.0) / np.float32(src.shape[0])
        for i in range(count):
            e_sum[i] = e_sum[i] * inv_classes  # the mean
        for k in range(src.shape[0]):
            d_k = d[k, d_start:d_start + count]
            c_k = centre[k]
            for i in range(count):
                d_k[i] = d_k[i] - e_sum[i] - c_k
        return
    for i in range(count):
        e_sum[i] = np.float32(1.0) / e_sum[i]
    for k in range(src.shape[0]):
        d_k = d[k, d_start:d_start + count]
        c_k = centre[k]
        for i in range(count):
            d_k[i] = d_k[i] * e_sum[i] - c_k


@njit(inline="always")
def _centred_scratch():
    """``(z_max, e_sum)`` for :func:`_centred_block`."""
    return np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32)


@njit(inline="always", fastmath=_FAST)
def _source_row(z_image, offset, cols, padded, out):
    """``out[k, x]``: source row ``offset`` (of ``z_image`` [C, H*W]) interpolated along x to the
    output columns, ``(1 - wx) z[x0] + wx z[x1]``.

    Each class's source row is first copied into ``padded`` as float32, followed by copies of its
    last value, so that ``x1 = x0 + 1`` for every column. Then, a tile of ``TILE`` output columns
    at a time, ``out[tile] = sum_s padded[first + s] * weights[s]`` over the ``BAND`` source
    columns from the tile's ``first`` (weights ``1 - wx`` at ``x0``, ``wx`` at ``x0 + 1``, zero
    elsewhere; so each value is ``(1 - wx) z[x0]`` rounded, then one multiply-add): eight
    broadcast multiply-adds a tile instead of two gathers per output value. Rows with a NaN or
    infinite logit take the gathers, as zero weights times NaN would spread it over the tile,
    and so do all rows when a tile spans more than ``BAND`` source columns (a factor below
    about 2.5; ``first`` is then empty)."""
    in_width, col0, col_weight, first, weights = cols
    one = np.float32(1.0)
    for k in range(z_image.shape[0]):
        source = z_image[k, offset:offset + in_width]
        nonfinite = 0
        for x in range(in_width):
            v = _to_float32(source[x])
            padded[x] = v
            nonfinite += (v - v) != 0  # NaN for NaN and +-inf; an integer sum, so it vectorizes
        for x in range(in_width, padded.shape[0]):
            padded[x] = padded[in_width - 1]
        out_k = out[k]
        if nonfinite == 0 and first.shape[0] > 0:
            for t in range(first.shape[0]):
                # one expression over fixed slots: a loop over the slots, or += per slot, runs 2-4x slower
                f = first[t]
                p0, p1, p2, p3 = padded[f], padded[f + 1], padded[f + 2], padded[f + 3]
                p4, p5, p6, p7 = padded[f + 4], padded[f + 5], padded[f + 6], padded[f + 7]
                w = weights[t]
                for i in range(TILE):
                    out_k[t * TILE + i] = (p0 * w[0, i] + p1 * w[1, i] + p2 * w[2, i] + p3 * w[3, i]
                                           + p4 * w[4, i] + p5 * w[5, i] + p6 * w[6, i] + p7 * w[7, i])
        else:
            for x in range(out_k.shape[0]):
                out_k[x] = (one - col_weight[x]) * padded[col0[x]] + col_weight[x] * padded[col0[x] + 1]


@njit(inline="always")
def _upsample_scratch(C, cols, width):
    """``(block, rows_cache, cached, padded)`` for :func:`_block_upsample` (empty without upsampling,
    ``width`` 0). The callers unpack them and pass them one by one: handed down as one tuple through
    the inlined helpers of a parallel loop, the writes into ``cached`` did not reach the next block
    (every block interpolated its rows anew)."""
    in_width, col0 = cols[0], cols[1]
    block_pixels = BLOCK if width > 0 else 0
    return (np.empty((C, block_pixels), np.float32), np.empty((2, C, col0.shape[0]), np.float32),
            np.full(2, -1, np.int64), np.empty(in_width + BAND, np.float32))


@njit(inline="always")
def _cached_source_row(z_image, offset, keep, cols, rows_cache, cached, padded):
    """The slot of ``rows_cache`` [2, C, W_out] holding source row ``offset`` interpolated along x,
    computing it into the slot that does not hold row ``keep`` when it is not there yet."""
    for slot in range(2):
        if cached[slot] == offset:
            return slot
    slot = 1 if cached[0] == keep else 0
    _source_row(z_image, offset, cols, padded, rows_cache[slot])
    cached[slot] = offset
    return slot


# not inlined: one call per block, compiled once per dtype for the three loops that read through it
# (inlined, it doubled their compile time)
@njit(fastmath=_FAST)
def _block_upsample(z_image, start, count, width, rows, cols, out, rows_cache, cached, padded):
    """``out[k, i]``: the bilinear value of output pixel ``start + i`` (row-major, ``width`` columns),
    ``(1 - wy) ((1 - wx) z[y0, x0] + wx z[y0, x1]) + wy ((1 - wx) z[y1, x0] + wx z[y1, x1])`` as
    ``F.interpolate`` forms it (``rows_cache``, ``cached`` and ``padded`` from :func:`_upsample_scratch`).

    The two source rows of an output row are interpolated along x once and kept in ``rows_cache``
    (``cached`` holds their offsets), so consecutive blocks and output rows of a work unit reuse
    them: the work along x happens once per source row, the blend along y is contiguous.
    ``rows`` = (offset of source row y0, of y1, weight of y1) per output row, ``cols`` = (source
    width, x0 and weight of x1 per output column, then the bands of :func:`_source_row`), as
    ``fastcal.numba_backend`` prepares them."""
    row0, row1, row_weight = rows
    one = np.float32(1.0)
    i = 0
    while i < count:
        y = (start + i) // width
        x_start = start + i - y * width
        segment = min(count - i, width - x_start)  # the block's pixels on output row y
        top = _cached_source_row(z_image, row0[y], row1[y], cols, rows_cache, cached, padded)
        bottom = _cached_source_row(z_image, row1[y], row0[y], cols, rows_cache, cached, padded)
        wy = row_weight[y]
        for k in range(z_image.shape[0]):
            top_k = rows_cache[top, k, x_start:x_start + segment]
            bottom_k = rows_cache[bottom, k, x_start:x_start + segment]
            out_k = out[k, i:i + segment]
            for j in range(segment):
                out_k[j] = (one - wy) * top_k[j] + wy * bottom_k[j]
        i += segment


# ----- one skeleton for both readers ---------------------------------------------------------------
# Every loop below walks the blocks of a call the same way, in ``units`` contiguous runs of blocks
# (one per prange iteration), and reads each block either from the logits themselves (``width`` 0)
# or from the block's bilinear interpolation (``width`` output columns, ``rows`` and ``cols`` the
# tables of ``_block_upsample``; without upsampling, empty tables of the same types: ``NO_ROWS``,
# ``NO_COLS``). The choice is a branch per block, not a type: each loop compiles once per logit
# type for both readers, and the block helpers it calls (compiled once per source type) do the work.
NO_ROWS = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
NO_COLS = (0, np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64),
           np.zeros((0, BAND, TILE), np.float32))


@_parallel_loop
def stats_chunk(z, g, start, n, inv_temperature, power, valid, S_parts, W_parts, N_parts, width, rows, cols):
    """Add ``S[cls] += w * p``, ``W[cls] += w`` (``w = conf ** power``) and ``N[cls] += 1`` over pixels
    ``start .. start + n`` of image ``g`` (of its bilinear upsampling with ``rows`` and ``cols``: ``z``
    [G, C, H*W] at the input resolution, ``width`` output columns; None and None: no upsampling) into
    ``S_parts[u]`` [C, C], ``W_parts[u]`` and ``N_parts[u]`` [C] (float64, one slot per work unit
    ``u``: ``UNITS`` of them whatever the thread count, so the sums do not depend on it).

    ``valid``: uint8 [n], or empty for all pixels valid. Returns how many valid pixels have a NaN or
    infinite logit; those add nothing to the sums.
    """
    z_image = z[g]
    C = z.shape[1]
    blocks = (n + BLOCK - 1) // BLOCK
    nonfinite_parts = np.zeros(UNITS, np.int64)
    masked = valid.shape[0] > 0
    for u in prange(UNITS):
        _prefer_512_bit_vectors()
        scratch = _stats_scratch(C)
        block, rows_cache, cached, padded = _upsample_scratch(C, cols, width)
        bad = 0
        for b in range(u * blocks // UNITS, (u + 1) * blocks // UNITS):
            offset = b * BLOCK
            count = min(BLOCK, n - offset)
            if width > 0:
                _block_upsample(z_image, start + offset, count, width, rows, cols, block, rows_cache, cached, padded)
                bad += _stats_block(block, 0, count, inv_temperature, power, valid, offset, masked, scratch,
                                    S_parts[u], W_parts[u], N_parts[u])
            else:
                bad += _stats_block(z_image, start + offset, count, inv_temperature, power, valid, offset, masked,
                                    scratch, S_parts[u], W_parts[u], N_parts[u])
        nonfinite_parts[u] = bad
    return nonfinite_parts.sum()


@_parallel_loop
def centred_softmax_chunk(z, g, start, n, inv_temperature, centre, d, units, width, rows, cols):
    """``d[k, i] = p_k - centre[k]`` into ``d`` [C, n], ``p = softmax(z[g, :, start + i] / T)`` (of the
    bilinear upsampling with ``rows`` and ``cols``, see :func:`stats_chunk`), in ``units`` contiguous runs of
    blocks (one a thread: with upsampling, the more blocks a run has, the more share their source rows).

    The predict pass multiplies ``d`` by the centred prototypes (see
    ``fastcal._operands.centred_prototypes``): centring keeps the distances' float32 precision."""
    z_image = z[g]
    C = z.shape[1]
    blocks = (n + BLOCK - 1) // BLOCK
    for u in prange(units):
        _prefer_512_bit_vectors()
        block, rows_cache, cached, padded = _upsample_scratch(C, cols, width)
        scratch = _centred_scratch()
        for b in range(u * blocks // units, (u + 1) * blocks // units):
            offset = b * BLOCK
            count = min(BLOCK, n - offset)
            if width > 0:
                _block_upsample(z_image, start + offset, count, width, rows, cols, block, rows_cache, cached, padded)
                _centred_block(block, 0, count, inv_temperature, centre, d, offset, scratch)
            else:
                _centred_block(z_image, start + offset, count, inv_temperature, centre, d, offset, scratch)


# not inlined: compiled once for every variant of the predict loop (it reads float32 only, and writes
# the labels into an int32 block the loop copies into the output's dtype)
@njit(fastmath=_FAST)
def _block_nearest(d, count, A, bias, scratch):
    """``label[i] = argmin_k bias[k] + sum_j A[k, j] d[j, i]`` (lowest k on ties) for the block's
    ``count`` pixels of ``d`` [C, BLOCK], into ``label``, the int32 third array of ``scratch``.

    Each class's row of distances is summed in ``distance`` [BLOCK] and compared at once, so the
    [C, BLOCK] distances are never stored. Eight classes of ``d`` a step (then four, then one):
    each step reads and writes the row once for eight multiply-adds (one a step would be bound by
    those loads and stores; eight measured 6% faster than four at C = 19)."""
    _prefer_512_bit_vectors()
    distance, best, label = scratch
    C = d.shape[0]
    eights = C - C % 8
    fours = C - C % 4
    for k in range(C):
        bias_k = bias[k]
        for i in range(count):
            distance[i] = bias_k
        for j in range(0, eights, 8):
            a0, a1, a2, a3 = A[k, j], A[k, j + 1], A[k, j + 2], A[k, j + 3]
            a4, a5, a6, a7 = A[k, j + 4], A[k, j + 5], A[k, j + 6], A[k, j + 7]
            d0, d1, d2, d3 = d[j, :count], d[j + 1, :count], d[j + 2, :count], d[j + 3, :count]
            d4, d5, d6, d7 = d[j + 4, :count], d[j + 5, :count], d[j + 6, :count], d[j + 7, :count]
            for i in range(count):
                distance[i] += (a0 * d0[i] + a1 * d1[i] + a2 * d2[i] + a3 * d3[i]
                                + a4 * d4[i] + a5 * d5[i] + a6 * d6[i] + a7 * d7[i])
        for j in range(eights, fours, 4):
            a0, a1, a2, a3 = A[k, j], A[k, j + 1], A[k, j + 2], A[k, j + 3]
            d0, d1, d2, d3 = d[j, :count], d[j + 1, :count], d[j + 2, :count], d[j + 3, :count]
            for i in range(count):
                distance[i] += a0 * d0[i] + a1 * d1[i] + a2 * d2[i] + a3 * d3[i]
        for j in range(fours, C):
            a_j, d_j = A[k, j], d[j, :count]
            for i in range(count):
                distance[i] += a_j * d_j[i]
        if k == 0:
            for i in range(count):
                best[i] = distance[i]
                label[i] = 0
        else:
            for i in range(count):
                smaller = distance[i] < best[i]  # strict: ties keep the lower class
                best[i] = distance[i] if smaller else best[i]
                label[i] = k if smaller else label[i]


@njit(inline="always")
def _nearest_scratch(C):
    """``(d, (distance, best, label))`` for :func:`_block_nearest`."""
    return np.empty((C, BLOCK), np.float32), (np.empty(BLOCK, np.float32), np.empty(BLOCK, np.float32),
                                              np.empty(BLOCK, np.int32))


@_parallel_loop
def predict_chunk(z, g, start, n, inv_temperature, centre, A, bias, labels, units, width, rows, cols):
    """``labels[i] = argmin_k bias[k] + (A (p - centre))[k]`` for pixels ``start .. start + n`` of image
    ``g`` (of its bilinear upsampling with ``rows`` and ``cols``, see :func:`stats_chunk`),
    ``p = softmax(z[g, :, start + i] / T)``: with ``A = -2 (P - c)``, ``bias[k] = ||P[k] - c||^2`` and
    ``centre = c`` (see ``fastcal._operands.centred_prototypes``), the nearest prototype. ``units``
    contiguous runs of blocks, as in :func:`centred_softmax_chunk`.

    Every step of a block stays in the caches: softmax, distances, argmin; one label written."""
    z_image = z[g]
    C = z.shape[1]
    blocks = (n + BLOCK - 1) // BLOCK
    for u in prange(units):
        _prefer_512_bit_vectors()
        d, scratch = _nearest_scratch(C)
        label = scratch[2]
        block, rows_cache, cached, padded = _upsample_scratch(C, cols, width)
        centred = _centred_scratch()
        for b in range(u * blocks // units, (u + 1) * blocks // units):
            offset = b * BLOCK
            count = min(BLOCK, n - offset)
            if width > 0:
                _block_upsample(z_image, start + offset, count, width, rows, cols, block, rows_cache, cached, padded)
                _centred_block(block, 0, count, inv_temperature, centre, d, 0, centred)
            else:
                _centred_block(z_image, start + offset, count, inv_temperature, centre, d, 0, centred)
            _block_nearest(d, count, A, bias, scratch)
            out = labels[offset:offset + count]
            for i in range(count):
                out[i] = label[i]


@_parallel_loop
def argmin_chunk(distance, bias, n, labels):
    """``labels[i] = argmin_k bias[k] + distance[k, i]`` for ``i < n``, lowest k on ties."""
    C = distance.shape[0]
    blocks = (n + BLOCK - 1) // BLOCK
    for b in prange(blocks):
        _prefer_512_bit_vectors()
        offset = b * BLOCK
        count = min(BLOCK, n - offset)
        best = np.empty(BLOCK, np.float32)
        label = np.zeros(BLOCK, np.int32)
        row = distance[0, offset:offset + count]
        for i in range(count):
            best[i] = bias[0] + row[i]
        for k in range(1, C):
            row = distance[k, offset:offset + count]
            bias_k = bias[k]
            for i in range(count):
                v = bias_k + row[i]
                smaller = v < best[i]  # strict: ties keep the lower class
                best[i] = v if smaller else best[i]
                label[i] = k if smaller else label[i]
        out = labels[offset:offset + count]
        for i in range(count):
            out[i] = label[i]


# ----- between the passes: the prototypes and the loops' operands (a few hundred values) -------------
def _serial_loop(fn):
    """As :func:`_parallel_loop`, on the calling thread: for the C x C values of the prototypes,
    where a thread pool has nothing to share out."""
    return _parallel_loop(fn, parallel=False)


@_serial_loop
def prototypes_from_sums(S, W, skip, limit, P):
    """``P[k] = S[k] / W[k]`` rounded to float32 (as ``fastcal.reference.prototypes_from_stats``); an
    empty class (``W[k] == 0``) gets ``e_k``, or NaN with ``skip``; at the ``limit`` NaN while any
    class has weight, else ``e_k - 1/C`` (see ``fastcal._space.empty_rows``)."""
    C = W.shape[0]
    any_weight = False
    for k in range(C):
        any_weight = any_weight or W[k] != 0.0
    for k in range(C):
        for j in range(C):
            if W[k] != 0.0:
                P[k, j] = np.float32(S[k, j] / W[k])
            elif skip or (limit and any_weight):
                P[k, j] = np.float32(np.nan)
            elif limit:
                P[k, j] = np.float32((1.0 if j == k else 0.0) - 1.0 / C)
            else:
                P[k, j] = np.float32(1.0 if j == k else 0.0)


@_serial_loop
def centred_operands(P, A_times_minus_2, centre, bias):
    """``(-2 A, c, bias)`` of ``fastcal._operands.centred_prototypes`` for float32 prototypes ``P``:
    ``c`` the float64 mean of the rows that are not all NaN, rounded to float32, ``A[k] = P[k] - c``
    and ``bias[k] = ||A[k]||^2`` in float64 (a row of NaN: ``A[k] = 0``, ``bias = +inf``)."""
    C = P.shape[0]
    kept = np.empty(C, np.bool_)
    count = 0
    for k in range(C):
        all_nan = True
        for j in range(C):
            if not np.isnan(P[k, j]):
                all_nan = False
        kept[k] = not all_nan
        count += 1 if kept[k] else 0
    total = np.zeros(C)
    for k in range(C):
        if kept[k]:
            for j in range(C):
                total[j] += np.float64(P[k, j])
    for j in range(C):
        centre[j] = np.float32(total[j] / max(count, 1))
    for k in range(C):
        squares = 0.0
        for j in range(C):
            a = np.float64(P[k, j]) - np.float64(centre[j]) if kept[k] else 0.0
            A_times_minus_2[k, j] = np.float32(a) * np.float32(-2.0)
            squares += a * a
        bias[k] = np.float32(squares) if kept[k] else np.float32(np.inf)


@_serial_loop
def sum_units(S_parts, W_parts, N_parts, S, W, N):
    """The work units' float64 partial sums added in unit order (a fixed order: the sums do not
    depend on the thread count)."""
    # scalar loops: array expressions would compile NumPy's broadcasting machinery (seconds) for this
    for k in range(S.shape[0]):
        W[k] = W_parts[0, k]
        N[k] = N_parts[0, k]
        for j in range(S.shape[1]):
            S[k, j] = S_parts[0, k, j]
    for u in range(1, S_parts.shape[0]):
        for k in range(S.shape[0]):
            W[k] += W_parts[u, k]
            N[k] += N_parts[u, k]
            for j in range(S.shape[1]):
                S[k, j] += S_parts[u, k, j]
