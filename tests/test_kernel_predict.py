"""The Triton predict kernel (interpreter) against the float64 NumPy oracle."""
import pytest
import torch

import fastcal
from fastcal._operands import DistanceOperands
from fastcal.kernels.configs import TARGETS

import oracle
from cases import DTYPES, KERNEL_DEVICE, LAYOUTS, exact_tie_prototypes, make_logits

SHAPES = [(2, 2, 13, 11), (1, 3, 7, 9), (2, 19, 17, 23), (1, 19, 3, 4, 5), (37, 19), (1, 150, 5, 7), (5, 300)]


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


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("num_classes", [6, 150])
def test_minus_inf_logits_have_probability_zero(num_classes, temperature):
    """A class masked out with -inf, and finite logits whose differences overflow float32."""
    z = make_logits((2, num_classes, 6, 7), device=KERNEL_DEVICE)
    P = fitted_prototypes(z)
    z[:, 0] = float("-inf")
    z[1, 3, :2] = float("-inf")
    z[0, 1, 0] = 3e38
    z[0, 2, 0] = -3e38
    oracle.assert_labels_match(fastcal.predict(z, P, temperature=temperature, backend="triton"), z, P, temperature)


@pytest.mark.parametrize("num_classes", [6, 150])
def test_skip_policy_never_predicts_empty_classes(num_classes):
    z = make_logits((2, num_classes, 8, 8), device=KERNEL_DEVICE)
    z[:, 1] -= 100.0
    P = fitted_prototypes(z, empty="skip")
    assert torch.isnan(P[1]).all()
    labels = fastcal.predict(z, P, backend="triton")
    assert not (labels == 1).any()
    oracle.assert_labels_match(labels, z, P)


@pytest.mark.parametrize("num_classes", [4, 128])
def test_distance_ties_take_the_lowest_class(num_classes):
    """Exact ties (see ``cases.exact_tie_prototypes``), across class blocks for C = 128."""
    z = torch.zeros(1, num_classes, 4, 4, device=KERNEL_DEVICE)
    every = exact_tie_prototypes(num_classes, range(num_classes), KERNEL_DEVICE)
    assert (fastcal.predict(z, every, backend="triton") == 0).all()
    for nearest in [(0, num_classes - 1), (1, num_classes - 2), (num_classes - 1,)]:
        P = exact_tie_prototypes(num_classes, nearest, KERNEL_DEVICE)
        assert (fastcal.predict(z, P, backend="triton") == nearest[0]).all()


def test_near_ties_follow_the_oracle():
    """Prototypes a hair apart: the label is the oracle's wherever float32 can resolve it."""
    z = make_logits((2, 70, 6, 6), device=KERNEL_DEVICE)
    P = fitted_prototypes(z)
    P[69] = P[0] + 1e-6 * torch.randn(70, device=KERNEL_DEVICE).abs()
    P[35] = P[0] * (1 + 1e-7)
    oracle.assert_labels_match(fastcal.predict(z, P, backend="triton"), z, P)


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
    with pytest.raises(ValueError, match="backend='triton': the Triton kernels take CUDA tensors.*'torch'"):
        fastcal.calibrate(torch.randn(1, 3, 4, 4), backend="triton")


@pytest.mark.parametrize("scores", [False, True])
@pytest.mark.parametrize("num_classes", [19, 150])
def test_launch_reads_no_value_back(num_classes, scores):
    """Everything predict does before its kernel runs works on meta tensors, which have no values:
    nothing reads a value back to the host (on CUDA a synchronisation, which a CUDA graph being
    captured cannot contain)."""
    from fastcal.kernels import predict

    z = torch.empty(2, num_classes, 64, 64, device="meta")
    P = torch.empty(num_classes, num_classes, device="meta")
    launch, out = predict.predict_launch(z, DistanceOperands(P), 1.0, programs=8, scores=scores)
    assert out.device.type == "meta"
    assert out.shape == ((2, num_classes, 64, 64) if scores else (2, 64, 64))


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("num_classes", [19, 150])
def test_every_targets_configuration_matches_oracle(target, num_classes):
    """Each target's table (its blocks, warps and dot precision: 3xTF32 on NVIDIA, float32 on AMD)
    gives the oracle's labels, near-ties within the contract's bound."""
    from fastcal.kernels import predict

    z = make_logits((2, num_classes, 9, 16), device=KERNEL_DEVICE)
    P = fitted_prototypes(z)
    launch, labels = predict.predict_launch(z, DistanceOperands(P), 1.0, target=target)
    assert launch.constexprs["DOT_PRECISION"] == TARGETS[target].distance_precision
    launch()
    oracle.assert_labels_match(labels, z, P)
