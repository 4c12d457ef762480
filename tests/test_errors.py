"""Every bad input named in the contract (docs/contract.md, docs/design.md) raises a clear error and
changes no state."""
import math

import pytest
import torch

import fastcal

Z = torch.randn(2, 4, 5, 5)


def snapshot(cal):
    return cal.S.clone(), cal.W.clone(), cal.num_updates, cal.num_pixels


def fitted():
    return fastcal.LabelCalibrator(4, backend="torch").update(torch.randn(1, 4, 3, 3))


BAD_UPDATES = [
    ("integer", lambda: torch.ones(2, 4, 5, 5, dtype=torch.int64), {}, TypeError, "logits: expected a floating"),
    ("complex", lambda: torch.randn(2, 4, 5, 5, dtype=torch.complex64), {}, TypeError, "logits: expected a floating"),
    ("list", lambda: [[1.0, 2.0]], {}, TypeError, "logits: expected a torch.Tensor"),
    ("1-d", lambda: torch.randn(4), {}, ValueError, r"logits: expected shape \[N, C, \*spatial\]"),
    ("4 spatial dims", lambda: torch.randn(1, 4, 2, 2, 2, 2), {}, ValueError, "at most 3 spatial dims"),
    ("wrong C", lambda: torch.randn(2, 5, 3, 3), {}, ValueError, "expected C=4"),
    ("valid shape", lambda: Z, {"valid": torch.ones(2, 5, 4, dtype=torch.bool)}, ValueError, "valid: expected shape"),
    ("valid dtype", lambda: Z, {"valid": torch.ones(2, 5, 5, dtype=torch.complex64)}, TypeError,
     "valid: expected dtype torch.bool"),
    ("nan", lambda: Z.clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan"))), {}, ValueError,
     r"logits: \d+ valid pixel\(s\) have NaN or infinite"),
    ("+inf", lambda: torch.where(torch.rand_like(Z) < 0.1, math.inf, Z), {}, ValueError, "NaN or infinite"),
    ("-inf", lambda: torch.where(torch.rand_like(Z) < 0.1, -math.inf, Z), {}, ValueError, "NaN or infinite"),
]


@pytest.mark.parametrize("name,make,kwargs,error,message", BAD_UPDATES, ids=[c[0] for c in BAD_UPDATES])
def test_bad_update_changes_nothing(name, make, kwargs, error, message):
    cal = fitted()
    before = snapshot(cal)
    with pytest.raises(error, match=message):
        cal.update(make(), **kwargs)
    after = snapshot(cal)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) and before[2:] == after[2:]


def test_c_below_two():
    with pytest.raises(ValueError, match="at least 2 classes"):
        fastcal.calibrate(torch.randn(2, 1, 3, 3))
    with pytest.raises(ValueError, match="num_classes: expected an int >= 2"):
        fastcal.LabelCalibrator(1)


@pytest.mark.parametrize("temperature", [0, -1.0, -math.inf, math.nan, 1e-38, 1e-300, 3.5e38, 1e300])
def test_bad_temperature_value(temperature):
    with pytest.raises(ValueError, match="temperature: expected a positive number in float32's normal range"):
        fastcal.calibrate(Z, temperature=temperature)


@pytest.mark.parametrize("temperature", ["1", None, True])
def test_bad_temperature_type(temperature):
    with pytest.raises(TypeError, match="temperature"):
        fastcal.prototype_stats(Z, temperature=temperature)


def test_bad_choices():
    with pytest.raises(ValueError, match="backend: expected one of"):
        fastcal.calibrate(Z, backend="cuda")
    with pytest.raises(ValueError, match="empty: expected one of"):
        fastcal.calibrate(Z, empty="zero")
    with pytest.raises(ValueError, match="empty: expected one of"):
        fastcal.LabelCalibrator(4, empty="drop")
    with pytest.raises(TypeError, match="label_dtype"):
        fastcal.predict(Z, torch.eye(4), label_dtype=torch.float32)
    with pytest.raises(ValueError, match="uint8 holds at most 256"):
        fastcal.predict(torch.randn(1, 300), torch.eye(300), label_dtype=torch.uint8)


