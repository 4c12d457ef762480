"""Bilinear upsampling of the logits, as ``F.interpolate(mode="bilinear")`` defines it.

``size=`` / ``scale_factor=`` with ``align_corners=`` on every op mean
``F.interpolate(logits, size, scale_factor, mode="bilinear", align_corners)`` and then the op. The
fast backends never write the upsampled tensor: every output pixel combines its four source
neighbours where it is used. This module holds the host side: argument checks, the output
shape, and PyTorch's rule for the source coordinates (``area_pixel_compute_source_index``)::

    scale = (in - 1) / (out - 1)           align_corners=True (0 when out == 1)
          = 1 / scale_factor or in / out   align_corners=False
    src   = scale * dst                    align_corners=True
          = max(scale * (dst + 0.5) - 0.5, 0)
    i0 = floor(src), i1 = min(i0 + 1, in - 1), lambda = src - i0
    z(dst) = (1 - ly) ((1 - lx) z[y0, x0] + lx z[y0, x1]) + ly ((1 - lx) z[y1, x0] + lx z[y1, x1])

The interpolation runs in float32 whatever the logits' dtype (``F.interpolate`` of float16
logits would round the result to float16; fastcal keeps float32).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch


@dataclass(frozen=True)
class Upsample:
    size: tuple[int, int]             # output (H, W)
    scale: tuple[float, float]        # source-coordinate scales (rows, columns)
    align_corners: bool
    scale_factor: tuple[float, float] | None  # as given, to call F.interpolate the same way

    def axes(self, in_size: tuple[int, int], device="cpu"):
        """Per output row and column: ``(i0, i1, lambda)`` as int64, int64 and float32 tensors."""
        return tuple(_source_index(out, size, scale, self.align_corners, device)
                     for out, size, scale in zip(self.size, in_size, self.scale))

    def source_offsets(self, in_size: tuple[int, int], strides: tuple[int, int], device="cpu"):
        """The tables every fast backend interpolates with: per output row ``(offset of source row
        y0, of y1, weight of y1)`` and per output column ``(offset of x0, of x1, weight of x1)``,
        offsets in elements for the input's (row, column) ``strides``."""
        (y0, y1, wy), (x0, x1, wx) = self.axes(in_size, device)
        row_stride, column_stride = strides
        return (y0 * row_stride, y1 * row_stride, wy), (x0 * column_stride, x1 * column_stride, wx)


def _source_index(out: int, size: int, scale: float, align_corners: bool, device):
    dst = torch.arange(out, dtype=torch.float32, device=device)
    scale = torch.tensor(scale, dtype=torch.float32)
    src = dst * scale if align_corners else (scale * (dst + 0.5) - 0.5).clamp_min(0.0)
    i0 = src.to(torch.int64)  # src >= 0: truncation is floor
    lam = src - i0.to(torch.float32)
    i1 = torch.clamp(i0 + 1, max=size - 1)
    return i0, i1, lam


def _pair(name, value, kind, check):
    """``value`` as a pair of ``kind``; the symbolic numbers of a traced call (``torch.compile`` with
    dynamic shapes hands the fake implementations ``SymInt`` / ``SymFloat``) are numbers too."""
    kinds = (kind, torch.SymInt) if kind is Integral else (kind, torch.SymInt, torch.SymFloat)
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(values) != 2 or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{name}: expected a {kind.__name__.lower()} or a pair of them, got {value!r}")
    if not all(check(v) for v in values):
        raise ValueError(f"{name}: expected positive values, got {value!r}")
    return values


def check_arguments(size, scale_factor, align_corners):
    """Check the upsampling arguments on their own (types, values, not both ``size`` and
    ``scale_factor``), before any logits are seen. Returns ``(size, scale_factor)`` as tuples of
    int / float pairs, or None."""
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners: expected a bool, got {align_corners!r}")
    if size is None and scale_factor is None:
        if align_corners:
            raise ValueError("align_corners: applies only with size= or scale_factor=")
        return None, None
    if size is not None and scale_factor is not None:
        raise ValueError("size, scale_factor: give one of them, not both")
    if size is not None:
        return tuple(int(v) for v in _pair("size", size, Integral, lambda v: v > 0)), None
    return None, tuple(float(v) for v in _pair("scale_factor", scale_factor, Real,
                                               lambda v: 0 < v < math.inf))  # NaN fails too


def check_model_arguments(size, scale_factor, align_corners):
    """:func:`check_arguments` for the options of a model's helpers (fit, wrapper, export), where
    ``size="input"`` also means the input images' height and width, known only per batch."""
    return check_arguments((1, 1) if size == "input" else size, scale_factor, align_corners)


def resolve(logits: torch.Tensor, size, scale_factor, align_corners) -> Upsample | None:
    """Check the upsampling arguments against ``logits``; ``None`` when there is nothing to upsample.

    An image with no pixels (``H == 0`` or ``W == 0``) cannot be interpolated: ``ValueError``, on
    every backend, whatever the batch size (``F.interpolate`` refuses it too)."""
    out, factors = check_arguments(size, scale_factor, align_corners)
    if out is None and factors is None:
        return None
    if logits.dim() != 4:
        raise ValueError(
            f"size/scale_factor: bilinear upsampling needs logits [N, C, H, W], got shape {tuple(logits.shape)}"
        )
    in_size = tuple(logits.shape[2:])
    if min(in_size) < 1:
        raise ValueError(
            f"logits: an image with no pixels (shape {tuple(logits.shape)}) cannot be interpolated "
            "to size/scale_factor"
        )
    if out is not None:
        scale = tuple(i / o for i, o in zip(in_size, out))
    else:
        out = tuple(int(math.floor(i * f)) for i, f in zip(in_size, factors))
        if min(out) < 1:
            raise ValueError(f"scale_factor: {scale_factor!r} leaves no output pixel from {in_size}")
        scale = tuple(1.0 / f for f in factors)
    if align_corners:
        scale = tuple((i - 1) / (o - 1) if o > 1 else 0.0 for i, o in zip(in_size, out))
    return Upsample(size=out, scale=scale, align_corners=align_corners, scale_factor=factors)


def output_shape(logits: torch.Tensor, upsample: Upsample | None) -> tuple:
    """``[N, *spatial]`` of the labels (and of ``valid``)."""
    spatial = upsample.size if upsample is not None else tuple(logits.shape[2:])
    return (logits.shape[0], *spatial)
