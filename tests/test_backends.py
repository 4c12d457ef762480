"""The reference and the PyTorch fast path against the independent float64 NumPy oracle."""
import numpy as np
import pytest
import torch

import fastcal
from fastcal import _chunks, _operands, numba_backend, torch_ops

import oracle
from cases import DTYPES, LAYOUTS, SHAPES, exact_tie_prototypes, make_logits


@pytest.fixture(params=["reference", "torch", "torch-ops"])
def backend(request):
    """The CPU backends: "torch" (the fused loops up to 256 classes) and "torch-ops" (the PyTorch
    operations it falls back to)."""
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_stats_and_labels_match_oracle(backend, dtype, shape):
    z = make_logits(shape, dtype)
    S, W = fastcal.prototype_stats(z, backend=backend)
    S_ref, W_ref = oracle.stats(z)
    oracle.assert_stats_close(S, W, S_ref, W_ref)
    P = fastcal.prototypes_from_stats(S, W)
    np.testing.assert_allclose(P.double().numpy(), oracle.prototypes(S_ref, W_ref), rtol=1e-5, atol=1e-6)
    oracle.assert_labels_match(fastcal.predict(z, P, backend=backend), z, P)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("num_classes", [6, 300])
def test_minus_inf_logits_have_probability_zero(backend, num_classes, temperature):
    """A class masked out with -inf has probability 0, as the softmax gives, and finite logits
    whose differences overflow float32 keep their labels."""
    z = make_logits((2, num_classes, 6, 7))
    P = fastcal.prototypes_from_stats(*fastcal.prototype_stats(z))
    z[:, 0] = float("-inf")
    z[1, 3, :2] = float("-inf")
    z[0, 1, 0] = 3e38
    z[0, 2, 0] = -3e38
    oracle.assert_labels_match(fastcal.predict(z, P, temperature=temperature, backend=backend), z, P, temperature)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_strides(backend, layout):
    z = make_logits((2, 6, 11, 13), layout=layout)
    assert layout == "contiguous" or not z.is_contiguous()
    S, W = fastcal.prototype_stats(z, backend=backend)
    oracle.assert_stats_close(S, W, *oracle.stats(z))
    P = fastcal.prototypes_from_stats(S, W)
    oracle.assert_labels_match(fastcal.predict(z, P, backend=backend), z, P)


def test_temperature_and_mask(backend):
    z = make_logits((2, 7, 12, 10))
    valid = torch.rand(2, 12, 10) > 0.3
    z[~valid.unsqueeze(1).expand_as(z)] = float("nan")  # garbage under the mask must not leak
    S, W = fastcal.prototype_stats(z, temperature=2.5, valid=valid, backend=backend)
    oracle.assert_stats_close(S, W, *oracle.stats(z, 2.5, valid))
    assert torch.isfinite(S).all()


@pytest.mark.parametrize("empty", ["onehot", "skip"])
def test_empty_classes(backend, empty):
    z = make_logits((2, 6, 9, 9))
    z[:, 4:] -= 100.0  # classes 4 and 5 are never the argmax
    S, W = fastcal.prototype_stats(z, backend=backend)
    assert W[4] == 0 and W[5] == 0
    P = fastcal.prototypes_from_stats(S, W, empty=empty)
    S_ref, W_ref = oracle.stats(z)
    np.testing.assert_allclose(P.double().numpy(), oracle.prototypes(S_ref, W_ref, empty), rtol=1e-5, atol=1e-6)
    labels = fastcal.predict(z, P, backend=backend)
    oracle.assert_labels_match(labels, z, P)
    if empty == "skip":
        assert not ((labels == 4) | (labels == 5)).any()


def test_argmax_ties_take_the_lowest_class(backend):
    z = torch.zeros(1, 4, 3, 3)
    z[:, 1] = 2.0
    z[:, 3] = 2.0  # argmax ties between 1 and 3
    S, W = fastcal.prototype_stats(z, backend=backend)
    assert W[1] > 0 and W[3] == 0


@pytest.mark.parametrize("num_classes", [4, 128])
def test_distance_ties_take_the_lowest_class(backend, num_classes):
    """Exact ties (see ``cases.exact_tie_prototypes``), whatever the GEMM's summation order."""
    z = torch.zeros(1, num_classes, 4, 4)
    every = exact_tie_prototypes(num_classes, range(num_classes))
    assert (fastcal.predict(z, every, backend=backend) == 0).all()
    for nearest in [(0, num_classes - 1), (1, num_classes - 2), (num_classes - 1,)]:
        P = exact_tie_prototypes(num_classes, nearest)
        assert (fastcal.predict(z, P, backend=backend) == nearest[0]).all()


def test_torch_path_chunks_cover_every_pixel(monkeypatch):
    monkeypatch.setattr(_chunks, "CHUNK_ELEMENTS", 64)
    for shape, layout in [((3, 5, 7, 9), "contiguous"), ((2, 4, 3, 5, 6), "sliced"), ((50, 8), "contiguous")]:
        z = make_logits(shape, layout=layout)
        S, W = fastcal.prototype_stats(z, backend="torch")
        oracle.assert_stats_close(S, W, *oracle.stats(z))
        P = fastcal.prototypes_from_stats(S, W)
        oracle.assert_labels_match(fastcal.predict(z, P, backend="torch"), z, P)


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.uint8])
def test_calibrate_equals_stats_then_predict(backend, label_dtype):
    z = make_logits((2, 5, 8, 8))
    labels = fastcal.calibrate(z, backend=backend, label_dtype=label_dtype)
    assert labels.dtype == label_dtype
    S, W = fastcal.prototype_stats(z, backend=backend)
    expected = fastcal.predict(z, fastcal.prototypes_from_stats(S, W), backend=backend)
    assert torch.equal(labels.long(), expected)


