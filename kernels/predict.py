"""The predict pass: per pixel, the class whose prototype is nearest to ``p``.

Math (per pixel, ``scale = log2(e) / T``, ``c`` the mean prototype, ``A[k] = P[k] - c``)::

    p       = softmax(z / T)
    label   = argmin_k  ||A[k]||^2 - 2 (p - c) . A[k]  (lowest k on ties)
    score_k = -(||p - c||^2 + ||A[k]||^2 - 2 (p - c) . A[k]) = -||p - P[k]||^2   (SCORES)

which is ``argmin_k ||p - P[k]||^2`` (the two differ by ``||p - c||^2``, the same for
every k); centring keeps every term within a few times the pixel's distances, so
rounding stays relative to them (see ``fastcal._operands.centred_prototypes``).
At the limit (``LIMIT``, ``temperature=math.inf``; see ``fastcal._space``) ``p`` is the centred logits
``z - mean z``, with no exponential, formed as ``(z - max) - mean (z - max)`` (across blocks of
classes with a running max, ``_tile.online_centred_update``), so a common offset costs no precision.
``(p - c) . A^T`` is a ``tl.dot`` at the target's ``DOT_PRECISION`` (3xTF32 on NVIDIA, float32 on
AMD: about 2^-22 relative error either way; see ``configs``). The
centred prototypes are zero-padded to whole blocks with ``||A[k]||^2 = +inf`` for
padding and for "skip" classes, so the distance loop needs no class mask.

* ``C <= FUSED_MAX_CLASSES``: the tile holds every class; one read.
* larger C: an online max / sum over class blocks, then for every k-block a
  loop over j-blocks, re-reading the tile (meant to be served by L1/L2).

Memory traffic per pixel: reads ``C * sizeof(dtype)``, writes one label
(8, 4 or 1 bytes for int64, int32, uint8), or with SCORES ``4 * C`` bytes of float32 scores
into a contiguous [N, C, *spatial] tensor (the labels are then not written).
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
from ._layout import launch_layout
from ._tile import load_classes, online_centred_update, online_softmax_update, pixel_position
from .configs import FUSED_MAX_CLASSES, LOG2E, PREDICT_CHUNK_CLASSES, TARGETS, entry, max_programs, target_of


@triton.jit
def centred_or_softmax(b_z, b_max, b_inv_sum, scale, LIMIT: tl.constexpr):
    """A block of ``p`` from the per-pixel numbers of the chunked pass's first loop (see there)."""
    if LIMIT:
        return (b_z - b_max[None, :]) - b_inv_sum[None, :]
    else:
        return tl.exp2((b_z - b_max[None, :]) * scale) * b_inv_sum[None, :]