def test_bad_prototypes():
    with pytest.raises(ValueError, match=r"prototypes: expected shape \[C, C\] = \[4, 4\]"):
        fastcal.predict(Z, torch.eye(3))
    with pytest.raises(TypeError, match="prototypes: expected a floating"):
        fastcal.predict(Z, torch.eye(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="prototypes: entries must be finite"):
        fastcal.predict(Z, torch.eye(4).index_put_((torch.tensor(0), torch.tensor(1)), torch.tensor(math.inf)))
    with pytest.raises(ValueError, match="every row is NaN"):
        fastcal.predict(Z, torch.full((4, 4), math.nan))


def test_bad_stats():
    with pytest.raises(ValueError, match="S, W: expected shapes"):
        fastcal.prototypes_from_stats(torch.ones(3, 3), torch.ones(4))
    with pytest.raises(ValueError, match="cannot be negative"):
        fastcal.prototypes_from_stats(-torch.ones(3, 3), torch.ones(3))
    with pytest.raises(ValueError, match="every class is empty"):
        fastcal.prototypes_from_stats(torch.zeros(3, 3), torch.zeros(3), empty="skip")


def test_device_mismatch_is_reported():
    """Tensors on another device than the logits (meta stands in for one: it needs no GPU)."""
    with pytest.raises(ValueError, match="prototypes: on meta, but logits are on cpu"):
        fastcal.predict(Z, torch.eye(4, device="meta"), backend="torch")
    with pytest.raises(ValueError, match="valid: on meta, but logits are on cpu"):
        fastcal.prototype_stats(Z, valid=torch.ones(2, 5, 5, dtype=torch.bool, device="meta"))


def test_masked_nan_is_accepted():
    z = Z.clone()
    valid = torch.ones(2, 5, 5, dtype=torch.bool)
    valid[0, 0, 0] = False
    z[0, :, 0, 0] = math.nan
    S, W = fastcal.prototype_stats(z, valid=valid)
    assert torch.isfinite(S).all() and torch.isfinite(W).all()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("shape", [(0, 4, 5, 5), (2, 4, 0, 5), (0, 4)])
def test_empty_batches_change_nothing(backend, shape):
    cal = fastcal.LabelCalibrator(4, backend=backend).update(torch.randn(1, 4, 3, 3))
    before = snapshot(cal)
    cal.update(torch.randn(shape))
    assert torch.equal(cal.S, before[0]) and torch.equal(cal.W, before[1])
    labels = fastcal.calibrate(torch.randn(shape), backend=backend, empty="skip")
    assert labels.shape == (shape[0], *shape[2:]) and labels.dtype == torch.int64
    with pytest.raises(TypeError, match="label_dtype"):
        fastcal.calibrate(torch.randn(shape), backend=backend, label_dtype=torch.float32)


def test_bad_state_dict_changes_nothing():
    cal = fitted()
    before = snapshot(cal)
    good = cal.state_dict()
    bad_states = [
        ({**good, "version": 99}, "version 99 is not supported"),
        ({**good, "format": "other"}, "not a fastcal.LabelCalibrator state"),
        ({**good, "num_classes": 5}, "num_classes=5"),
        ({**good, "temperature": 2.0}, "temperature 2.0"),
        ({**good, "S": torch.ones(3, 3, dtype=torch.float64)}, r"state\['S'\]: expected shape"),
        ({**good, "W": torch.ones(4, dtype=torch.float32)}, r"state\['W'\]: expected a float64"),
        ({**good, "W": torch.full((4,), math.nan, dtype=torch.float64)}, "finite and non-negative"),
        ({**good, "S": -torch.ones(4, 4, dtype=torch.float64)}, "finite and non-negative"),
        ({**good, "num_pixels": -1}, "non-negative ints"),
    ]
    for state, message in bad_states:
        with pytest.raises(ValueError, match=message):
            cal.load_state_dict(state)
        after = snapshot(cal)
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) and before[2:] == after[2:]
    with pytest.raises(TypeError, match="state: expected a dict"):
        cal.load_state_dict([1])


@pytest.mark.parametrize("temperature", [1.2e-38, 3.4e38])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_temperatures_at_the_ends_of_the_range_work(temperature, backend):
    """float32's normal range is accepted: one-hot soft labels at one end, uniform at the other."""
    labels = fastcal.calibrate(Z, temperature=temperature, backend=backend)
    assert labels.shape == (2, 5, 5) and bool(((labels >= 0) & (labels < 4)).all())
    S, W = fastcal.prototype_stats(Z, temperature=temperature, backend=backend)
    assert torch.isfinite(S).all() and torch.isclose(W.sum(), torch.tensor(50.0 if temperature < 1 else 50 / 4,
                                                                           dtype=torch.float64))


