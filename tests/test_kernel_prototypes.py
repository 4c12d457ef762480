"""The operands kernel between the passes of calibrate (kernels/prototypes.py) against the reference
prototypes and their centring (fastcal._operands.centred_prototypes)."""
import pytest
import torch

from fastcal import reference
from fastcal._operands import centred_prototypes
from fastcal.kernels import prototypes
from fastcal.kernels.predict import predict_config

from cases import KERNEL_DEVICE, make_logits


def sums_with_empty_classes(num_classes: int, empty: tuple):
    """Sums of random logits (float64, as the stats pass leaves them), the classes ``empty`` emptied."""
    import fastcal

    S, W = fastcal.prototype_stats(make_logits((2, num_classes, 9, 11)), backend="reference")
    S[list(empty)], W[list(empty)] = 0.0, 0.0
    return S.to(KERNEL_DEVICE), W.to(KERNEL_DEVICE)


@pytest.mark.parametrize("num_classes", [2, 5, 19, 33, 64])
@pytest.mark.parametrize("empty", ["onehot", "skip"])
def test_operands_match_the_reference(num_classes, empty):
    S, W = sums_with_empty_classes(num_classes, (0, num_classes - 1) if num_classes > 2 else (1,))
    c_block = predict_config(num_classes)["C_BLOCK"]
    P, A, centre, bias = prototypes.operands(S, W, empty == "skip", c_block)
    expected = reference.prototypes_from_stats(S, W, empty)
    assert torch.equal(P.isnan(), expected.isnan())
    assert torch.equal(P.nan_to_num(), expected.nan_to_num())  # the same float64 division, rounded once
    A_ref, centre_ref, bias_ref = centred_prototypes(expected)
    C = num_classes
    # the mean's float64 sum may run in another order: at most an ulp of float32 apart
    torch.testing.assert_close(centre[:C], centre_ref, rtol=2**-23, atol=2**-30)
    torch.testing.assert_close(A[:C, :C], A_ref, rtol=2**-22, atol=2**-28)
    torch.testing.assert_close(bias[:C], bias_ref, rtol=2**-21, atol=2**-40)
    assert (A.shape, centre.shape, bias.shape) == ((c_block, c_block), (c_block,), (c_block,))
    assert not A[C:].any() and not A[:, C:].any() and not centre[C:].any() and bool((bias[C:] == float("inf")).all())


def test_no_class_left_with_skip_gives_no_nan_in_the_operands():
    S, W = sums_with_empty_classes(4, (0, 1, 2, 3))
    P, A, centre, bias = prototypes.operands(S, W, True, 16)
    assert bool(P.isnan().all()) and not A.any() and not centre.any() and bool((bias == float("inf")).all())


@pytest.mark.parametrize("num_classes", [3, 19, 64, 65])
def test_caller_prototypes_are_prepared_on_the_device_as_the_reference_prepares_them(num_classes):
    """A GPU prepares a caller's prototypes on every call (nothing read back, never stale): one
    launch of the operands kernel with S = P, W = 1, a NaN row an empty class skipped."""
    from fastcal import _triton
    from fastcal._operands import DistanceOperands

    P = torch.softmax(torch.randn(num_classes, num_classes) * 3, dim=1)
    P[1] = float("nan")  # a class never predicted
    P = P.to(KERNEL_DEVICE)
    got, want = _triton.prototype_operands(P), DistanceOperands(P)
    assert torch.equal(got.prototypes.isnan(), P.isnan())
    assert torch.equal(got.prototypes.nan_to_num(), P.nan_to_num())
    c_block = predict_config(num_classes)["C_BLOCK"]
    (A, centre, bias), (A_ref, centre_ref, bias_ref) = got.padded(c_block), want.padded(c_block)
    torch.testing.assert_close(centre, centre_ref, rtol=2**-23, atol=2**-30)
    torch.testing.assert_close(A, A_ref, rtol=2**-22, atol=2**-28)
    assert torch.equal(torch.isinf(bias), torch.isinf(bias_ref))
    finite = torch.isfinite(bias_ref)
    torch.testing.assert_close(bias[finite], bias_ref[finite], rtol=2**-21, atol=2**-40)
