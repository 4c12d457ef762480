"""Every backend against the float64 oracle on generated inputs (Hypothesis).

The inputs reach what a model can produce and what a user can ask for: logits shifted by any
constant, magnitudes up to the dtype's limits, one class leading by far, all-equal logits and
ties, temperatures across twenty decades, masks, strides and dtypes. Labels are checked with the
oracle's relative tolerance (``oracle.assert_labels_match``), statistics with float32-scaled
tolerances, and the invariances exactly where float32 arithmetic is exact.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fastcal
from fastcal import _backends

import oracle
from cases import DTYPES, KERNEL_DEVICE, make_logits

BACKENDS = list(_backends.TESTED)
# The suite draws the same inputs on every run (the "ci" profile), so more examples there only
# repeat a fixed sample; the "explore" profile draws fresh ones. The interpreter runs a kernel
# launch in about a tenth of a second: fewer, smaller cases.
# the interpreted Triton kernels take seconds an example: fewer there (the kernel tests cover them case by case)
EXAMPLES = {"reference": 60, "torch": 100, "torch-ops": 60, "triton": 15}
# HYPOTHESIS_PROFILE=explore (see conftest.py) draws fresh inputs with ten times the examples
EXAMPLES_FACTOR = 10 if settings.default.derandomize is False else 1
KINDS = ["randn", "all-equal", "integer-ties", "one-leads", "extreme"]


@st.composite
def cases(draw, backend):
    dtype = draw(st.sampled_from(DTYPES))
    num_classes = draw(st.sampled_from([2, 3, 5, 19, 40, 70] if backend != "triton" else [2, 5, 19, 70]))
    big = backend in ("torch", "torch-ops") and draw(st.booleans())
    # 64 x 64 images are read in place by the fused loops; smaller ones are copied a chunk at a time
    spatial = (64, 64) if big else draw(st.sampled_from([(), (7,), (5, 6), (2, 3, 4)]))
    batch = draw(st.integers(1, 2))
    layout = draw(st.sampled_from(["contiguous", "channels_last", "sliced"] if spatial else ["contiguous"]))
    kind = draw(st.sampled_from(KINDS))
    finfo = torch.finfo(dtype)
    scale = draw(st.sampled_from([1e-3, 1.0, 3.0, 30.0, 1e3]))
    shift = draw(st.one_of(st.just(0.0), st.sampled_from([-100.0, 100.0, -1e4, 1e4]),
                           st.floats(-finfo.max / 2, finfo.max / 2)))
    temperature = draw(st.one_of(st.just(1.0), st.floats(1e-3, 1e4), st.sampled_from([1e-30, 1e-6, 1e6, 1e30])))
    seed = draw(st.integers(0, 2**31 - 1))
    masked = draw(st.booleans())

    torch.manual_seed(seed)
    z = make_logits((batch, num_classes, *spatial), torch.float32, layout) * scale
    if kind == "all-equal":
        z = torch.zeros_like(z)
    elif kind == "integer-ties":
        z = z.round().clamp(-2, 2)  # five values over many classes: ties everywhere
    elif kind == "one-leads":
        lead = torch.randint(num_classes, (batch, *spatial))
        z = z + 200.0 * max(temperature, 1.0) * torch.nn.functional.one_hot(lead, num_classes).movedim(-1, 1)
    elif kind == "extreme":
        z = torch.sign(z) * finfo.max * torch.rand_like(z)  # anywhere in the dtype's range
    z = (z.double() + shift).clamp(-finfo.max, finfo.max).to(dtype)
    valid = torch.rand(batch, *spatial) > 0.3 if masked and spatial else None
    return z.to(KERNEL_DEVICE if backend == "triton" else "cpu"), temperature, valid


def check_against_oracle(z, temperature, valid, backend, power=1.0):
    device_valid = None if valid is None else valid.to(z.device)
    S, W = fastcal.prototype_stats(z, temperature=temperature, valid=device_valid, backend=backend,
                                   confidence_power=power)
    oracle.assert_stats_close(S, W, *oracle.stats(z, temperature, valid, confidence_power=power))
    P = fastcal.prototypes_from_stats(S, W)
    labels = fastcal.predict(z, P, temperature=temperature, backend=backend)
    oracle.assert_labels_match(labels, z, P, temperature)
    oracle.assert_scores_close(fastcal.predict(z, P, temperature=temperature, backend=backend, output="scores"),
                               z, P, temperature)
    if valid is None:  # calibrate is the two passes, to the bit
        assert torch.equal(fastcal.calibrate(z, temperature=temperature, backend=backend, confidence_power=power),
                           labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_matches_the_oracle(backend):
    api_backend = backend

    @settings(max_examples=EXAMPLES[backend] * EXAMPLES_FACTOR, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(case=cases(backend), power=st.sampled_from([1.0, 0.0, 0.5, 2.0, 4.0]))
    def check(case, power):
        check_against_oracle(*case, api_backend, power)

    check()


@st.composite
def resizes(draw):
    """Bilinear resizes of every kind: down- and upsampling (the CPU loops interpolate along x by
    bands where a tile of 16 output columns spans at most 8 source columns, by gathers
    elsewhere), sizes that are no multiple of the input, one row or column, either
    ``align_corners``."""
    in_size = (draw(st.integers(1, 9)), draw(st.integers(1, 14)))
    if draw(st.booleans()):
        resize = {"size": (draw(st.integers(1, 40)), draw(st.integers(1, 70)))}
    else:
        factor = draw(st.sampled_from([0.5, 1.0, 1.5, 2.0, 2.5, 3.3, 4.0, 8.0, 9.0]))
        assume(min(in_size) * factor >= 1)  # at least one output pixel
        resize = {"scale_factor": factor}
    return in_size, {**resize, "align_corners": draw(st.booleans())}


@pytest.mark.parametrize("backend", BACKENDS)
def test_upsampling_on_the_fly_matches_the_oracle(backend):
    """Stats and labels with ``size=`` / ``scale_factor=`` are those of the oracle's interpolation,
    up to the float32 rounding of the interpolated logits."""
    api_backend = backend

    @settings(max_examples=EXAMPLES[backend] * EXAMPLES_FACTOR // 3, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(resize=resizes(), seed=st.integers(0, 2**31 - 1), num_classes=st.sampled_from([2, 5, 19, 40]),
           dtype=st.sampled_from(DTYPES), layout=st.sampled_from(["contiguous", "channels_last", "sliced"]),
           temperature=st.sampled_from([0.3, 1.0, 4.0]), masked=st.booleans())
    def check(resize, seed, num_classes, dtype, layout, temperature, masked):
        (in_size, kwargs), device = resize, KERNEL_DEVICE if backend == "triton" else "cpu"
        torch.manual_seed(seed)
        z = make_logits((2, num_classes, *in_size), dtype, layout, device=device)
        z_up = oracle.interpolate(z, kwargs.get("size"), kwargs.get("scale_factor"), kwargs["align_corners"])
        # float32 interpolation rounds each logit by a few ulps of the largest neighbour
        logit_error = 4 * 2.0**-23 * float(z.float().abs().max())
        # where two classes' interpolated logits agree within that, the rounding picks the argmax (exact
        # ties are common: half-precision logits and integer factors give dyadic values and weights k / f)
        top_two = z_up.topk(2, dim=1).values
        decided = top_two[:, 0] - top_two[:, 1] > 2 * logit_error
        valid = decided & (torch.rand(decided.shape) > 0.3) if masked else decided
        S, W = fastcal.prototype_stats(z, temperature=temperature, valid=valid.to(device), backend=api_backend,
                                       **kwargs)
        oracle.assert_stats_close(S, W, *oracle.stats(z_up, temperature, valid))
        P = fastcal.prototypes_from_stats(S, W)
        labels = fastcal.predict(z, P, temperature=temperature, backend=api_backend, **kwargs)
        oracle.assert_labels_match(labels.cpu(), z_up, P, temperature, logit_error=logit_error)

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifting_a_pixel_changes_nothing(backend):
    """Integer logits and integer shifts are exact in float32, so ``z - max z`` is the same bits:
    labels and statistics must be identical, whatever the shift."""
    api_backend = backend
    device = KERNEL_DEVICE if backend == "triton" else "cpu"

    @settings(max_examples=EXAMPLES[backend] * EXAMPLES_FACTOR // 3, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(seed=st.integers(0, 2**31 - 1), num_classes=st.sampled_from([3, 19, 70]),
           shift=st.integers(-2**22, 2**22), per_pixel=st.booleans(),
           temperature=st.sampled_from([1e-3, 0.5, 1.0, 7.0, 1e3]))
    def check(seed, num_classes, shift, per_pixel, temperature):
        torch.manual_seed(seed)
        z = torch.randint(-40, 40, (2, num_classes, 5, 6)).float()
        offset = torch.randint(-2**22, 2**22, (2, 1, 5, 6)).float() if per_pixel else float(shift)
        z, shifted = z.to(device), (z + offset).to(device)
        S, W = fastcal.prototype_stats(z, temperature=temperature, backend=api_backend)
        S2, W2 = fastcal.prototype_stats(shifted, temperature=temperature, backend=api_backend)
        torch.testing.assert_close(S2, S, rtol=0, atol=0)
        torch.testing.assert_close(W2, W, rtol=0, atol=0)
        P = fastcal.prototypes_from_stats(S, W)
        assert torch.equal(fastcal.predict(shifted, P, temperature=temperature, backend=api_backend),
                           fastcal.predict(z, P, temperature=temperature, backend=api_backend))

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_permuting_classes_permutes_labels(backend):
    """With the classes of the logits and of the prototypes permuted alike, a pixel's label is the
    permuted label, wherever its nearest prototype wins by more than the tolerance."""
    api_backend = backend
    device = KERNEL_DEVICE if backend == "triton" else "cpu"

    @settings(max_examples=EXAMPLES[backend] * EXAMPLES_FACTOR // 3, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(seed=st.integers(0, 2**31 - 1), num_classes=st.sampled_from([2, 5, 19, 70]),
           temperature=st.sampled_from([0.1, 1.0, 10.0, 1e3]), dtype=st.sampled_from(DTYPES))
    def check(seed, num_classes, temperature, dtype):
        torch.manual_seed(seed)
        z = make_logits((2, num_classes, 6, 5), dtype, device=device)
        perm = torch.randperm(num_classes)
        S, W = fastcal.prototype_stats(z, temperature=temperature, backend="reference")
        P = fastcal.prototypes_from_stats(S, W).to(device)
        labels = fastcal.predict(z, P, temperature=temperature, backend=api_backend).cpu()
        z_perm, P_perm = z[:, perm.to(device)], P[perm][:, perm]
        labels_perm = fastcal.predict(z_perm, P_perm, temperature=temperature, backend=api_backend).cpu()
        clear = torch.from_numpy(oracle.clear_winners(z, P, temperature)).view(labels.shape)
        assert torch.equal(perm[labels_perm][clear], labels[clear])

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_beyond_float32_are_rejected_before_any_state_changes(backend):
    """float64 logits are read as float32: a value beyond its range is non-finite, on every backend."""
    api_backend = backend
    device = KERNEL_DEVICE if backend == "triton" else "cpu"
    z = torch.randn(1, 4, 5, 5, dtype=torch.float64, device=device)
    z[0, 2, 1, 1] = 1e39
    with pytest.raises(ValueError, match=r"logits: 1 valid pixel\(s\) have NaN or infinite"):
        fastcal.prototype_stats(z, backend=api_backend)
    cal = fastcal.LabelCalibrator(4, backend=api_backend).update(torch.randn(1, 4, 3, 3, device=device))
    S, W = cal.S.clone(), cal.W.clone()
    with pytest.raises(ValueError, match="NaN or infinite"):
        cal.update(z)
    assert torch.equal(cal.S, S) and torch.equal(cal.W, W) and cal.num_updates == 1
    valid = torch.ones(1, 5, 5, dtype=torch.bool, device=device)
    valid[0, 1, 1] = False  # masked out, the value is ignored like any other
    S, W = fastcal.prototype_stats(z, valid=valid, backend=api_backend)
    oracle.assert_stats_close(S, W, *oracle.stats(z, 1.0, valid.cpu()))
    assert np.isfinite(S.cpu().numpy()).all()
