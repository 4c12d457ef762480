"""``output="scores"``: ``-||p - P[k]||^2`` per class from every backend, against the float64 oracle."""
import numpy as np
import pytest
import torch

import fastcal

import oracle
from cases import DTYPES, LAYOUTS, device_of, make_logits

SHAPES = [(2, 2, 13, 11), (2, 19, 17, 23), (1, 3, 4, 5, 6), (37, 19), (1, 150, 5, 7), (3, 300)]


def fitted(z, empty="onehot"):
    S, W = fastcal.prototype_stats(z.cpu(), backend="reference")
    return fastcal.prototypes_from_stats(S, W, empty=empty).to(z.device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_scores_match_oracle(backend, shape, dtype):
    z = make_logits(shape, dtype, device=device_of(backend))
    P = fitted(z)
    scores = fastcal.predict(z, P, backend=backend, output="scores")
    oracle.assert_scores_close(scores, z, P)
    assert scores.is_contiguous()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_any_strides(backend, layout):
    z = make_logits((2, 7, 64, 65), layout=layout, device=device_of(backend))
    P = fitted(z)
    oracle.assert_scores_close(fastcal.predict(z, P, temperature=0.7, backend=backend, output="scores"), z, P, 0.7)


def test_argmax_of_scores_is_the_label_on_clear_winners(backend):
    z = make_logits((2, 19, 64, 64), device=device_of(backend))
    P = fitted(z)
    from_scores = fastcal.predict(z, P, backend=backend, output="scores").argmax(1)
    labels = fastcal.predict(z, P, backend=backend)
    clear = oracle.clear_winners(z, P)
    np.testing.assert_array_equal(from_scores.cpu().numpy().reshape(-1)[clear], labels.cpu().numpy().reshape(-1)[clear])
    assert clear.mean() > 0.9


@pytest.mark.parametrize("num_classes", [6, 150])
def test_skipped_classes_score_minus_infinity(backend, num_classes):
    z = make_logits((2, num_classes, 8, 8), device=device_of(backend))
    z[:, 1] -= 100.0
    P = fitted(z, empty="skip")
    assert torch.isnan(P[1]).all()
    scores = fastcal.predict(z, P, backend=backend, output="scores")
    oracle.assert_scores_close(scores, z, P)
    assert (scores.argmax(1) != 1).all()


@pytest.mark.parametrize("align_corners", [False, True])
def test_upsampled_scores(backend, align_corners):
    z = make_logits((2, 5, 7, 9), device=device_of(backend))
    P = fitted(z)
    scores = fastcal.predict(z, P, backend=backend, output="scores", size=(30, 37), align_corners=align_corners)
    up = oracle.interpolate(z, size=(30, 37), align_corners=align_corners)
    oracle.assert_scores_close(scores, up, P, logit_error=1e-5 * float(up.abs().max()))


def test_calibrate_scores_use_the_batch_prototypes(backend):
    z = make_logits((2, 5, 16, 16), device=device_of(backend))
    valid = torch.rand(2, 16, 16, device=z.device) > 0.25
    scores = fastcal.calibrate(z, valid=valid, backend=backend, output="scores")
    S, W = oracle.stats(z, valid=valid)
    oracle.assert_scores_close(scores, z, oracle.prototypes(S, W))


def test_empty_batch_gives_empty_scores(backend):
    z = torch.zeros(0, 4, 3, 3, device=device_of(backend))
    scores = fastcal.predict(z, torch.eye(4, device=z.device), backend=backend, output="scores")
    assert scores.shape == (0, 4, 3, 3) and scores.dtype == torch.float32
    assert fastcal.calibrate(z, backend=backend, output="scores").shape == (0, 4, 3, 3)


def test_bad_output_is_rejected():
    with pytest.raises(ValueError, match="output"):
        fastcal.predict(torch.randn(1, 3, 2, 2), torch.eye(3), output="probabilities")
