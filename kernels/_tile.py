"""Triton helpers shared by the kernels: where a pixel tile lives, and its softmax."""
import triton
import triton.language as tl


@triton.jit
def tile_position(tile, L, O1, O2, so0, so1, so2, s_l, PIX_BLOCK: tl.constexpr):
    """Offsets of pixel tile ``tile`` (see ``_layout.PixelLayout``).

    Returns ``o_z`` [PIX_BLOCK] int64 offsets of the class-0 logit of each pixel,
    ``o_pix`` [PIX_BLOCK] int64 linear index into the contiguous [N, *spatial]
    output, and the pixel mask ``m_pix``. Only the tile's position is divided,
    once per tile; within the tile the pixels are ``inner + arange``.
    """
    n_inner_blocks = tl.cdiv(L, PIX_BLOCK)
    outer = tile // n_inner_blocks
    o_inner = (tile % n_inner_blocks) * PIX_BLOCK + tl.arange(0, PIX_BLOCK)
    o2 = outer % O2
    o1 = (outer // O2) % O1
    o0 = outer // (O1 * O2)
    base = o0.to(tl.int64) * so0 + o1.to(tl.int64) * so1 + o2.to(tl.int64) * so2
    o_z = base + o_inner.to(tl.int64) * s_l
    o_pix = outer.to(tl.int64) * L + o_inner
    return o_z, o_pix, o_inner < L


@triton.jit
def load_tile(z_ptr, o_z, m_pix, o_cls, C, s_c):
    """The [classes, pixels] tile of logits, upcast to float32; masked entries are 0."""
    m = (o_cls < C)[:, None] & m_pix[None, :]
    return tl.load(z_ptr + o_cls.to(tl.int64)[:, None] * s_c + o_z[None, :], mask=m, other=0.0).to(tl.float32)


@triton.jit
def is_finite(b_z):
    return (b_z == b_z) & (tl.abs(b_z) != float("inf"))


@triton.jit
def online_softmax_update(b_max, b_sum, b_z, scale):
    """Fold a block of classes ``b_z`` [classes, pixels] into the running per-pixel max and
    sum of ``2 ** ((z - max) * scale)``: the old sum is rescaled to the new max."""
    new_max = tl.maximum(b_max, tl.max(b_z, 0))
    b_sum = b_sum * tl.exp2((b_max - new_max) * scale) + tl.sum(tl.exp2((b_z - new_max[None, :]) * scale), 0)
    return new_max, b_sum


@triton.jit
def online_centred_update(b_max, b_sum, b_z, o_cls, C):
    """The temperature limit's twin of ``online_softmax_update``: fold a block of classes ``b_z``
    [classes, pixels] (classes ``o_cls``, the first ``o_cls[0]`` already folded) into the running
    per-pixel max and ``sum_j (z_j - max)`` over the classes below ``C``, the old sum re-based on
    the new max. The centred logits are then ``(z_j - max) - sum / C``: differences from one of the
    pixel's own logits, so a common offset costs no precision."""
    new_max = tl.maximum(b_max, tl.max(b_z, 0))
    folded = tl.min(o_cls, 0).to(tl.float32)  # classes in b_sum so far (its old terms: one shift each)
    b_sum = tl.where(folded > 0, b_sum + folded * (b_max - new_max), 0.0)
    b_sum += tl.sum(tl.where((o_cls < C)[:, None], b_z - new_max[None, :], 0.0), 0)
    return new_max, b_sum


@triton.jit
def upsampled_position(tile, L, s_n, off_ptr, wgt_ptr, H_UP, W_UP, PIX_BLOCK: tl.constexpr):
    """Output pixels ``tile * PIX_BLOCK + arange`` of the bilinearly upsampled ``[N, H_UP, W_UP]``
    (``L`` pixels in all): offsets of the class-0 logit of each pixel's four source neighbours,
    the weights of the second neighbour along y and x, the linear output index and the mask.

    The tables are ``fastcal._upsample``'s, so every backend interpolates with the same source
    indices and weights: ``off`` = row offsets of y0 and y1 (``H_UP`` each), then column offsets
    of x0 and x1 (``W_UP`` each); ``wgt`` = weights along y (``H_UP``), then along x (``W_UP``).
    Table reads hit the cache: a tile spans few rows.
    """
    o_pix = (tl.zeros([PIX_BLOCK], tl.int64) + tile) * PIX_BLOCK + tl.arange(0, PIX_BLOCK)  # int64: N*H*W may pass 2^31
    m_pix = o_pix < L
    image = o_pix // (H_UP * W_UP)
    o_row = (o_pix // W_UP) % H_UP
    o_col = o_pix % W_UP
    base = image * s_n
    y0 = base + tl.load(off_ptr + o_row, mask=m_pix, other=0)
    y1 = base + tl.load(off_ptr + H_UP + o_row, mask=m_pix, other=0)
    x0 = tl.load(off_ptr + 2 * H_UP + o_col, mask=m_pix, other=0)
    x1 = tl.load(off_ptr + 2 * H_UP + W_UP + o_col, mask=m_pix, other=0)
    wy = tl.load(wgt_ptr + o_row, mask=m_pix, other=0.0)
    wx = tl.load(wgt_ptr + H_UP + o_col, mask=m_pix, other=0.0)
    return y0 + x0, y0 + x1, y1 + x0, y1 + x1, wy, wx, o_pix, m_pix


@triton.jit
def pixel_position(tile, L, O1, O2, so0, so1, so2, s_l, off_ptr, wgt_ptr, H_UP, W_UP,
                   UPSAMPLE: tl.constexpr, PIX_BLOCK: tl.constexpr):
    """The pixels of tile ``tile``: ``(o_z, o01, o10, o11, wy, wx, o_pix, m_pix)``, see
    ``upsampled_position`` (UPSAMPLE; ``so0`` is the image stride) or ``tile_position`` (then
    ``o_z`` alone locates each pixel and the rest is unused)."""
    if UPSAMPLE:
        return upsampled_position(tile, L, so0, off_ptr, wgt_ptr, H_UP, W_UP, PIX_BLOCK)
    else:
        o_z, o_pix, m_pix = tile_position(tile, L, O1, O2, so0, so1, so2, s_l, PIX_BLOCK)
        unused = tl.zeros([PIX_BLOCK], tl.float32)
        return o_z, o_z, o_z, o_z, unused, unused, o_pix, m_pix


@triton.jit
def load_classes(z_ptr, o_z, o01, o10, o11, wy, wx, m_pix, o_cls, C, s_c, UPSAMPLE: tl.constexpr):
    """The [classes, pixels] tile of float32 logits at the pixels ``pixel_position`` located: with
    UPSAMPLE each the bilinear combination of its four neighbours, as ``F.interpolate`` forms it."""
    if UPSAMPLE:
        b_00 = load_tile(z_ptr, o_z, m_pix, o_cls, C, s_c)
        b_01 = load_tile(z_ptr, o01, m_pix, o_cls, C, s_c)
        b_10 = load_tile(z_ptr, o10, m_pix, o_cls, C, s_c)
        b_11 = load_tile(z_ptr, o11, m_pix, o_cls, C, s_c)
        b_top = (1.0 - wx)[None, :] * b_00 + wx[None, :] * b_01
        b_bottom = (1.0 - wx)[None, :] * b_10 + wx[None, :] * b_11
        return (1.0 - wy)[None, :] * b_top + wy[None, :] * b_bottom
    else:
        return load_tile(z_ptr, o_z, m_pix, o_cls, C, s_c)
