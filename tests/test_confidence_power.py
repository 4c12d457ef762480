"""``confidence_power=γ``: each pixel weighs ``conf ** γ``, on every backend, against the oracle."""
import pytest
import torch

import fastcal

import oracle
from cases import DTYPES, device_of, make_logits

POWERS = [0.0, 0.5, 2.0, 4.0]


@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("shape", [(2, 19, 64, 65), (1, 150, 6, 7), (33, 5)], ids=str)
def test_stats_match_oracle(backend, shape, power):
    z = make_logits(shape, device=device_of(backend))
    S, W = fastcal.prototype_stats(z, backend=backend, confidence_power=power)
    oracle.assert_stats_close(S, W, *oracle.stats(z, confidence_power=power))


@pytest.mark.parametrize("dtype", DTYPES)
def test_masks_temperature_and_dtypes(backend, dtype):
    z = make_logits((2, 7, 64, 64), dtype, device=device_of(backend))
    valid = torch.rand(2, 64, 64, device=z.device) > 0.3
    S, W = fastcal.prototype_stats(z, temperature=1.7, valid=valid, backend=backend, confidence_power=2.5)
    oracle.assert_stats_close(S, W, *oracle.stats(z, 1.7, valid, confidence_power=2.5))


def test_deterministic_and_upsampled(backend):
    z = make_logits((2, 6, 9, 11), device=device_of(backend))
    S, W = fastcal.prototype_stats(z, backend=backend, confidence_power=3.0, deterministic=True,
                                   size=(40, 37), align_corners=True)
    up = oracle.interpolate(z, size=(40, 37), align_corners=True)
    oracle.assert_stats_close(S, W, *oracle.stats(up, confidence_power=3.0))


def test_power_zero_is_the_plain_mean_and_counts_pixels(backend):
    z = make_logits((2, 5, 16, 16), device=device_of(backend))
    S, W = fastcal.prototype_stats(z, backend=backend, confidence_power=0)
    counts = torch.bincount(z.argmax(1).flatten().cpu(), minlength=5).double()
    torch.testing.assert_close(W.cpu(), counts, rtol=0, atol=0)  # sums of ones are exact in float32
    P = fastcal.prototypes_from_stats(S, W)
    p = torch.softmax(z.double().cpu(), 1).movedim(1, -1).reshape(-1, 5)
    cls = z.argmax(1).flatten().cpu()
    for k in range(5):
        torch.testing.assert_close(P[k].double(), p[cls == k].mean(0), rtol=1e-5, atol=1e-6)


def test_default_is_the_papers_power_one():
    z = make_logits((2, 5, 64, 64))
    for backend in ("reference", "torch"):
        plain = fastcal.prototype_stats(z, backend=backend)
        one = fastcal.prototype_stats(z, backend=backend, confidence_power=1)
        assert torch.equal(plain[0], one[0]) and torch.equal(plain[1], one[1])


def test_calibrate_and_calibrator_use_the_power():
    z = make_logits((2, 5, 64, 64))
    S, W = oracle.stats(z, confidence_power=2.0)
    labels = fastcal.calibrate(z, confidence_power=2.0)
    oracle.assert_labels_match(labels, z, oracle.prototypes(S, W))
    calibrator = fastcal.LabelCalibrator(5, confidence_power=2.0).update(z)
    oracle.assert_stats_close(calibrator.S, calibrator.W, S, W)
    state = calibrator.state_dict()
    assert state["confidence_power"] == 2.0
    fastcal.LabelCalibrator(5, confidence_power=2.0).load_state_dict(state)
    with pytest.raises(ValueError, match="confidence_power"):
        fastcal.LabelCalibrator(5).load_state_dict(state)
    # a (version 1) state saved before the power existed was taken at 1
    old = {key: value for key, value in state.items()
           if key not in ("confidence_power", "N", "empty", "class_names", "fastcal_version", "digest")}
    fastcal.LabelCalibrator(5).load_state_dict({**old, "version": 1})


@pytest.mark.parametrize("bad, error", [(-0.5, ValueError), (8.5, ValueError), (float("nan"), ValueError),
                                        ("2", TypeError), (True, TypeError)])
def test_bad_powers_are_rejected(bad, error):
    z = make_logits((1, 3, 4, 4))
    with pytest.raises(error, match="confidence_power"):
        fastcal.prototype_stats(z, confidence_power=bad)
    with pytest.raises(error, match="confidence_power"):
        fastcal.calibrate(z, confidence_power=bad)
    with pytest.raises(error, match="confidence_power"):
        fastcal.LabelCalibrator(3, confidence_power=bad)