# ----- gaps an adversarial pass found --------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_logits_of_a_dtype_outside_the_contract(dtype):
    z = torch.randn(1, 4, 3, 3).to(dtype)
    for call in (fastcal.calibrate, fastcal.prototype_stats, lambda z: fastcal.predict(z, torch.eye(4)),
                 fastcal.LabelCalibrator(4).update):
        with pytest.raises(TypeError, match="logits: expected a floating dtype .*float64"):
            call(z)


def test_meta_logits_get_the_device_error():
    z = torch.randn(1, 4, 3, 3, device="meta")
    for call in (fastcal.calibrate, fastcal.prototype_stats, lambda z: fastcal.predict(z, torch.eye(4)),
                 fastcal.LabelCalibrator(4).update, fastcal.LabelCalibrator(4).predict):
        with pytest.raises(ValueError, match="logits: on the meta device"):
            call(z)


@pytest.mark.parametrize("temperature", [10**400, -(10**400)])
def test_a_temperature_beyond_float_range(temperature):
    """Finite, so never taken as the limit ``math.inf``."""
    with pytest.raises(ValueError, match="temperature: expected a positive number"):
        fastcal.calibrate(Z, temperature=temperature)
    with pytest.raises(ValueError, match="temperature: expected a positive number"):
        fastcal.LabelCalibrator(4, temperature=temperature)


def test_calibrate_with_prototypes_checks_every_argument():
    P = torch.eye(4)
    with pytest.raises(TypeError, match="deterministic"):
        fastcal.calibrate(Z, P, deterministic="x")
    with pytest.raises(ValueError, match="valid: masks pixels out of the statistics"):
        fastcal.calibrate(Z, P, valid=torch.ones(2, 5, 5, dtype=torch.bool))
    assert torch.equal(fastcal.calibrate(Z, P), fastcal.predict(Z, P))


SPARSE_AND_NESTED = [
    ("logits sparse", lambda: fastcal.calibrate(Z.to_sparse()), "logits"),
    ("logits nested", lambda: fastcal.calibrate(torch.nested.nested_tensor([Z[0], Z[1]])), "logits"),
    ("valid sparse", lambda: fastcal.calibrate(Z, valid=torch.ones(2, 5, 5, dtype=torch.bool).to_sparse()), "valid"),
    ("prototypes sparse", lambda: fastcal.predict(Z, torch.eye(4).to_sparse()), "prototypes"),
    ("S sparse", lambda: fastcal.prototypes_from_stats(torch.eye(4, dtype=torch.float64).to_sparse(),
                                                       torch.ones(4, dtype=torch.float64)), "S"),
    ("update sparse", lambda: fitted().update(Z.to_sparse()), "logits"),
    ("calibrator predict nested", lambda: fitted().predict(torch.nested.nested_tensor([Z[0]])), "logits"),
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # nested tensors are a prototype feature of PyTorch
@pytest.mark.parametrize("name,call,argument", SPARSE_AND_NESTED, ids=[c[0] for c in SPARSE_AND_NESTED])
def test_sparse_and_nested_tensors_are_refused_by_name(name, call, argument):
    with pytest.raises(TypeError, match=f"^{argument}: expected a dense tensor"):
        call()


def test_prototypes_that_would_overflow_are_refused():
    """S[k] / W[k] beyond float32 (a weight of 1e-300), or prototypes so large that the float32
    distances overflow and every class ties: ValueError, where every backend used to pick class 0."""
    S = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"S, W: a prototype S\[k\] / W\[k\] is not finite"):
        fastcal.prototypes_from_stats(S, torch.tensor([1e-300, 1.0, 1.0, 0.0], dtype=torch.float64))
    for backend in ("reference", "torch", "torch-ops"):
        with pytest.raises(ValueError, match="prototypes: entries must be at most"):
            fastcal.predict(Z, torch.eye(4) * 1e19, backend=backend)
    P = torch.eye(4) * 2.0**40  # the bound itself is accepted, and predicts as the oracle does
    assert fastcal.predict(Z, P).shape == (2, 5, 5)
