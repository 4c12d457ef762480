"""The fused CPU loops of fastcal.cpu_kernels, called directly, against the float64 NumPy oracle."""
import math

import numba
import numpy as np
import pytest
import torch

from fastcal import _upsample, cpu_kernels, numba_backend

import oracle

FLOAT32_ULP = 2.0**-23


def image_batch(G, C, L, scale=3.0):
    return (torch.randn(G, C, L) * scale).numpy()


def run_stats(z, g, start, n, temperature=1.0, valid=None, power=1.0, counts=False):
    C = z.shape[1]
    S_parts = np.zeros((cpu_kernels.UNITS, C, C))
    W_parts = np.zeros((cpu_kernels.UNITS, C))
    N_parts = np.zeros((cpu_kernels.UNITS, C))
    mask = np.empty(0, np.uint8) if valid is None else valid.astype(np.uint8)
    bad = cpu_kernels.stats_chunk(z, g, start, n, np.float32(1 / temperature), np.float32(power), mask, S_parts,
                                  W_parts, N_parts, 0, cpu_kernels.NO_ROWS, cpu_kernels.NO_COLS)
    if counts:
        return S_parts.sum(0), W_parts.sum(0), N_parts.sum(0), int(bad)
    return S_parts.sum(0), W_parts.sum(0), int(bad)


def as_logits(z, g, start, n):
    """The pixels a call covers, as [1, C, n] logits for the oracle."""
    return torch.from_numpy(np.ascontiguousarray(z[g, :, start:start + n]))[None]


@numba.njit
def exp_each(x, out):
    for i in range(x.size):
        out[i] = cpu_kernels._exp_nonpositive(x[i])


def test_exp_is_accurate_to_two_ulp():
    x = np.concatenate([-np.geomspace(1e-8, 87.0, 4000), [0.0, -1e-30, -0.5, -np.log(2)]]).astype(np.float32)
    e = np.empty_like(x)
    exp_each(x, e)
    assert e[x == 0][0] == 1.0
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(e / exact - 1)) < 2 * FLOAT32_ULP


def test_exp_below_the_floor_is_negligible():
    x = np.array([-87.5, -100.0, -1e4, -np.inf], np.float32)
    e = np.empty_like(x)
    exp_each(x, e)
    assert np.all((e >= 0) & (e < 2e-38))


def centred_softmax(z, g, start, n, temperature, centre):
    d = np.empty((z.shape[1], n), np.float32)
    cpu_kernels.centred_softmax_chunk(z, g, start, n, np.float32(1 / temperature), centre, d, cpu_kernels.UNITS,
                                      0, cpu_kernels.NO_ROWS, cpu_kernels.NO_COLS)
    return d


@pytest.mark.parametrize("shift", [0.0, -100.0, 1e4])
@pytest.mark.parametrize("temperature", [1e-3, 0.3, 1.0, 4.0, 1e3])
def test_centred_softmax_chunk_matches_oracle(temperature, shift):
    """Any class may hold the max and the logits may sit anywhere: ``d + c`` is the float64 softmax
    to a few float32 ulps of its entries."""
    C = 7
    z = image_batch(2, C, 1000) + np.float32(shift)
    z[1, 3, 400:450] += 50.0  # one class far ahead
    centre = np.random.default_rng(2).random(C).astype(np.float32) / C
    d = centred_softmax(z, 1, 300, 600, temperature, centre)
    p, _, _ = oracle.soft_labels(oracle.pixels_by_class(as_logits(z, 1, 300, 600)), temperature)
    np.testing.assert_allclose(d.T.astype(np.float64) + centre, p, rtol=0, atol=8 * C * FLOAT32_ULP)
    assert np.all(np.abs(d.T + centre - p) <= 8 * C * FLOAT32_ULP * p + FLOAT32_ULP * centre)


# n: fewer blocks than work units, one partial block, many blocks with a partial last one
@pytest.mark.parametrize("n", [1, 100, cpu_kernels.BLOCK, 5000])
@pytest.mark.parametrize("C", [2, 3, 19, cpu_kernels.MAX_CLASSES])
def test_stats_chunk_matches_oracle(C, n):
    z = image_batch(2, C, n + 70)
    S, W, bad = run_stats(z, 1, 70, n)
    assert bad == 0
    oracle.assert_stats_close(torch.from_numpy(S), torch.from_numpy(W), *oracle.stats(as_logits(z, 1, 70, n)))


def test_stats_chunk_mask_temperature_and_non_finite_logits():
    z = image_batch(1, 5, 3000)
    valid = np.random.default_rng(0).random(3000) > 0.3
    z[0, 2, ~valid] = np.nan  # garbage under the mask adds nothing and is not counted
    z[0, 1, np.flatnonzero(valid)[:3]] = [np.nan, np.inf, -np.inf]  # three valid pixels are bad
    S, W, bad = run_stats(z, 0, 0, 3000, temperature=2.5, valid=valid)
    assert bad == 3
    clean = valid.copy()
    clean[np.flatnonzero(valid)[:3]] = False
    S_ref, W_ref = oracle.stats(as_logits(z, 0, 0, 3000), 2.5, torch.from_numpy(clean)[None])
    oracle.assert_stats_close(torch.from_numpy(S), torch.from_numpy(W), S_ref, W_ref)


