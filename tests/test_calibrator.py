"""LabelCalibrator: accumulation across batches, precision, and the prototypes it yields."""
import numpy as np
import pytest
import torch

import fastcal

import oracle
from cases import make_logits


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_k_batches_equal_one_call(backend):
    z = make_logits((6, 7, 10, 12))
    valid = torch.rand(6, 10, 12) > 0.2
    whole = fastcal.LabelCalibrator(7, backend=backend).update(z, valid)
    parts = fastcal.LabelCalibrator(7, backend=backend)
    for i in range(0, 6, 2):
        parts.update(z[i:i + 2], valid[i:i + 2])
    # sums inside one call run in float32, so batching may move them by float32 rounding
    torch.testing.assert_close(parts.S, whole.S, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(parts.W, whole.W, rtol=2e-6, atol=1e-6)
    assert parts.num_pixels == whole.num_pixels == int(valid.sum())
    oracle.assert_stats_close(parts.S, parts.W, *oracle.stats(z, 1.0, valid))
    assert torch.equal(parts.predict(z), whole.predict(z))


def test_prototypes_and_predict_match_functional_api():
    z = make_logits((2, 5, 9, 9))
    cal = fastcal.LabelCalibrator(5, temperature=1.7).update(z)
    S, W = fastcal.prototype_stats(z, temperature=1.7)
    assert torch.equal(cal.prototypes, fastcal.prototypes_from_stats(S, W))
    assert torch.equal(cal.predict(z), fastcal.calibrate(z, temperature=1.7))


def test_long_run_keeps_float64_precision(monkeypatch):
    """10^4 identical updates sum to exactly 10^4 times one update's sums, to float64 rounding;
    a float32 accumulator would already be off by about 1e-4 relative."""
    z = make_logits((1, 4, 8, 8))
    one = fastcal.LabelCalibrator(4, backend="torch").update(z)
    S, W = fastcal.prototype_stats(z, backend="torch")
    monkeypatch.setattr(fastcal.api, "prototype_stats", lambda *args, **kwargs: (S, W))  # no softmax rerun
    many = fastcal.LabelCalibrator(4, backend="torch")
    for _ in range(10_000):
        many.update(z)
    np.testing.assert_allclose(many.W.numpy(), 10_000 * one.W.numpy(), rtol=1e-12)
    np.testing.assert_allclose(many.S.numpy(), 10_000 * one.S.numpy(), rtol=1e-12)
    assert many.S.dtype == torch.float64


def test_missing_classes_and_reset():
    z = make_logits((1, 5, 6, 6))
    z[:, 3] -= 50.0
    cal = fastcal.LabelCalibrator(5, empty="skip").update(z)
    assert cal.missing_classes == [3]
    assert torch.isnan(cal.prototypes[3]).all()
    assert not (cal.predict(z) == 3).any()
    cal.reset()
    assert cal.missing_classes == [0, 1, 2, 3, 4] and cal.num_updates == 0


def test_unfitted_onehot_calibrator_predicts_argmax():
    z = make_logits((2, 6, 7, 7))
    assert torch.equal(fastcal.LabelCalibrator(6).predict(z), z.argmax(dim=1))


def test_state_dict_round_trip_and_resume(tmp_path):
    batches = [make_logits((2, 5, 6, 6)) for _ in range(4)]
    straight = fastcal.LabelCalibrator(5)
    for b in batches:
        straight.update(b)
    first = fastcal.LabelCalibrator(5)
    for b in batches[:2]:
        first.update(b)
    first.save(tmp_path / "cal.pt")
    state = torch.load(tmp_path / "cal.pt", weights_only=True)
    assert state["version"] == 3 and state["S"].dtype == torch.float64
    resumed = fastcal.LabelCalibrator(5).load(tmp_path / "cal.pt")
    for b in batches[2:]:
        resumed.update(b)
    assert torch.equal(resumed.prototypes, straight.prototypes)
    assert resumed.num_updates == 4


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_logits_that_carry_grad_are_fine(backend):
    net = torch.nn.Conv2d(3, 4, 1)
    logits = net(torch.randn(2, 3, 6, 6))
    assert logits.requires_grad
    cal = fastcal.LabelCalibrator(4, backend=backend).update(logits)
    assert not cal.S.requires_grad and not cal.prototypes.requires_grad
    labels = cal.predict(logits)
    assert torch.equal(labels, fastcal.calibrate(logits.detach(), cal.prototypes, backend=backend))


def test_prototypes_are_built_once_per_state_of_the_sums(monkeypatch):
    from fastcal import reference

    built = []
    original = reference.prototypes_from_stats
    monkeypatch.setattr(reference, "prototypes_from_stats", lambda *a, **k: built.append(1) or original(*a, **k))
    z = torch.randn(2, 5, 8, 8) * 3
    cal = fastcal.LabelCalibrator(5).update(z)
    first = cal.predict(z)
    assert torch.equal(cal.predict(z), first) and len(built) == 1  # the second call reuses them
    P = cal.prototypes
    P.fill_(0.0)  # a caller's copy: the calibrator's own stay as they were
    assert torch.equal(cal.predict(z), first) and len(built) == 1
    cal.update(z[:1] * 2)
    fresh = original(cal.S, cal.W, "onehot")
    assert torch.equal(cal.prototypes, fresh) and len(built) == 2  # an update invalidates them
    cal.empty = "skip"
    assert cal.prototypes.shape == (5, 5)  # reading the property builds them
    assert len(built) == 3  # so does another empty policy
    cal.empty = "onehot"
    state = cal.state_dict()
    cal.reset()
    assert torch.equal(cal.prototypes, torch.eye(5))  # nothing left of the sums after reset
    cal.load_state_dict(state)
    assert torch.equal(cal.prototypes, fresh)


def test_concurrent_updates_lose_no_batch():
    """Four threads updating one calibrator: every batch lands whole, and S, W, the counts and the
    counters describe the same batches as one thread adding them all."""
    import threading

    batches = [torch.randn(1, 4, 2, 2) * 3 for _ in range(200)]
    serial = fastcal.LabelCalibrator(4, backend="torch")
    for z in batches:
        serial.update(z)
    shared = fastcal.LabelCalibrator(4, backend="torch")
    start = threading.Barrier(4)

    def work(part):
        start.wait()
        for z in batches[part::4]:
            shared.update(z)
            shared.predict(z)

    threads = [threading.Thread(target=work, args=(part,)) for part in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert shared.num_updates == 200 and shared.num_pixels == 800
    assert float(shared.counts.sum()) == 800
    torch.testing.assert_close(shared.S, serial.S, rtol=1e-12, atol=1e-12)  # the order of the adds differs
    torch.testing.assert_close(shared.W, serial.W, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shared.S.sum(dim=1), shared.W, rtol=1e-5, atol=0)  # each row of p sums to 1


def test_a_calibrator_copies_and_pickles_with_its_lock():
    import copy
    import pickle

    cal = fastcal.LabelCalibrator(4, backend="torch").update(torch.randn(1, 4, 3, 3))
    for twin in (copy.deepcopy(cal), pickle.loads(pickle.dumps(cal))):
        assert torch.equal(twin.S, cal.S) and twin._lock is not cal._lock
        twin.update(torch.randn(1, 4, 3, 3))
        assert twin.num_updates == 2 and cal.num_updates == 1


def test_predicting_without_statistics_warns_once_that_it_is_the_argmax():
    import warnings

    z = make_logits((1, 4, 5, 6))
    cal = fastcal.LabelCalibrator(4)
    with pytest.warns(RuntimeWarning, match="labels are the argmax"):
        labels = cal.predict(z)
    assert torch.equal(labels, z.argmax(dim=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cal.predict(z)  # once per calibrator
        fastcal.LabelCalibrator(4).update(z).predict(z)  # a fitted one never warns
