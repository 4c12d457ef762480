"""The predict pass: per pixel, the class whose prototype is nearest to ``p``.

Math (per pixel, ``scale = log2(e) / T``, ``c`` the mean prototype, ``A[k] = P[k] - c``)::

    p       = softmax(z / T)
    label   = argmin_k  ||A[k]||^2 - 2 (p - c) . A[k]  (lowest k on ties)

which is ``argmin_k ||p - P[k]||^2`` (the two differ by ``||p - c||^2``, the same for
every k); centring keeps every term within a few times the pixel's distances, so
rounding stays relative to them (see ``fastcal._common.centred_prototypes``).
``(p - c) . A^T`` is a ``tl.dot`` in 3xTF32 (about 2^-22 relative error). The
centred prototypes are zero-padded to whole blocks with ``||A[k]||^2 = +inf`` for
padding and for "skip" classes, so the distance loop needs no class mask.

* ``C <= FUSED_MAX_CLASSES``: the tile holds every class; one read.
* larger C: an online max / sum over class blocks, then for every k-block a
  loop over j-blocks, re-reading the tile (meant to be served by L1/L2).

Memory traffic per pixel: reads ``C * sizeof(dtype)``, writes one label
(8, 4 or 1 bytes for int64, int32, uint8).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import centred_prototypes
from .._upsample import output_shape
from ._layout import launch_layout, triton_cdiv
from ._tile import load_classes, online_softmax_update, pixel_position
from .stats import LOG2E, TILE_ELEMENTS, stats_config

PREDICT_CHUNK_CLASSES = 32  # p . P^T blocks in 3xTF32 need three operand copies: smaller blocks than stats


@triton.jit
def _predict_kernel(
    z_ptr, A_ptr, centre_ptr, bias_ptr, out_ptr,
    C, L, O1, O2, so0, so1, so2, s_l, s_c, scale, C_PAD, off_ptr, wgt_ptr, H_UP, W_UP,
    FUSED: tl.constexpr, UPSAMPLE: tl.constexpr, C_BLOCK: tl.constexpr, PIX_BLOCK: tl.constexpr,
):
    tile = tl.program_id(0)
    o_z, o01, o10, o11, wy, wx, o_pix, m_pix = pixel_position(
        tile, L, O1, O2, so0, so1, so2, s_l, off_ptr, wgt_ptr, H_UP, W_UP, UPSAMPLE, PIX_BLOCK)
    o_c = tl.arange(0, C_BLOCK)
    if FUSED:
        b_z = load_classes(z_ptr, o_z, o01, o10, o11, wy, wx, m_pix, o_c, C, s_c, UPSAMPLE)
        b_z = tl.where((o_c < C)[:, None], b_z, float("-inf"))
        b_e = tl.exp2((b_z - tl.max(b_z, 0)[None, :]) * scale)
        b_d = b_e / tl.sum(b_e, 0)[None, :] - tl.load(centre_ptr + o_c)[:, None]
        b_A = tl.load(A_ptr + o_c[:, None] * C_PAD + o_c[None, :])
        b_d = tl.load(bias_ptr + o_c)[:, None] - 2.0 * tl.dot(b_A, b_d, input_precision="tf32x3")
        b_label = tl.argmin(tl.where(b_d == b_d, b_d, float("inf")), 0, tie_break_left=True)
    else:
        b_max = tl.full([PIX_BLOCK], float("-inf"), tl.float32)
        b_sum = tl.zeros([PIX_BLOCK], tl.float32)
        for j0 in range(0, C, C_BLOCK):
            o_j = j0 + o_c
            b_z = load_classes(z_ptr, o_z, o01, o10, o11, wy, wx, m_pix, o_j, C, s_c, UPSAMPLE)
            b_z = tl.where((o_j < C)[:, None], b_z, float("-inf"))
            b_max, b_sum = online_softmax_update(b_max, b_sum, b_z, scale)
        b_inv_sum = 1.0 / b_sum
        b_best = tl.full([PIX_BLOCK], float("inf"), tl.float32)
        b_label = tl.zeros([PIX_BLOCK], tl.int32)
        for k0 in range(0, C, C_BLOCK):
            b_dot = tl.zeros([C_BLOCK, PIX_BLOCK], tl.float32)
            for j0 in range(0, C, C_BLOCK):
                o_j = j0 + o_c
                b_z = load_classes(z_ptr, o_z, o01, o10, o11, wy, wx, m_pix, o_j, C, s_c, UPSAMPLE)
                b_p = tl.exp2((b_z - b_max[None, :]) * scale) * b_inv_sum[None, :]
                b_p = tl.where((o_j < C)[:, None], b_p - tl.load(centre_ptr + o_j)[:, None], 0.0)
                b_A = tl.load(A_ptr + (k0 + o_c)[:, None] * C_PAD + o_j[None, :])
                b_dot += tl.dot(b_A, b_p, input_precision="tf32x3")
            b_d = tl.load(bias_ptr + k0 + o_c)[:, None] - 2.0 * b_dot
            b_d = tl.where(b_d == b_d, b_d, float("inf"))  # non-finite logits: some label, no NaN
            c_best = tl.min(b_d, 0)
            c_label = tl.argmin(b_d, 0, tie_break_left=True).to(tl.int32) + k0
            b_label = tl.where(c_best < b_best, c_label, b_label)  # strict: ties keep the lower block
            b_best = tl.minimum(b_best, c_best)
    tl.store(out_ptr + o_pix, b_label.to(out_ptr.dtype.element_ty), mask=m_pix)


def predict_config(num_classes: int) -> dict:
    """Block sizes the launcher picks for ``num_classes``: the stats pass's, but smaller class blocks
    when the class axis is chunked."""
    config = stats_config(num_classes)
    if not config["FUSED"]:
        config.update(C_BLOCK=PREDICT_CHUNK_CLASSES, PIX_BLOCK=TILE_ELEMENTS // PREDICT_CHUNK_CLASSES)
    return config


def padded_prototypes(prototypes: torch.Tensor, c_block: int):
    """Centred prototypes ``A``, centre ``c`` and ``bias = ||A[k]||^2`` zero-padded to whole blocks
    (``bias = +inf`` for padding and for skipped classes)."""
    A, centre, bias = centred_prototypes(prototypes)
    C = A.shape[0]
    c_pad = triton_cdiv(C, c_block) * c_block
    A_pad = torch.zeros(c_pad, c_pad, dtype=torch.float32, device=A.device)
    A_pad[:C, :C] = A
    centre_pad = torch.zeros(c_pad, dtype=torch.float32, device=A.device)
    centre_pad[:C] = centre
    bias_pad = torch.full((c_pad,), float("inf"), dtype=torch.float32, device=A.device)
    bias_pad[:C] = bias
    return A_pad, centre_pad, bias_pad


def predict(logits: torch.Tensor, prototypes: torch.Tensor, temperature: float, label_dtype=torch.int64,
            upsample=None):
    layout = launch_layout(logits, upsample)
    config = predict_config(layout.num_classes)
    A_pad, centre_pad, bias_pad = padded_prototypes(prototypes.to(logits.device), config["C_BLOCK"])
    labels = torch.empty(output_shape(logits, upsample), dtype=label_dtype, device=logits.device)
    grid = (layout.num_tiles(config["PIX_BLOCK"]),)
    _predict_kernel[grid](
        logits, A_pad, centre_pad, bias_pad, labels, *layout.kernel_args(), LOG2E / temperature, A_pad.shape[0],
        *layout.upsample_args(logits.device), FUSED=config["FUSED"], UPSAMPLE=layout.upsample, C_BLOCK=config["C_BLOCK"], PIX_BLOCK=config["PIX_BLOCK"],
        num_warps=config["num_warps"], num_stages=config["num_stages"], maxnreg=config["maxnreg"],
    )
    return labels