@pytest.mark.parametrize("power", [0.0, 0.5, 3.0])
def test_stats_chunk_counts_and_confidence_power(power):
    z = image_batch(1, 7, 3000)
    valid = np.random.default_rng(1).random(3000) > 0.2
    S, W, N, bad = run_stats(z, 0, 0, 3000, valid=valid, power=power, counts=True)
    assert bad == 0
    logits = as_logits(z, 0, 0, 3000)
    oracle.assert_stats_close(torch.from_numpy(S), torch.from_numpy(W),
                              *oracle.stats(logits, 1.0, torch.from_numpy(valid)[None], confidence_power=power))
    expected = np.bincount(oracle.pixels_by_class(logits).argmax(axis=1)[valid], minlength=7)
    assert np.array_equal(N, expected)


def test_stats_chunk_ties_take_the_lowest_class():
    z = np.zeros((1, 4, 300), np.float32)
    z[0, 1] = 2.0
    z[0, 3] = 2.0
    S, W, _ = run_stats(z, 0, 0, 300)
    assert W[1] > 0 and W[0] == W[2] == W[3] == 0


def test_stats_chunk_does_not_depend_on_the_thread_count():
    z = image_batch(1, 19, 20000)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        S_one, W_one, _ = run_stats(z, 0, 0, 20000)
    finally:
        numba.set_num_threads(threads)
    S_all, W_all, _ = run_stats(z, 0, 0, 20000)
    assert np.array_equal(S_one, S_all) and np.array_equal(W_one, W_all)


@numba.njit
def nearest_labels(d, A, bias, labels):
    """``cpu_kernels._block_nearest`` over the columns of ``d`` [C, n], a block at a time."""
    C, n = d.shape
    block, scratch = cpu_kernels._nearest_scratch(C)
    for start in range(0, n, cpu_kernels.BLOCK):
        count = min(cpu_kernels.BLOCK, n - start)
        block[:, :count] = d[:, start:start + count]
        cpu_kernels._block_nearest(block, count, A, bias, scratch)
        labels[start:start + count] = scratch[2][:count]


@pytest.mark.parametrize("C", [1, 3, 4, 6, 12, 19])
def test_block_nearest_is_exact_and_takes_the_lowest_class_on_ties(C):
    rng = np.random.default_rng(C)
    # small integers: every sum is exact in float32, and many distances tie
    d = rng.integers(0, 3, size=(C, 700)).astype(np.float32)
    A = rng.integers(-2, 3, size=(C, C)).astype(np.float32)
    bias = rng.integers(0, 3, size=C).astype(np.float32)
    labels = np.full(750, 99, np.int64)
    nearest_labels(d, A, bias, labels)
    expected = (bias[:, None] + A.astype(np.float64) @ d).argmin(axis=0)  # NumPy takes the first minimum
    assert np.array_equal(labels[:700], expected)
    assert np.all(labels[700:] == 99)  # nothing beyond the pixels is written


def test_block_nearest_skips_infinite_rows():
    d = np.ones((3, 10), np.float32)
    A = np.array([[0, 0, 0], [0, 0, 0], [5, 5, 5]], np.float32)
    labels = np.empty(10, np.int64)
    nearest_labels(d, A, np.array([np.inf, np.inf, 1.0], np.float32), labels)
    assert np.all(labels == 2)


@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.uint8])
def test_argmin_chunk_is_exact_and_takes_the_lowest_class_on_ties(label_dtype):
    rng = np.random.default_rng(1)
    distance = rng.integers(0, 4, size=(6, 1000)).astype(np.float32)  # many ties
    bias = rng.integers(0, 2, size=6).astype(np.float32)
    labels = np.full(1000, 99, label_dtype)
    cpu_kernels.argmin_chunk(distance, bias, 700, labels)
    expected = (distance + bias[:, None])[:, :700].argmin(axis=0)  # NumPy takes the first minimum
    assert np.array_equal(labels[:700], expected)
    assert np.all(labels[700:] == 99)  # nothing beyond n is written


def test_argmin_chunk_skips_infinite_rows():
    distance = np.zeros((3, 10), np.float32)
    distance[2] = 5.0
    labels = np.empty(10, np.int64)
    cpu_kernels.argmin_chunk(distance, np.array([np.inf, np.inf, 1.0], np.float32), 10, labels)
    assert np.all(labels == 2)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_predict_chunk_matches_oracle(temperature):
    z = image_batch(2, 19, 5000)
    P = torch.softmax(torch.randn(19, 19) * 2, dim=1)
    centre = P.mean(dim=0)
    A = (-2 * (P - centre)).float().numpy()
    bias = ((P - centre) ** 2).sum(dim=1).float().numpy()
    labels = np.full(5000 - 300, 99, np.int64)
    cpu_kernels.predict_chunk(z, 1, 300, 4700, np.float32(1 / temperature), centre.float().numpy(), A, bias, labels,
                              cpu_kernels.UNITS, 0, cpu_kernels.NO_ROWS, cpu_kernels.NO_COLS)
    oracle.assert_labels_match(torch.from_numpy(labels)[None], as_logits(z, 1, 300, 4700), P, temperature)