def test_torch_path_matches_reference_labels_exactly_on_big_margins():
    z = make_logits((1, 19, 64, 64), scale=6.0)
    assert torch.equal(fastcal.calibrate(z, backend="torch"), fastcal.calibrate(z, backend="reference"))


@pytest.mark.parametrize("dtype, with_mask", [(torch.float32, False), (torch.float32, True),
                                              (torch.float16, True), (torch.bfloat16, False)])
def test_fused_loops_read_nchw_in_place(monkeypatch, dtype, with_mask):
    monkeypatch.setattr(_chunks, "CHUNK_ELEMENTS", 19 * 1000)  # several pieces an image
    monkeypatch.setattr(torch_ops, "_chunks", None)  # the chunk copies must not be used
    z = make_logits((2, 19, 64, 80), dtype)
    assert 64 * 80 >= numba_backend.DIRECT_MIN_PIXELS and numba_backend.can_run(z)
    valid = torch.rand(2, 64, 80) > 0.2 if with_mask else None
    S, W = fastcal.prototype_stats(z, temperature=1.7, valid=valid, backend="torch")
    oracle.assert_stats_close(S, W, *oracle.stats(z, 1.7, valid))
    P = fastcal.prototypes_from_stats(S, W)
    oracle.assert_labels_match(fastcal.predict(z, P, temperature=1.7, backend="torch"), z, P, 1.7)


# ----- prototypes changed behind PyTorch's back --------------------------------------------------
WRITES = {
    "numpy": lambda P, new: P.numpy().__setitem__(slice(None), new.numpy()),
    ".data": lambda P, new: P.data.copy_(new),
    "dlpack": lambda P, new: torch.from_dlpack(P.__dlpack__()).copy_(new),
    "storage": lambda P, new: torch.tensor([], dtype=P.dtype).set_(P.untyped_storage()).view(P.shape).copy_(new),
    "in place": lambda P, new: P.copy_(new),
}


@pytest.mark.parametrize("output", ["labels", "scores"])
@pytest.mark.parametrize("write", list(WRITES))
def test_prototypes_written_behind_pytorchs_back_are_never_stale(backend, write, output):
    """Labels and scores follow the prototypes' current values whatever wrote them, and values
    written so are checked as any others."""
    z = make_logits((2, 5, 9, 7))
    P = torch.eye(5)
    before = fastcal.predict(z, P, backend=backend, output=output)
    rolled = torch.roll(torch.eye(5), 1, 0)
    WRITES[write](P, rolled)
    after = fastcal.predict(z, P, backend=backend, output=output)
    assert torch.equal(after, fastcal.predict(z, rolled.clone(), backend=backend, output=output))
    assert not torch.equal(after, before)
    broken = rolled.clone()
    broken[0, 0] = float("inf")
    WRITES[write](P, broken)
    with pytest.raises(ValueError, match="finite"):
        fastcal.predict(z, P, backend=backend, output=output)
    with pytest.raises(ValueError, match="finite"):
        fastcal.calibrate(z, P, backend=backend, output=output)


def test_prototypes_retyped_in_place_are_never_stale(backend):
    """The same bits in another dtype are other values: ``.data`` can retype a tensor in place."""
    z = make_logits((2, 8, 4, 8))
    P = torch.softmax(torch.randn(8, 8) * 3, dim=1).half()
    fastcal.predict(z, P, backend=backend)
    P.data = P.data.view(torch.bfloat16)
    assert P.dtype == torch.bfloat16
    assert torch.equal(fastcal.predict(z, P, backend=backend),
                       fastcal.predict(z, P.detach().clone(), backend="reference"))


def test_unchanged_prototypes_are_prepared_once(monkeypatch):
    """The reuse the cache exists for: the same unmodified tensor is checked once."""
    z = make_logits((1, 5, 4, 4))
    P = torch.eye(5)
    calls = []
    real = _operands.DistanceOperands
    monkeypatch.setattr(_operands, "DistanceOperands", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for _ in range(3):
        fastcal.predict(z, P)
    assert len(calls) == 1
    P.numpy()[0, 1] = 0.5
    fastcal.predict(z, P)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_prototypes_of_every_floating_dtype(backend, dtype):
    z = make_logits((2, 5, 6, 6))
    P = torch.softmax(torch.randn(5, 5) * 3, dim=1).to(dtype)
    assert torch.equal(fastcal.predict(z, P, backend=backend), fastcal.predict(z, P.float(), backend="reference"))


def test_the_cpu_backends_prepare_once_per_plan_and_forget_with_it(monkeypatch):
    """The fused loops' walks and the upsampling's row tables are kept beside the plan (which is
    immutable), built on its first call, and dropped when the plan leaves the cache."""
    import gc

    from fastcal import _plan, _prepared

    z = make_logits((1, 5, 16, 16))
    P = fastcal.prototypes_from_stats(*fastcal.prototype_stats(z))
    made = []
    walk = numba_backend._Walk
    monkeypatch.setattr(numba_backend, "_Walk", lambda *a, **k: made.append(1) or walk(*a, **k))
    first = fastcal.predict(z, P, backend="numba")
    for _ in range(3):
        assert torch.equal(fastcal.predict(z, P, backend="numba"), first)
        fastcal.predict(z, P, backend="torch-ops", size=(20, 24))
    assert len(made) == 1
    keys = {key for built in _prepared._prepared.values() for key in built}
    assert ("walk", "predict") in keys and "torch-ops rows" in keys
    _plan._cache.clear()
    gc.collect()
    assert len(_prepared._prepared) == 0
