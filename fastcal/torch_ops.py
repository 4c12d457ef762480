"""The "torch-ops" backend: PyTorch operations, a chunk of pixels at a time, on any device.

Same math as :mod:`fastcal.reference`, restructured for memory: the pixels are walked in
chunks of about ``_chunks.CHUNK_ELEMENTS`` logits, read in the tensor's own layout (no permuted
copy of the batch), and every intermediate is a chunk-sized buffer. Softmax and distances in
float32; the products ``w * p`` are added into float64 sums. Distances use the expanded form,
centred on the mean prototype ``c`` for precision (:func:`fastcal._operands.centred_prototypes`),
one GEMM per chunk.

The CPU path where the fused loops of :mod:`fastcal.numba_backend` cannot go: more than
``cpu_kernels.MAX_CLASSES`` classes, a forked child (where PyTorch runs on one thread: see
:mod:`fastcal._process`), or tensors on a device that Triton does not serve.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _chunks, _prepared, _space, reference
from ._chunks import chunk_index, indexed

REQUIRES = "any tensor"
prototype_operands = None  # a caller's prototypes: prepared as fastcal._operands does


def can_run(logits, limit: bool = False) -> bool:
    """Every call: PyTorch operations run on any device, at any temperature."""
    return True


def _logit_chunks(logits: torch.Tensor):
    """Yield ``(index, z)``: ``z`` is a [C, n] tensor (input dtype) of the pixels ``index`` selects in
    a [N, *spatial] tensor; a view where the layout allows, else a chunk-sized copy."""
    C = logits.shape[1]
    by_class = logits.movedim(1, 0)
    budget = max(1, _chunks.CHUNK_ELEMENTS // C)
    for index in chunk_index(tuple(by_class.shape[1:]), budget):
        yield index, by_class[(slice(None), *index)].reshape(C, -1)


_TWO_126 = 2.0**126


class _Buffers:
    """Chunk-sized float32 scratch space of this backend's passes, allocated once per call: fresh
    multi-MiB tensors per chunk would cost a page fault per 4 KiB on every chunk. ``e`` holds exp
    values; ``scratch`` the argmax key or the distances. (The fused loops of
    :mod:`fastcal.numba_backend` keep their own buffer.)"""

    def __init__(self, num_classes: int, device: torch.device):
        size = num_classes * max(1, _chunks.CHUNK_ELEMENTS // num_classes)
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
    ``with_argmax`` the argmax and whether every logit of the pixel is finite. At the limit
    ``T = inf`` (:mod:`fastcal._space`) ``e = z - max z``: no exponential."""
    n = z.shape[1]
    # float64 is read as float32, like everywhere: beyond its range is inf
    if z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        z = z.float()
    z_max = z.amax(dim=0).float()
    e = torch.sub(z, z_max, out=buffers.view(buffers.e, n))  # upcasts half-precision chunks
    if with_argmax:
        finite = torch.isfinite(z).all(dim=0)  # per pixel, on the device: nothing read back
        cls = _first_zero(e, buffers.view(buffers.scratch, n), buffers)
    if _space.is_limit(temperature):
        return (e, cls, finite) if with_argmax else e
    if temperature != 1.0:
        e.mul_(1.0 / temperature)
    e.exp_()
    return (e, cls, finite) if with_argmax else e


def _vectors_in_place(e: torch.Tensor, plan) -> torch.Tensor:
    """Turn :func:`_shifted_exp`'s ``e`` into the pixels' vectors ``v`` (:mod:`fastcal._space`), in
    place, and return the weights ``w`` [n]: ``p = e / sum e`` and ``conf ** power`` (``conf = 1 /
    sum e``), or at the limit the centred logits and 1."""
    if _space.is_limit(plan.temperature):
        e.sub_(e.mean(dim=0))
        return torch.ones_like(e[0])
    conf = e.sum(dim=0).reciprocal_()
    e.mul_(conf)
    return conf if plan.confidence_power == 1.0 else conf.pow(plan.confidence_power)