@pytest.mark.parametrize("dtype, bits", [(torch.float16, torch.uint16), (torch.bfloat16, torch.int16)])
def test_half_precision_bits_read_as_their_float32_values(dtype, bits):
    """float16 / bfloat16 logits read in place give bit for bit what their float32 upcast gives."""
    x = (torch.randn(2, 7, 3000) * 3).to(dtype)
    x[0, 3, 5] = float("inf")
    results = []
    for z in (x.view(bits).numpy(), x.float().numpy()):
        S, W, bad = run_stats(z, 0, 100, 2500)
        d = centred_softmax(z, 1, 100, 2500, 1 / 0.7, np.full(7, 1 / 7, np.float32))
        results.append((S, W, bad, d))
    assert results[0][2] == 0 and run_stats(x.view(bits).numpy(), 0, 0, 10)[2] == 1
    for a, b in zip(*results):
        assert np.array_equal(a, b)


@numba.njit(parallel=True)
def rows_cached_after(z, blocks, width, rows, cols):
    """The source rows ``_block_upsample`` holds after ``blocks`` blocks of image 0, in a parallel
    loop as the upsampled loops call it."""
    held = np.empty(2, np.int64)
    for _ in numba.prange(1):
        block, rows_cache, cached, padded = cpu_kernels._upsample_scratch(z.shape[1], cols, width)
        for b in range(blocks):
            cpu_kernels._block_upsample(z[0], b * cpu_kernels.BLOCK, cpu_kernels.BLOCK, width, rows, cols, block,
                                        rows_cache, cached, padded)
        held[:] = cached
    return held


def test_the_row_cache_keeps_the_last_output_rows_source_rows():
    """Each source row is interpolated along x once per work unit only if the cache's record of what it
    holds survives from block to block."""
    logits = torch.randn(1, 3, 8, 16)
    upsample = _upsample.resolve(logits, None, 4, False)
    width, rows, cols = numba_backend._upsample_tables(logits, upsample)
    blocks = 5  # 1280 pixels: output rows 0 .. 19 of 64 columns
    y = blocks * cpu_kernels.BLOCK // width - 1
    held = rows_cached_after(logits.view(1, 3, -1).numpy(), blocks, width, rows, cols)
    assert sorted(held) == sorted({int(rows[0][y]), int(rows[1][y])})


# ----- between the passes: prototypes and operands ---------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, math.inf])
@pytest.mark.parametrize("num_classes", [2, 19, 40, 150])
@pytest.mark.parametrize("empty", ["onehot", "skip"])
def test_prototypes_and_operands_match_the_reference(num_classes, empty, temperature):
    """The serial loops that build the prototypes and the loops' operands on the host agree with
    ``reference.prototypes_from_stats`` (exactly: the same float64 division, rounded once) and
    ``_operands.centred_prototypes`` (to an ulp: the mean's float64 sum may run in another order)."""
    from fastcal import reference
    from fastcal._operands import centred_prototypes

    z = torch.randn(2, num_classes, 7, 9) * 3
    S, W = reference.prototype_stats(z, temperature)[:2]
    S[[0, -1]], W[[0, -1]] = 0.0, 0.0
    P = np.empty((num_classes, num_classes), np.float32)
    limit = math.isinf(temperature)
    cpu_kernels.prototypes_from_sums(S.numpy(), W.numpy(), empty == "skip", limit, P)
    expected = reference.prototypes_from_stats(S, W, empty, temperature)
    assert torch.equal(torch.from_numpy(P).nan_to_num(), expected.nan_to_num())
    assert torch.equal(torch.from_numpy(P).isnan(), expected.isnan())
    A_times_minus_2, centre, bias = numba_backend._centred_on_host(P)
    A, c, b = centred_prototypes(expected)
    torch.testing.assert_close(torch.from_numpy(centre), c, rtol=FLOAT32_ULP, atol=2**-30)
    torch.testing.assert_close(torch.from_numpy(A_times_minus_2), -2 * A, rtol=2 * FLOAT32_ULP, atol=2**-28)
    torch.testing.assert_close(torch.from_numpy(bias), b, rtol=4 * FLOAT32_ULP, atol=2**-40)
    if limit and empty == "onehot":  # with no statistics at all, the centred one-hot rows: the argmax
        cpu_kernels.prototypes_from_sums(0 * S.numpy(), 0 * W.numpy(), False, True, P)
        assert torch.equal(torch.from_numpy(P), reference.prototypes_from_stats(0 * S, 0 * W, empty, temperature))