@triton.jit
def _predict_kernel(
    z_ptr, A_ptr, centre_ptr, bias_ptr, out_ptr,
    C, L, O1, O2, so0, so1, so2, s_l, s_c, scale, C_PAD, n_tiles, off_ptr, wgt_ptr, H_UP, W_UP, P_IMG,
    FUSED: tl.constexpr, UPSAMPLE: tl.constexpr, C_BLOCK: tl.constexpr, PIX_BLOCK: tl.constexpr,
    SCORES: tl.constexpr, LIMIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    for tile in range(tl.program_id(0), n_tiles, tl.num_programs(0)):  # persistent: the loop is pipelined
        o_z, o01, o10, o11, wy, wx, o_pix, m_pix = pixel_position(
            tile, L, O1, O2, so0, so1, so2, s_l, off_ptr, wgt_ptr, H_UP, W_UP, UPSAMPLE, PIX_BLOCK)
        o_c = tl.arange(0, C_BLOCK)
        if SCORES:  # [N, C, P_IMG] scores: image, then class, then pixel within the image
            o_score = (o_pix // P_IMG) * C * P_IMG + o_pix % P_IMG
        if FUSED:
            b_z = load_classes(z_ptr, o_z, o01, o10, o11, wy, wx, m_pix, o_c, C, s_c, UPSAMPLE)
            m_cls = (o_c < C)[:, None]
            b_z = tl.where(m_cls, b_z, float("-inf"))
            if LIMIT:  # z - mean z, as (z - max) - mean (z - max); 0 past the classes, as p - c is there
                b_e = tl.where(m_cls, b_z - tl.max(b_z, 0)[None, :], 0.0)
                b_d = tl.where(m_cls, b_e - (tl.sum(b_e, 0) / C)[None, :] - tl.load(centre_ptr + o_c)[:, None], 0.0)
            else:
                b_e = tl.exp2((b_z - tl.max(b_z, 0)[None, :]) * scale)
                b_d = b_e / tl.sum(b_e, 0)[None, :] - tl.load(centre_ptr + o_c)[:, None]
            b_A = tl.load(A_ptr + o_c[:, None] * C_PAD + o_c[None, :])
            b_dist = tl.load(bias_ptr + o_c)[:, None] - 2.0 * tl.dot(b_A, b_d, input_precision=DOT_PRECISION)
            if SCORES:
                b_score = -(b_dist + tl.sum(b_d * b_d, 0)[None, :])
                m_score = (o_c < C)[:, None] & m_pix[None, :]
                tl.store(out_ptr + o_score[None, :] + o_c.to(tl.int64)[:, None] * P_IMG, b_score, mask=m_score)
            else:
                b_label = tl.argmin(tl.where(b_dist == b_dist, b_dist, float("inf")), 0, tie_break_left=True)
        else:
            # per pixel, p_j = 2 ** ((z_j - b_max) * scale) * b_inv_sum, or at the LIMIT
            # p_j = (z_j - b_max) - b_inv_sum, b_inv_sum then the mean of z - max
            b_max = tl.full([PIX_BLOCK], float("-inf"), tl.float32)
            b_sum = tl.zeros([PIX_BLOCK], tl.float32)
            for j0 in range(0, C, C_BLOCK):
                o_j = j0 + o_c
                b_z = load_classes(z_ptr, o_z, o01, o10, o11, wy, wx, m_pix, o_j, C, s_c, UPSAMPLE)
                b_z = tl.where((o_j < C)[:, None], b_z, float("-inf"))
                if LIMIT:
                    b_max, b_sum = online_centred_update(b_max, b_sum, b_z, o_j, C)
                else:
                    b_max, b_sum = online_softmax_update(b_max, b_sum, b_z, scale)
            if LIMIT:
                b_inv_sum = b_sum / C
            else:
                b_inv_sum = 1.0 / b_sum
            b_norm = tl.zeros([PIX_BLOCK], tl.float32)
            if SCORES:  # ||p - c||^2, which every score of the pixel needs before its first k-block
                for j0 in range(0, C, C_BLOCK):
                    o_j = j0 + o_c
                    b_z = load_classes(z_ptr, o_z, o01, o10, o11, wy, wx, m_pix, o_j, C, s_c, UPSAMPLE)
                    b_p = centred_or_softmax(b_z, b_max, b_inv_sum, scale, LIMIT)
                    b_p = tl.where((o_j < C)[:, None], b_p - tl.load(centre_ptr + o_j)[:, None], 0.0)
                    b_norm += tl.sum(b_p * b_p, 0)
            b_best = tl.full([PIX_BLOCK], float("inf"), tl.float32)
            b_label = tl.zeros([PIX_BLOCK], tl.int32)
            for k0 in range(0, C, C_BLOCK):
                b_dot = tl.zeros([C_BLOCK, PIX_BLOCK], tl.float32)
                for j0 in range(0, C, C_BLOCK):
                    o_j = j0 + o_c
                    b_z = load_classes(z_ptr, o_z, o01, o10, o11, wy, wx, m_pix, o_j, C, s_c, UPSAMPLE)
                    b_p = centred_or_softmax(b_z, b_max, b_inv_sum, scale, LIMIT)
                    b_p = tl.where((o_j < C)[:, None], b_p - tl.load(centre_ptr + o_j)[:, None], 0.0)
                    b_A = tl.load(A_ptr + (k0 + o_c)[:, None] * C_PAD + o_j[None, :])
                    b_dot += tl.dot(b_A, b_p, input_precision=DOT_PRECISION)
                b_d = tl.load(bias_ptr + k0 + o_c)[:, None] - 2.0 * b_dot
                if SCORES:
                    o_k = k0 + o_c
                    m_score = (o_k < C)[:, None] & m_pix[None, :]
                    tl.store(out_ptr + o_score[None, :] + o_k.to(tl.int64)[:, None] * P_IMG,
                             -(b_d + b_norm[None, :]), mask=m_score)
                else:
                    b_d = tl.where(b_d == b_d, b_d, float("inf"))  # non-finite logits: some label, no NaN
                    c_best = tl.min(b_d, 0)
                    c_label = tl.argmin(b_d, 0, tie_break_left=True).to(tl.int32) + k0
                    b_label = tl.where(c_best < b_best, c_label, b_label)  # strict: ties keep the lower block
                    b_best = tl.minimum(b_best, c_best)
        if not SCORES:
            tl.store(out_ptr + o_pix, b_label.to(out_ptr.dtype.element_ty), mask=m_pix)


@functools.cache  # a pure function of its arguments, read on every launch
def predict_config(num_classes: int, element_size: int = 4, aligned: bool = True, target: str = "sm_90",
                   upsample: bool = False) -> Mapping:
    """Block sizes and launch options on ``target`` (a name in ``configs.TARGETS``): the stats
    pass's class blocks when they hold every class, smaller ones when the class axis is chunked;
    persistent programs with pipelined tile loads when ``aligned`` and not ``upsample``."""
    table = TARGETS[target]
    fused = num_classes <= FUSED_MAX_CLASSES
    c_block = max(16, triton.next_power_of_2(num_classes)) if fused else PREDICT_CHUNK_CLASSES
    chosen = table.conservative if not aligned else table.predict_fused if fused else table.predict_chunked
    return MappingProxyType({
        "FUSED": fused, "C_BLOCK": c_block, "PIX_BLOCK": entry(chosen, "tile_elements", element_size) // c_block,
        "DOT_PRECISION": table.distance_precision, "num_warps": entry(chosen, "num_warps", element_size),
        "num_stages": table.num_stages(chosen, element_size, upsample), "maxnreg": table.max_registers,
        "programs_per_sm": entry(chosen, "programs_per_sm", element_size)})


def predict_launch(logits: torch.Tensor, operands, temperature: float, label_dtype=torch.int64,
                   upsample=None, programs: int | None = None, scores: bool = False, target: str | None = None):
    """The launch of the predict pass and the labels it fills: ``(launch, labels)``, or with
    ``scores`` the float32 [N, C, *spatial] scores instead of the labels. Programs are persistent
    (``programs``, default: the configuration's per SM), so the tile loads of the loop are pipelined.

    ``operands``: the prepared prototypes, anything whose ``padded(c_block)`` gives the centred
    prototypes ``A``, centre ``c`` and ``bias = ||A[k]||^2`` zero-padded to whole blocks of
    ``c_block`` classes on the logits' device, ``bias = +inf`` for padding and skipped classes
    (``fastcal._operands.DistanceOperands`` builds them once per state of the prototypes).
    ``target``: the configuration table (default: the device's, ``configs.target_of``)."""
    layout = launch_layout(logits, upsample)
    target = target or target_of(logits.device).name
    config = predict_config(layout.num_classes, logits.element_size(), layout.aligned(logits), target,
                            bool(layout.upsample))
    A_pad, centre_pad, bias_pad = operands.padded(config["C_BLOCK"])
    shape = (logits.shape[0], *(upsample.size if upsample is not None else logits.shape[2:]))
    if scores:
        out = torch.empty((shape[0], layout.num_classes, *shape[1:]), dtype=torch.float32, device=logits.device)
    else:
        out = torch.empty(shape, dtype=label_dtype, device=logits.device)
    n_tiles = layout.num_tiles(config["PIX_BLOCK"])
    launch = Launch(
        _predict_kernel, (min(n_tiles, programs or max_programs(logits.device, config["programs_per_sm"])),),
        (logits, A_pad, centre_pad, bias_pad, out, *layout.kernel_args(), LOG2E / temperature, A_pad.shape[0],
         n_tiles, *layout.upsample_args(logits.device), math.prod(shape[1:])),
        {"FUSED": config["FUSED"], "UPSAMPLE": layout.upsample, "C_BLOCK": config["C_BLOCK"],
         "PIX_BLOCK": config["PIX_BLOCK"], "SCORES": scores, "LIMIT": math.isinf(temperature),
         "DOT_PRECISION": config["DOT_PRECISION"]},
        {key: config[key] for key in ("num_warps", "num_stages", "maxnreg")})
    return launch, out


def predict(logits: torch.Tensor, operands, temperature: float, label_dtype=torch.int64, upsample=None):
    """Labels [N, *spatial] (see :func:`predict_launch` for ``operands``)."""
    launch, labels = predict_launch(logits, operands, temperature, label_dtype, upsample)
    launch()
    return labels


def scores(logits: torch.Tensor, operands, temperature: float, upsample=None):
    """Float32 scores ``-||p - P[k]||^2`` [N, C, *spatial] (``-inf`` for a skipped class)."""
    launch, out = predict_launch(logits, operands, temperature, upsample=upsample, scores=True)
    launch()
    return out
