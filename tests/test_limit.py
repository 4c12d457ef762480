"""The temperature limit ``temperature=math.inf`` (nearest class mean of centred logits) on every CPU
backend, the calibrator, its saved state and the exported head, against the float64 oracle's own
limit (``tests/oracle.py``), which computes it from its definition, not from a large T."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastcal
from fastcal.export import calibration_head

import oracle
from cases import DTYPES, LAYOUTS, make_logits

INF = math.inf


BACKENDS = ["reference", "torch", "torch-ops", "triton"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def oracle_prototypes(z, valid=None, empty="onehot"):
    S, W = oracle.stats(z, INF, valid)
    return S, W, oracle.prototypes(S, W, empty, INF)


CASES = [((2, 2, 9, 11), torch.float32), ((1, 19, 3, 4, 5), torch.float32), ((37, 19), torch.float32),
         ((1, 300, 5, 7), torch.float32), ((1, 1024, 2, 3), torch.float32)] + [((2, 19, 17, 23), d) for d in DTYPES]


# the interpreted Triton kernels take 300 classes (chunked, several blocks, the last one partial) and no more
@pytest.mark.parametrize("backend,shape,dtype", [(backend, shape, dtype) for backend in BACKENDS
                                                 for shape, dtype in CASES if backend != "triton" or shape[1] <= 300],
                         ids=str)
def test_stats_prototypes_and_labels_match_the_oracle(backend, shape, dtype):
    z = make_logits(shape, dtype)
    S, W = fastcal.prototype_stats(z, temperature=INF, backend=backend)
    S_ref, W_ref, P_ref = oracle_prototypes(z)
    np.testing.assert_array_equal(W.numpy(), W_ref)  # every pixel weighs 1: counts, exactly
    scale = max(1.0, float(np.abs(S_ref).max()))
    np.testing.assert_allclose(S.numpy(), S_ref, rtol=2e-5, atol=2e-6 * scale)
    P = fastcal.prototypes_from_stats(S, W, temperature=INF)
    np.testing.assert_allclose(np.nan_to_num(P.double().numpy(), nan=7.0), np.nan_to_num(P_ref, nan=7.0),
                               rtol=2e-5, atol=2e-6 * scale)
    labels = fastcal.predict(z, P, temperature=INF, backend=backend)
    oracle.assert_labels_match(labels, z, P, INF)
    oracle.assert_labels_match(fastcal.calibrate(z, temperature=INF, backend=backend), z, P, INF)
    oracle.assert_scores_close(fastcal.predict(z, P, temperature=INF, backend=backend, output="scores"), z, P, INF)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_strides_masks_and_a_large_offset(backend, layout):
    """A common offset of +1e4 changes nothing: the mean drops out exactly."""
    z = make_logits((2, 6, 11, 13), layout=layout) + 1e4
    valid = torch.rand(2, 11, 13) > 0.3
    S, W = fastcal.prototype_stats(z, temperature=INF, valid=valid, backend=backend)
    S_ref, W_ref, _ = oracle_prototypes(z, valid)
    np.testing.assert_array_equal(W.numpy(), W_ref)
    np.testing.assert_allclose(S.numpy(), S_ref, rtol=1e-4, atol=1e-3)
    P = fastcal.prototypes_from_stats(S, W, temperature=INF)
    oracle.assert_labels_match(fastcal.predict(z, P, temperature=INF, backend=backend), z, P, INF)


@pytest.mark.parametrize("shape,size", [((2, 7, 9, 11), (23, 29)), ((2, 7, 9, 11), None), ((1, 150, 4, 5), (9, 11))],
                         ids=str)
def test_upsampled_logits(backend, shape, size):
    z = make_logits(shape)
    options = {"size": size} if size else {"scale_factor": 2.5, "align_corners": True}
    reference = oracle.interpolate(z, **options)
    S, W = fastcal.prototype_stats(z, temperature=INF, backend=backend, **options)
    S_ref, W_ref = oracle.stats(reference, INF)
    np.testing.assert_allclose(S.numpy(), S_ref, rtol=1e-4, atol=1e-3)
    P = fastcal.prototypes_from_stats(S, W, temperature=INF)
    labels = fastcal.predict(z, P, temperature=INF, backend=backend, **options)
    oracle.assert_labels_match(labels, reference, P, INF, logit_error=1e-6)


def test_empty_classes_are_never_chosen_while_any_class_has_statistics(backend):
    z = make_logits((2, 6, 8, 8))
    z[:, 2] -= 100.0  # never the argmax
    for empty in ("onehot", "skip"):
        labels = fastcal.calibrate(z, temperature=INF, empty=empty, backend=backend)
        assert not (labels == 2).any()
        P = fastcal.prototypes_from_stats(*fastcal.prototype_stats(z, temperature=INF), empty=empty, temperature=INF)
        assert torch.isnan(P[2]).all() and not torch.isnan(P[[0, 1, 3, 4, 5]]).any()
    nothing = (torch.zeros(6, 6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64))
    P = fastcal.prototypes_from_stats(*nothing, temperature=INF)  # "onehot": the argmax
    assert torch.equal(fastcal.predict(z, P, temperature=INF, backend=backend), z.argmax(dim=1))
    with pytest.raises(ValueError, match="every class is empty"):
        fastcal.prototypes_from_stats(*nothing, empty="skip", temperature=INF)
    every_masked = torch.zeros(2, 8, 8, dtype=torch.bool)
    assert torch.equal(fastcal.calibrate(z, temperature=INF, valid=every_masked, backend=backend),
                       z.argmax(dim=1))


def test_nonfinite_logits_at_valid_pixels_raise(backend):
    z = make_logits((1, 4, 5, 5))
    z[0, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fastcal.prototype_stats(z, temperature=INF, backend=backend)
    valid = torch.ones(1, 5, 5, dtype=torch.bool)
    valid[0, 2, 2] = False
    S, W = fastcal.prototype_stats(z, temperature=INF, valid=valid, backend=backend)
    assert float(W.sum()) == 24.0


@pytest.mark.parametrize("C", [5, 150])
def test_deterministic_sums_equal_the_atomic_ones(C):
    """The Triton backend's fixed-order partial sums (float32 per program) at the limit."""
    z = make_logits((2, C, 6, 7))
    S, W = fastcal.prototype_stats(z, temperature=INF, backend="triton", deterministic=True)
    S_atomic, W_atomic = fastcal.prototype_stats(z, temperature=INF, backend="triton", deterministic=False)
    assert torch.equal(W, W_atomic)
    torch.testing.assert_close(S, S_atomic, rtol=1e-5, atol=1e-5 * float(S_atomic.abs().max()))


