"""The stats pass: prototype sums ``S`` [C, C] and weights ``W`` [C] in one read of the logits.

Math (per valid pixel x, temperature T, ``scale = log2(e) / T``)::

    e_j     = 2 ** ((z_j - max z) * scale)      p = e / sum(e)      conf = 1 / sum(e)
    cls     = argmax_j z_j                       (lowest j on ties)
    w       = conf ** power                      (the confidence power; conf itself when power = 1)
    S[cls] += w * p = w * conf * e               W[cls] += w               N[cls] += 1

At the limit (``LIMIT``, ``temperature=math.inf``; see ``fastcal._space``) no exponential: ``p`` is the
centred logits ``z - mean z``, formed as ``(z - max) - mean (z - max)``, and ``w = 1``.

Within a program the sums are ``onehot(cls)^T @ [w p | w | 1]`` as a ``tl.dot`` over
its pixel tiles (float32 from two TF32 products on tensor cores, see
``onehot_dot``): the two columns past the C classes carry the weight and a 1 per
pixel used, so one product gives ``S``, ``W`` and ``N`` with no reduction of their
own. The sums accumulate over every tile the persistent program visits, then are
flushed once: C^2 + 2C float64 atomic adds per program, or, in deterministic
mode, a store of the program's partial that the host sums in a fixed order.

Two schedules:

* ``C + 2 <= FUSED_MAX_CLASSES``: one kernel, the whole class axis (and the two
  columns of ``W`` and ``N``) in one block.
  Memory traffic per pixel: reads ``C * sizeof(dtype)`` (+1 byte with a mask).
* larger C: ``_row_stats_kernel`` walks the class axis in blocks with an online
  max / sum / argmax and writes 12 bytes per pixel (max, conf, cls); then
  ``_stats_kernel`` runs on a (pixels x k-block x j-block) grid (the j-blocks cover
  ``C + 2`` columns), each program reading only its j-block of classes: ``C * sizeof(dtype) * (1 + cdiv(C, BLOCK))``
  bytes per pixel are requested, plus the row statistics (12 bytes written, 12
  read by each of the ``cdiv(C, BLOCK)^2`` programs); the k-blocks of one pixel
  range are adjacent in the grid so that L2 can serve the repeats.

Non-finite logits at valid pixels are counted (and left out of the sums) so the
caller can reject the batch without a second pass.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from types import MappingProxyType

import torch
import triton
import triton.language as tl

from ._launch import Launch
from ._layout import launch_layout, triton_cdiv
from ._tile import is_finite, load_classes, online_centred_update, online_softmax_update, pixel_position
from .configs import CHUNK_CLASSES, FUSED_MAX_CLASSES, LOG2E, TARGETS, entry, max_programs, target_of

PARTIALS_BUDGET = 1 << 28     # bytes of per-program partials in deterministic mode


@triton.jit
def onehot_dot(b_onehot, b_x, PRECISION: tl.constexpr):
    """``b_onehot @ b_x`` to about 2^-22 relative error.

    ``PRECISION="tf32"``: two TF32 products. A one-hot matrix is exact in TF32, so splitting
    only ``b_x`` into a TF32 head and its float32 remainder recovers what 3xTF32 would, with one
    product less. ``"ieee"``: one float32 product (AMD's matrix cores run it natively).
    """
    if PRECISION == "tf32":
        b_hi = (b_x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        b_lo = b_x - b_hi
        b_out = tl.dot(b_onehot, b_hi, input_precision="tf32")
        b_out = tl.dot(b_onehot, b_lo, b_out, input_precision="tf32")
    else:
        b_out = tl.dot(b_onehot, b_x, input_precision="ieee")
    return b_out


@triton.jit
def _row_stats_kernel(
    z_ptr, valid_ptr, max_ptr, conf_ptr, cls_ptr, bad_ptr,
    C, L, O1, O2, so0, so1, so2, s_l, s_c, scale, n_tiles, off_ptr, wgt_ptr, H_UP, W_UP,
    HAS_VALID: tl.constexpr, UPSAMPLE: tl.constexpr, LIMIT: tl.constexpr, C_BLOCK: tl.constexpr,
    PIX_BLOCK: tl.constexpr,
):
    """Per pixel: running max, argmax and sum of exponentials over class blocks.

    Writes ``max z`` (fp32), ``conf`` (fp32, 0 for pixels left out) and ``cls``
    (int32): reads ``C * sizeof(dtype)`` and writes 12 bytes per pixel. With LIMIT, no exponential:
    ``conf`` is the mean of ``z - max``, and ``cls`` -1 marks the pixels left out.
    """
    tile = tl.program_id(0)
    o_z, o01, o10, o11, wy, wx, o_pix, m_pix = pixel_position(
        tile, L, O1, O2, so0, so1, so2, s_l, off_ptr, wgt_ptr, H_UP, W_UP, UPSAMPLE, PIX_BLOCK)
    o_c = tl.arange(0, C_BLOCK)
    b_max = tl.full([PIX_BLOCK], float("-inf"), tl.float32)
    b_sum = tl.zeros([PIX_BLOCK], tl.float32)
    b_cls = tl.zeros([PIX_BLOCK], tl.int32)
    b_finite = m_pix
    for c0 in range(0, C, C_BLOCK):
        o_cls = c0 + o_c
        b_raw = load_classes(z_ptr, o_z, o01, o10, o11, wy, wx, m_pix, o_cls, C, s_c, UPSAMPLE)
        m_cls = (o_cls < C)[:, None]
        m_finite = is_finite(b_raw)
        b_finite &= tl.min(tl.where(m_cls, m_finite, True).to(tl.int32), 0) > 0
        b_z = tl.where(m_cls & m_finite, b_raw, float("-inf"))  # a NaN never wins the argmax
        c_max = tl.max(b_z, 0)
        c_cls = tl.argmax(b_z, 0, tie_break_left=True).to(tl.int32) + c0
        b_cls = tl.where(c_max > b_max, c_cls, b_cls)  # strict: an equal later block keeps the lower class
        if LIMIT:
            b_max, b_sum = online_centred_update(b_max, b_sum, b_z, o_cls, C)
        else:
            b_max, b_sum = online_softmax_update(b_max, b_sum, b_z, scale)
    m_use = m_pix
    if HAS_VALID:
        m_use &= tl.load(valid_ptr + o_pix, mask=m_pix, other=0) != 0
    tl.atomic_add(bad_ptr, tl.sum((m_use & ~b_finite).to(tl.int32), 0))
    m_use &= b_finite
    tl.store(max_ptr + o_pix, b_max, mask=m_pix)
    if LIMIT:
        tl.store(conf_ptr + o_pix, b_sum / C, mask=m_pix)
        tl.store(cls_ptr + o_pix, tl.where(m_use, b_cls, -1), mask=m_pix)
    else:
        tl.store(conf_ptr + o_pix, tl.where(m_use, 1.0 / b_sum, 0.0), mask=m_pix)
        tl.store(cls_ptr + o_pix, b_cls, mask=m_pix)


@triton.jit
def _stats_kernel(
    z_ptr, valid_ptr, max_ptr, conf_ptr, cls_ptr, S_ptr, W_ptr, N_ptr, bad_ptr,
    C, L, O1, O2, so0, so1, so2, s_l, s_c, scale, power, n_tiles, off_ptr, wgt_ptr, H_UP, W_UP,
    HAS_VALID: tl.constexpr, FUSED: tl.constexpr, PARTIALS: tl.constexpr, UPSAMPLE: tl.constexpr,
    POWERED: tl.constexpr, LIMIT: tl.constexpr, C_BLOCK: tl.constexpr, PIX_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Block ``S[k-block, j-block]`` (and ``W``, ``N`` of the k-block) over this program's pixel tiles.

    FUSED: the tile holds every class; softmax, argmax and conf are computed
    here and ``max_ptr``/``conf_ptr``/``cls_ptr`` are unused. Otherwise they
    come from ``_row_stats_kernel``. PARTIALS: store the program's partial sums
    (float32) instead of adding them atomically (float64). POWERED: pixels weigh ``conf ** power``
    instead of ``conf``. LIMIT: ``p`` is the centred logits and every pixel used weighs 1.
    """
    pid = tl.program_id(0)
    k0 = tl.program_id(1) * C_BLOCK
    j0 = tl.program_id(2) * C_BLOCK
    o_k = k0 + tl.arange(0, C_BLOCK)
    o_j = j0 + tl.arange(0, C_BLOCK)
    m_j = (o_j < C)[:, None]
    b_S = tl.zeros([C_BLOCK, C_BLOCK], tl.float32)
    n_bad = tl.zeros([PIX_BLOCK], tl.int32)
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        o_z, o01, o10, o11, wy, wx, o_pix, m_pix = pixel_position(
            tile, L, O1, O2, so0, so1, so2, s_l, off_ptr, wgt_ptr, H_UP, W_UP, UPSAMPLE, PIX_BLOCK)
        b_raw = load_classes(z_ptr, o_z, o01, o10, o11, wy, wx, m_pix, o_j, C, s_c, UPSAMPLE)
        if FUSED:
            m_finite = is_finite(b_raw)
            b_finite = tl.min(tl.where(m_j, m_finite, True).to(tl.int32), 0) > 0
            b_z = tl.where(m_j & m_finite, b_raw, float("-inf"))  # a NaN never wins the argmax
            b_max = tl.max(b_z, 0)
            b_cls = tl.argmax(b_z, 0, tie_break_left=True)
            if LIMIT:  # z - mean z, as (z - max) - mean (z - max)
                b_e = tl.where(m_j, b_z - b_max[None, :], 0.0)
                b_e = b_e - (tl.sum(b_e, 0) / C)[None, :]
                b_conf = tl.full([PIX_BLOCK], 1.0, tl.float32)
            else:
                b_e = tl.exp2((b_z - b_max[None, :]) * scale)
                b_conf = 1.0 / tl.sum(b_e, 0)
            m_use = m_pix
            if HAS_VALID:
                m_use &= tl.load(valid_ptr + o_pix, mask=m_pix, other=0) != 0
            n_bad += (m_use & ~b_finite).to(tl.int32)
            b_w = tl.where(m_use & b_finite, b_conf, 0.0)
        elif LIMIT:  # max and mean of z - max from _row_stats_kernel; cls -1 marks the pixels left out
            b_max = tl.load(max_ptr + o_pix, mask=m_pix, other=0.0)
            b_mean = tl.load(conf_ptr + o_pix, mask=m_pix, other=0.0)
            b_cls = tl.load(cls_ptr + o_pix, mask=m_pix, other=-1)
            b_w = (b_cls >= 0).to(tl.float32)
            b_e = (b_raw - b_max[None, :]) - b_mean[None, :]
        else:
            b_max = tl.load(max_ptr + o_pix, mask=m_pix, other=0.0)
            b_w = tl.load(conf_ptr + o_pix, mask=m_pix, other=0.0)
            b_cls = tl.load(cls_ptr + o_pix, mask=m_pix, other=-1)
            b_e = tl.exp2((b_raw - b_max[None, :]) * scale)
        if POWERED:  # conf >= 1/C at every pixel used; 0 marks the pixels left out (no log2(0))
            b_weight = tl.where(b_w > 0, tl.exp2(power * tl.log2(tl.maximum(b_w, 1e-30))), 0.0)
        else:
            b_weight = b_w
        b_cp = tl.where(m_j & (b_w > 0)[None, :], b_e * (b_w * b_weight)[None, :], 0.0)
        b_onehot = o_k[:, None] == b_cls[None, :]
        # columns C and C + 1 (past the classes) carry the weight and a 1 per pixel used: the
        # same product sums W and N, with no reduction of their own
        b_cp = tl.where((o_j == C)[:, None], b_weight[None, :], b_cp)
        b_cp = tl.where((o_j == C + 1)[:, None], (b_w > 0).to(tl.float32)[None, :], b_cp)
        b_S += onehot_dot(b_onehot.to(tl.float32), tl.trans(b_cp), DOT_PRECISION)
    b_W = tl.sum(tl.where((o_j == C)[None, :], b_S, 0.0), 1)
    b_N = tl.sum(tl.where((o_j == C + 1)[None, :], b_S, 0.0), 1)  # exact to 2^24 pixels of a class
    m_k = o_k < C
    o_S = o_k[:, None] * C + o_j[None, :]
    m_S = m_k[:, None] & (o_j < C)[None, :]
    b_j0 = tl.full([C_BLOCK], j0, tl.int32)
    m_W = m_k & (b_j0 <= C) & (C + 1 < b_j0 + C_BLOCK)  # by the j-block holding columns C and C + 1
    if PARTIALS:
        tl.store(S_ptr + pid.to(tl.int64) * C * C + o_S, b_S, mask=m_S)
        tl.store(W_ptr + pid * C + o_k, b_W, mask=m_W)
        tl.store(N_ptr + pid * C + o_k, b_N, mask=m_W)
    else:
        tl.atomic_add(S_ptr + o_S, b_S.to(tl.float64), mask=m_S)
        tl.atomic_add(W_ptr + o_k, b_W.to(tl.float64), mask=m_W)
        tl.atomic_add(N_ptr + o_k, b_N.to(tl.float64), mask=m_W)
    if FUSED:
        tl.atomic_add(bad_ptr, tl.sum(n_bad, 0))


@functools.cache  # a pure function of its arguments, read on every launch
def stats_config(num_classes: int, element_size: int = 4, aligned: bool = True, target: str = "sm_90",
                 upsample: bool = False) -> Mapping:
    """Block sizes and launch options the launcher picks for ``num_classes`` logits of
    ``element_size`` bytes on ``target`` (a name in ``configs.TARGETS``), pipelined for ``aligned``
    NCHW launches that do not ``upsample``; every number comes from the target's table."""
    table = TARGETS[target]
    fused = num_classes + 2 <= FUSED_MAX_CLASSES
    # fused: two spare rows after the classes, where the kernel sums W and N with S
    c_block = max(16, triton.next_power_of_2(num_classes + 2)) if fused else CHUNK_CLASSES
    chosen = table.conservative if not aligned else table.fused_stats if fused else table.chunked_stats
    pix_block = entry(chosen, "pixels", element_size) if "pixels" in chosen \
        else entry(chosen, "tile_elements", element_size) // c_block
    return MappingProxyType({
        "FUSED": fused, "C_BLOCK": c_block, "PIX_BLOCK": pix_block, "DOT_PRECISION": table.onehot_precision,
        "num_warps": entry(chosen, "num_warps", element_size),
        "num_stages": table.num_stages(chosen, element_size, upsample),
        "maxnreg": table.max_registers, "programs_per_sm": entry(chosen, "programs_per_sm", element_size),
        "ROW_PIX_BLOCK": entry(table.row_stats, "pixels", element_size) if aligned
        else table.conservative["tile_elements"] // c_block,
        "row_num_warps": entry(table.row_stats, "num_warps", element_size),
        "row_num_stages": entry(table.row_stats, "num_stages", element_size),
        "row_maxnreg": table.row_stats.get("max_registers", table.max_registers)})


def stats_launches(logits: torch.Tensor, temperature: float, valid: torch.Tensor | None,
                   deterministic: bool = False, upsample=None, programs: int | None = None,
                   confidence_power: float = 1.0, target: str | None = None):
    """The launches of the stats pass, and the tensors they fill: ``(launches, S, W, N, bad)``.
    ``programs``: the persistent grid (default: the configuration's programs per SM). ``target``:
    the configuration table (default: the device's, ``configs.target_of``)."""
    layout = launch_layout(logits, upsample)
    C, device = layout.num_classes, logits.device
    target = target or target_of(device).name
    config = stats_config(C, logits.element_size(), layout.aligned(logits), target, bool(layout.upsample))
    c_block, pix_block, fused = config["C_BLOCK"], config["PIX_BLOCK"], config["FUSED"]
    limit = math.isinf(temperature)
    scale = LOG2E / temperature  # 0 at the limit, where no exponential is taken
    n_tiles = layout.num_tiles(pix_block)
    has_valid = valid is not None
    valid_arg = valid.contiguous().view(torch.uint8) if has_valid else logits
    bad = torch.zeros(1, dtype=torch.int32, device=device)
    n_blocks = triton_cdiv(C, c_block)
    n_column_blocks = triton_cdiv(C + 2, c_block)  # S's columns, then W and N
    options = {key: config[key] for key in ("num_warps", "num_stages", "maxnreg")}
    tables = layout.upsample_args(device)

    n_programs = min(n_tiles, programs or max_programs(device, config["programs_per_sm"]))
    if deterministic:
        n_programs = max(1, min(n_programs, PARTIALS_BUDGET // (4 * C * C)))
        S = torch.empty(n_programs, C, C, dtype=torch.float32, device=device)
        W = torch.zeros(n_programs, C, dtype=torch.float32, device=device)
    else:
        S = torch.zeros(C, C, dtype=torch.float64, device=device)
        W = torch.zeros(C, dtype=torch.float64, device=device)
    N = torch.zeros_like(W)

    launches = []
    if fused:
        row_max = row_conf = row_cls = logits  # unused by the fused kernel
    else:
        row_max = torch.empty(layout.num_pixels, dtype=torch.float32, device=device)
        row_conf = torch.empty_like(row_max)
        row_cls = torch.empty(layout.num_pixels, dtype=torch.int32, device=device)
        row_pix_block = config["ROW_PIX_BLOCK"]
        row_tiles = layout.num_tiles(row_pix_block)
        launches.append(Launch(
            _row_stats_kernel, (row_tiles,),
            (logits, valid_arg, row_max, row_conf, row_cls, bad, *layout.kernel_args(), scale, row_tiles, *tables),
            {"HAS_VALID": has_valid, "UPSAMPLE": layout.upsample, "LIMIT": limit, "C_BLOCK": c_block,
             "PIX_BLOCK": row_pix_block},
            {**options, "num_warps": config["row_num_warps"], "num_stages": config["row_num_stages"],
             "maxnreg": config["row_maxnreg"]}))
    launches.append(Launch(
        _stats_kernel, (n_programs, n_blocks, n_column_blocks),
        (logits, valid_arg, row_max, row_conf, row_cls, S, W, N, bad, *layout.kernel_args(), scale,
         float(confidence_power), n_tiles, *tables),
        {"HAS_VALID": has_valid, "FUSED": fused, "PARTIALS": deterministic, "UPSAMPLE": layout.upsample,
         "POWERED": confidence_power != 1.0 and not limit, "LIMIT": limit, "C_BLOCK": c_block, "PIX_BLOCK": pix_block,
         "DOT_PRECISION": config["DOT_PRECISION"]},
        options))
    return launches, S, W, N, bad


def prototype_stats(logits: torch.Tensor, temperature: float, valid: torch.Tensor | None,
                    deterministic: bool = False, upsample=None, confidence_power: float = 1.0):
    """``(S float64 [C, C], W float64 [C], N float64 [C], number of valid pixels with a non-finite
    logit)``, the count a 0-dim int32 tensor on the device, not read back here; with ``upsample``, of
    the bilinear upsampling computed tile by tile (``_tile.load_classes``)."""
    launches, S, W, N, bad = stats_launches(logits, temperature, valid, deterministic, upsample,
                                            confidence_power=confidence_power)
    for launch in launches:
        launch()
    if deterministic:
        S, W, N = S.double().sum(dim=0), W.double().sum(dim=0), N.double().sum(dim=0)
    return S, W, N, bad[0]