def _upsampled_chunks(logits: torch.Tensor, plan):
    """As :func:`_chunks` for the upsampling: ``(index, z)`` with ``z`` [C, n] float32, the bilinear
    values of a band of output rows of one image. Along x, ``F.interpolate`` of the band's source
    rows (their own rows kept: the mapping along y is then the identity, along x the global one);
    along y, a blend of the two source rows of each output row."""
    N, C = logits.shape[:2]
    upsample = plan.upsample
    first_rows, last_rows, y0, y1, wy = _row_tables(logits, plan)
    height, width = upsample.size
    rows = max(1, _chunks.CHUNK_ELEMENTS // (C * width))
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


def _row_tables(logits, plan):
    """The output rows' two source rows and weights, from the shapes alone: built on the host
    once per plan (:func:`fastcal._prepared.prepared`), with their device copies."""
    def build():
        (y0, y1, wy), _ = plan.upsample.axes(tuple(logits.shape[2:]))
        device = logits.device
        return y0.tolist(), y1.tolist(), y0.to(device), y1.to(device), wy.to(device)

    return _prepared.prepared(plan, "torch-ops rows", build)


def stats_pass(logits: torch.Tensor, valid: torch.Tensor | None, plan):
    """``(S, W, N, nonfinite)``: the sums, the pixel count per argmax class (float64) and the
    number of valid pixels with a non-finite logit (a 0-dim tensor, on the device)."""
    C = logits.shape[1]
    S_t = torch.zeros(C, C, dtype=torch.float64, device=logits.device)  # S transposed: [j, k]
    W = torch.zeros(C, dtype=torch.float64, device=logits.device)
    N = torch.zeros(C, dtype=torch.float64, device=logits.device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=logits.device)
    buffers = _Buffers(C, logits.device)
    for index, z in _logit_chunks(logits) if plan.upsample is None else _upsampled_chunks(logits, plan):
        e, cls, use = _shifted_exp(z, plan.temperature, buffers, with_argmax=True)
        weight = _vectors_in_place(e, plan)
        if valid is not None:
            in_mask = valid[index].reshape(-1)
            nonfinite += (in_mask & ~use).sum()
            use &= in_mask
        else:
            nonfinite += (~use).sum()
        weight = torch.where(use, weight, torch.zeros((), device=weight.device))
        e.mul_(weight)  # w * v
        e.masked_fill_(~use, 0.0)  # NaN or inf at masked pixels must not leak into the sums
        # float64 from the first add: a chunk holds up to a million pixels of one class, whose
        # float32 running sum would drift by ~1e-5
        S_t.index_add_(1, cls, e.double())
        W.index_add_(0, cls, weight.double())
        N.index_add_(0, cls, use.double())
    return S_t.T.contiguous(), W, N, nonfinite


def operands_pass(S: torch.Tensor, W: torch.Tensor, plan):
    """The prototypes, as :func:`fastcal.reference.prototypes_from_stats`."""
    return reference.operands_pass(S, W, plan)


def _operands(operands):
    """``(-2 A, c, bias)`` of :func:`fastcal._operands.centred_prototypes`, made once per prepared
    prototypes and device: a pixel's label is ``argmin_k bias[k] + (-2 A (p - c))[k]``."""
    return operands.derived("torch-ops", lambda o: (o.A * -2.0, o.centre, o.bias))


def _distances(logits, operands, plan):
    """Yield ``(select, d, distance)`` per chunk (:func:`chunk_index`): ``d = v - c`` [C, n] (``v``
    the pixels' vectors: ``p``, or the centred logits at the limit) and
    ``distance = -2 A d`` [C, n], in buffers the next chunk reuses."""
    A_times_minus_2, centre, _ = _operands(operands)
    A_times_minus_2, centre = A_times_minus_2.to(logits.device), centre.to(logits.device)
    buffers = _Buffers(logits.shape[1], logits.device)
    for index, z in _logit_chunks(logits) if plan.upsample is None else _upsampled_chunks(logits, plan):
        d = _shifted_exp(z, plan.temperature, buffers, with_argmax=False)
        _vectors_in_place(d, plan)
        d.sub_(centre[:, None])
        yield indexed(index), d, torch.mm(A_times_minus_2, d, out=buffers.view(buffers.scratch, d.shape[1]))


def predict_pass(logits: torch.Tensor, operands, plan):
    """The argmin of ``bias - 2 A (p - c)`` with one GEMM a chunk."""
    labels = plan.output(logits.device)
    bias = _operands(operands)[2].to(logits.device)
    buffers = _Buffers(logits.shape[1], logits.device)
    for select, _, distance in _distances(logits, operands, plan):
        distance.add_(bias[:, None])
        gap = torch.sub(distance.amin(dim=0), distance, out=distance)
        out = select(labels)
        out.copy_(_first_zero(gap, gap, buffers).view(out.shape))
    return labels


def scores_pass(logits: torch.Tensor, operands, plan):
    """``-||v - P[k]||^2`` a chunk at a time (:func:`fastcal._chunks.write_scores`)."""
    bias = _operands(operands)[2].to(logits.device)
    return _chunks.write_scores(plan.output(logits.device), bias, _distances(logits, operands, plan))
