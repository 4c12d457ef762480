"""The Triton stats kernels (interpreter) against the float64 NumPy oracle."""
import math

import pytest
import torch
import triton
import triton.language as tl

import fastcal
from fastcal.kernels import stats
from fastcal.kernels._layout import pixel_layout
from fastcal.kernels._tile import tile_position
from fastcal.kernels.configs import TARGETS

import oracle
from cases import DTYPES, KERNEL_DEVICE, LAYOUTS, make_logits

# (shape, rtol-scale): odd pixel counts exercise the tile masks; C covers the fused block sizes
# (2, 3, 19 -> 16/32) and the chunked schedule (150; 300: several class blocks, the last one partial)
SHAPES = [(2, 2, 13, 11), (1, 3, 7, 9), (2, 19, 17, 23), (1, 19, 3, 4, 5), (37, 19), (1, 150, 5, 7), (5, 300)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_stats_match_oracle(shape, dtype):
    z = make_logits(shape, dtype, device=KERNEL_DEVICE)
    S, W = fastcal.prototype_stats(z, backend="triton")
    assert S.dtype == W.dtype == torch.float64
    oracle.assert_stats_close(S, W, *oracle.stats(z))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_classes", [19, 150])
def test_any_strides(layout, num_classes):
    z = make_logits((2, num_classes, 9, 10), layout=layout, device=KERNEL_DEVICE)
    S, W = fastcal.prototype_stats(z, backend="triton")
    oracle.assert_stats_close(S, W, *oracle.stats(z))


@pytest.mark.parametrize("num_classes", [5, 150])
def test_mask_temperature_and_masked_garbage(num_classes):
    z = make_logits((2, num_classes, 11, 9), device=KERNEL_DEVICE)
    valid = torch.rand(2, 11, 9, device=KERNEL_DEVICE) > 0.4
    z[~valid.unsqueeze(1).expand_as(z)] = float("nan")
    S, W = fastcal.prototype_stats(z, temperature=0.7, valid=valid, backend="triton")
    oracle.assert_stats_close(S, W, *oracle.stats(z, 0.7, valid))


@pytest.mark.parametrize("num_classes", [6, 150])
def test_empty_classes_have_zero_sums(num_classes):
    z = make_logits((1, num_classes, 8, 8), device=KERNEL_DEVICE)
    z[:, 2] -= 100.0
    S, W = fastcal.prototype_stats(z, backend="triton")
    assert W[2] == 0 and (S[2] == 0).all()
    oracle.assert_stats_close(S, W, *oracle.stats(z))


def test_argmax_ties_take_the_lowest_class():
    z = torch.zeros(1, 70, 2, 3, device=KERNEL_DEVICE)
    z[:, 5] = 1.0
    z[:, 66] = 1.0  # a tie across class blocks of the chunked schedule
    for C in (19, 70):
        S, W = fastcal.prototype_stats(z[:, :C].contiguous(), backend="triton")
        assert W[5] > 0 and W.count_nonzero() == 1


@pytest.mark.parametrize("num_classes", [4, 150])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_logits_are_counted(num_classes, bad):
    z = make_logits((1, num_classes, 6, 7), device=KERNEL_DEVICE)
    z[0, num_classes - 1, 2, 3] = bad
    z[0, 0, 4, 4] = bad
    valid = torch.ones(1, 6, 7, dtype=torch.bool, device=KERNEL_DEVICE)
    *_, count = stats.prototype_stats(z, 1.0, valid)
    assert count == 2
    valid[0, 4, 4] = False
    S, W, N, count = stats.prototype_stats(z, 1.0, valid)
    assert count == 1 and torch.isfinite(S).all() and torch.isfinite(W).all()
    assert N.sum() == 6 * 7 - 2  # the pixels used: valid and finite
    with pytest.raises(ValueError, match="1 valid pixel"):
        fastcal.LabelCalibrator(num_classes, backend="triton").update(z, valid)


@pytest.mark.parametrize("num_classes", [19, 150])
def test_deterministic_mode_is_bitwise_repeatable(num_classes):
    z = make_logits((2, num_classes, 8, 10), device=KERNEL_DEVICE)  # several programs' partial sums
    runs = [fastcal.prototype_stats(z, backend="triton", deterministic=True) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    oracle.assert_stats_close(*runs[0], *oracle.stats(z))
    torch.use_deterministic_algorithms(True)
    try:
        auto = fastcal.prototype_stats(z, backend="triton")
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(auto[0], runs[0][0])


@triton.jit
def _tile_offsets_kernel(out_ptr, tile, L, O1, O2, so0, so1, so2, s_l, PIX_BLOCK: tl.constexpr):
    o_z, o_pix, m_pix = tile_position(tile, L, O1, O2, so0, so1, so2, s_l, PIX_BLOCK)
    o = tl.arange(0, PIX_BLOCK)
    tl.store(out_ptr + o, o_z)
    tl.store(out_ptr + PIX_BLOCK + o, o_pix)


def test_offsets_beyond_int32_are_int64():
    """8 x 150 x 1024 x 2048 logits span more than 2^31 elements; the tile offsets must not wrap."""
    N, C, H, W = 8, 150, 1024, 2048
    layout = pixel_layout(torch.empty(N, C, H, W, device="meta"))
    out = torch.empty(2 * 64, dtype=torch.int64, device=KERNEL_DEVICE)
    last_tile = layout.num_tiles(64) - 1
    _tile_offsets_kernel[(1,)](out, last_tile, *layout.kernel_args()[1:8], PIX_BLOCK=64)
    last_pixel = (N - 1) * C * H * W + H * W - 64 + torch.arange(64)
    out = out.cpu()
    assert torch.equal(out[:64], last_pixel)
    assert torch.equal(out[64:], N * H * W - 64 + torch.arange(64))


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("num_classes", [19, 150])
def test_every_targets_configuration_matches_oracle(target, num_classes):
    """Each target's table (its blocks, warps and dot precision: split TF32 on NVIDIA, float32 on
    AMD) gives the oracle's sums; 9 x 16 images take the aligned, pipelined configuration."""
    z = make_logits((2, num_classes, 9, 16), device=KERNEL_DEVICE)
    launches, S, W, N, bad = stats.stats_launches(z, 1.0, None, target=target)
    assert launches[-1].constexprs["DOT_PRECISION"] == TARGETS[target].onehot_precision
    for launch in launches:
        launch()
    oracle.assert_stats_close(S, W, *oracle.stats(z))
    assert int(bad) == 0
