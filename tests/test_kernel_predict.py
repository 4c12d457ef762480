"""The Triton predict kernel (interpreter) against the float64 NumPy oracle."""
import pytest
import torch

import fastcal

import oracle
from cases import DTYPES, KERNEL_DEVICE, LAYOUTS, make_logits

SHAPES = [(2, 2, 13, 11), (1, 3, 7, 9), (2, 19, 17, 23), (1, 19, 3, 4, 5), (37, 19), (1, 150, 5, 7), (5, 1024)]


def fitted_prototypes(z, empty="onehot"):
    S, W = fastcal.prototype_stats(z, backend="torch")
    return fastcal.prototypes_from_stats(S, W, empty=empty)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_labels_match_oracle(shape, dtype):
    z = make_logits(shape, dtype, device=KERNEL_DEVICE)
    P = fitted_prototypes(z)
    labels = fastcal.predict(z, P, backend="triton")
    assert labels.dtype == torch.int64
    oracle.assert_labels_match(labels, z, P)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("num_classes", [19, 150])
def test_any_strides(layout, num_classes):
    z = make_logits((2, num_classes, 9, 10), layout=layout, device=KERNEL_DEVICE)
    P = fitted_prototypes(z)
    oracle.assert_labels_match(fastcal.predict(z, P, temperature=1.3, backend="triton"), z, P, 1.3)


@pytest.mark.parametrize("num_classes", [6, 150])
def test_skip_policy_never_predicts_empty_classes(num_classes):
    z = make_logits((2, num_classes, 8, 8), device=KERNEL_DEVICE)
    z[:, 1] -= 100.0
    P = fitted_prototypes(z, empty="skip")
    assert torch.isnan(P[1]).all()
    labels = fastcal.predict(z, P, backend="triton")
    assert not (labels == 1).any()
    oracle.assert_labels_match(labels, z, P)


@pytest.mark.parametrize("num_classes", [4, 70])
def test_distance_ties_take_the_lowest_class(num_classes):
    z = make_logits((1, num_classes, 4, 4), device=KERNEL_DEVICE)
    P = torch.full((num_classes, num_classes), 1.0 / num_classes, device=KERNEL_DEVICE)  # every distance equal
    assert (fastcal.predict(z, P, backend="triton") == 0).all()
    P[num_classes - 1] = 0.0
    P[num_classes - 1, 0] = 1.0
    P[0] = P[num_classes - 1]  # class 0 and the last class tie, across blocks for C = 70
    expected = fastcal.predict(z, P, backend="reference")
    assert torch.equal(fastcal.predict(z, P, backend="triton"), expected)


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.uint8])
def test_label_dtypes(label_dtype):
    z = make_logits((2, 19, 9, 7), device=KERNEL_DEVICE)
    P = fitted_prototypes(z)
    labels = fastcal.predict(z, P, backend="triton", label_dtype=label_dtype)
    assert labels.dtype == label_dtype
    assert torch.equal(labels.long(), fastcal.predict(z, P, backend="triton"))


@pytest.mark.parametrize("num_classes", [19, 150])
def test_calibrate_end_to_end_matches_reference(num_classes):
    z = make_logits((2, num_classes, 12, 10), torch.float16, device=KERNEL_DEVICE)
    valid = torch.rand(2, 12, 10, device=KERNEL_DEVICE) > 0.25
    labels = fastcal.calibrate(z, valid=valid, backend="triton")
    S, W = fastcal.prototype_stats(z, valid=valid, backend="reference")
    oracle.assert_labels_match(labels, z, fastcal.prototypes_from_stats(S, W))


def test_cpu_tensor_without_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend: 'triton' needs CUDA tensors.*backend='torch'"):
        fastcal.calibrate(torch.randn(1, 3, 4, 4), backend="triton")
