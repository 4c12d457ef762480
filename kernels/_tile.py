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