def test_the_confidence_power_has_no_effect_at_the_limit(backend):
    z = make_logits((2, 5, 6, 7))
    one = fastcal.prototype_stats(z, temperature=INF, backend=backend)
    for power in (0.0, 3.0):
        other = fastcal.prototype_stats(z, temperature=INF, confidence_power=power, backend=backend)
        assert torch.equal(other[0], one[0]) and torch.equal(other[1], one[1])


def test_finite_temperatures_keep_their_meaning():
    """The largest finite temperature is a softmax, not the limit: its prototypes lie in the simplex."""
    z = make_logits((1, 5, 6, 7))
    S, W = fastcal.prototype_stats(z, temperature=3.4e38)
    assert (S >= 0).all() and torch.allclose(S.sum(dim=1), W.double())
    S_inf, _ = fastcal.prototype_stats(z, temperature=INF)
    assert (S_inf < 0).any()


@settings(max_examples=12 if settings.default.derandomize else 250, deadline=None)
@given(C=st.integers(2, 40), seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 3.0, 30.0]),
       offset=st.sampled_from([0.0, -50.0, 1e4]))
def test_property_every_backend_agrees_with_the_oracle(C, seed, scale, offset):
    torch.manual_seed(seed)
    z = torch.randn(2, C, 5, 6) * scale + offset
    P = torch.from_numpy(oracle_prototypes(z)[2]).float()
    for backend in ("reference", "torch", "torch-ops", "triton"):
        oracle.assert_labels_match(fastcal.predict(z, P, temperature=INF, backend=backend), z, P, INF)


# ----- the calibrator, its state, the wrapper, the head ---------------------------------------------------
def test_the_calibrator_streams_saves_reduces_and_exports_the_limit(tmp_path):
    z = [make_logits((2, 7, 8, 9)) for _ in range(3)]
    cal = fastcal.LabelCalibrator(7, temperature=INF)
    for batch in z:
        cal.update(batch)
    whole = torch.cat(z)
    S_ref, W_ref, P_ref = oracle_prototypes(whole)
    np.testing.assert_allclose(cal.S.numpy(), S_ref, rtol=1e-5, atol=1e-5)
    oracle.assert_labels_match(cal.predict(whole), whole, cal.prototypes, INF)
    cal.save(tmp_path / "limit.pt")
    loaded = fastcal.LabelCalibrator.from_file(tmp_path / "limit.pt")
    assert loaded.temperature == INF and torch.equal(loaded.S, cal.S)
    assert torch.equal(loaded.predict(whole), cal.predict(whole))
    with pytest.raises(ValueError, match="temperature"):
        fastcal.LabelCalibrator(7).load(tmp_path / "limit.pt")
    report = cal.diagnostics()
    assert all(c.self_probability is None for c in report.classes)
    online = fastcal.LabelCalibrator(7, temperature=INF, momentum=0.5)
    for batch in z:
        online.update(batch)
    assert torch.isfinite(online.prototypes[~torch.isnan(online.prototypes).all(dim=1)]).all()
    for layout in ("channels_last", "nchw"):
        head = calibration_head(cal, layout=layout)
        assert (head(whole) == cal.predict(whole)).float().mean() > 0.999
        scores = calibration_head(cal, layout=layout, output="scores")(whole)
        oracle.assert_scores_close(scores, whole, cal.prototypes, INF)


def test_the_wrapper_and_fit_take_the_limit():
    from fastcal.fit import fit_calibrator
    from fastcal.nn import LabelCalibration

    model = torch.nn.Conv2d(3, 5, 1)
    images = [torch.randn(2, 3, 6, 7) for _ in range(2)]
    cal = fit_calibrator(model, images, 5, temperature=INF, progress=False)
    wrapper = LabelCalibration(model, 5, mode="offline", temperature=INF).fit(images, progress=False)
    assert torch.equal(wrapper.calibrator.S, cal.S)
    with torch.no_grad():
        assert torch.equal(wrapper(images[0]), cal.predict(model(images[0])))
