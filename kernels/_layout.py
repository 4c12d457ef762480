"""How a kernel walks the pixels of a strided [N, C, *spatial] tensor.

The pixel dims (N and the spatial dims) are merged wherever the strides allow,
leaving at most three *outer* dims and one *inner* dim. A tile is a block of
the inner dim inside one outer position, so for NCHW the tile's pixels are
contiguous (coalesced loads, one per class row) and for channels_last or
``[N, C]`` the class axis is. The linear pixel index of the contiguous output
``[N, *spatial]`` is ``outer * inner_size + inner``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PixelLayout:
    outer_sizes: tuple[int, int, int]    # o0, o1, o2 (padded with 1)
    outer_strides: tuple[int, int, int]
    inner_size: int
    inner_stride: int
    class_stride: int
    num_classes: int

    @property
    def num_outer(self) -> int:
        return math.prod(self.outer_sizes)

    @property
    def num_pixels(self) -> int:
        return self.num_outer * self.inner_size

    def num_tiles(self, pix_block: int) -> int:
        return self.num_outer * triton_cdiv(self.inner_size, pix_block)

    upsample = False

    def aligned(self, logits) -> bool:
        """Whether the JIT will see 16-byte-aligned logits with contiguous pixels and sizes divisible
        by 16, the specialisation the pipelined launch configurations are tuned for."""
        return (logits.data_ptr() % 16 == 0 and self.inner_stride == 1 and self.inner_size % 16 == 0
                and self.class_stride % 16 == 0)

    def kernel_args(self) -> tuple:
        """Positional arguments every fastcal kernel takes after its pointers, in this order."""
        (_, o1, o2), (so0, so1, so2) = self.outer_sizes, self.outer_strides
        return (self.num_classes, self.inner_size, o1, o2, so0, so1, so2, self.inner_stride, self.class_stride)

    def upsample_args(self, device) -> tuple:
        """The upsampling tables and output size the kernels take last: none here."""
        return _no_tables(device)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pixel_layout(logits: torch.Tensor) -> PixelLayout:
    sizes = [logits.shape[0], *logits.shape[2:]]
    strides = [logits.stride(0), *logits.stride()[2:]]
    merged: list[list[int]] = []
    for size, stride in zip(sizes, strides):
        if size == 1:
            continue  # a size-1 dim never moves the pointer
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    if not merged:
        merged = [[1, 1]]
    (inner_size, inner_stride), outer = merged[-1], merged[:-1]
    outer = [[1, 0]] * (3 - len(outer)) + outer
    return PixelLayout(
        outer_sizes=tuple(s for s, _ in outer),
        outer_strides=tuple(st for _, st in outer),
        inner_size=inner_size,
        inner_stride=inner_stride,
        class_stride=logits.stride(1),
        num_classes=logits.shape[1],
    )


def _no_tables(device):
    return (torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, dtype=torch.float32, device=device), 0, 0)


@dataclass(frozen=True)
class UpsampledLayout:
    """The pixels of the bilinear upsampling of [N, C, H, W] logits: the labels' [N, H_UP, W_UP],
    walked in tiles of consecutive output pixels (``_tile.upsampled_position``)."""
    logits_strides: tuple[int, int, int, int]
    num_classes: int
    num_images: int
    size: tuple[int, int]
    offsets: torch.Tensor   # int64: y0 and y1 row offsets, then x0 and x1 column offsets
    weights: torch.Tensor   # float32: weights along y, then along x

    upsample = True

    def aligned(self, logits) -> bool:
        return False  # four gathered neighbours a pixel: the conservative configuration

    @property
    def num_pixels(self) -> int:
        return self.num_images * self.size[0] * self.size[1]

    def num_tiles(self, pix_block: int) -> int:
        return triton_cdiv(self.num_pixels, pix_block)

    def kernel_args(self) -> tuple:
        """As ``PixelLayout.kernel_args``: L is every output pixel, so0 the image stride."""
        s_n, s_c = self.logits_strides[:2]
        return (self.num_classes, self.num_pixels, 1, 1, s_n, 0, 0, 1, s_c)

    def upsample_args(self, device) -> tuple:
        return (self.offsets, self.weights, *self.size)


LAYOUT_CACHE_SIZE = 64
_layouts: dict = {}


def launch_layout(logits: torch.Tensor, upsample=None):
    """``pixel_layout(logits)``, or the ``UpsampledLayout`` of ``upsample`` (see ``fastcal._upsample``).
    Layouts depend on the shape, strides and device alone: each is built once (its upsampling
    tables written to the device once) and kept, up to ``LAYOUT_CACHE_SIZE`` of them."""
    key = (tuple(logits.shape), logits.stride(), logits.device, upsample)
    layout = _layouts.get(key)
    if layout is None:
        layout = _build_layout(logits, upsample)
        if len(_layouts) >= LAYOUT_CACHE_SIZE:
            _layouts.pop(next(iter(_layouts)), None)
        _layouts[key] = layout
    return layout


def _build_layout(logits: torch.Tensor, upsample):
    if upsample is None:
        return pixel_layout(logits)
    (y0, y1, wy), (x0, x1, wx) = upsample.source_offsets(tuple(logits.shape[2:]), tuple(logits.stride()[2:]),
                                                         logits.device)
    return UpsampledLayout(tuple(logits.stride()), logits.shape[1], logits.shape[0], upsample.size,
                           torch.cat([y0, y1, x0, x1]), torch.cat([wy, wx]))
