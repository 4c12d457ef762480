"""The pixel count per argmax class that the stats pass keeps beside the sums (for diagnostics)."""
import pytest
import torch

from fastcal import api

import oracle
from cases import device_of, make_logits


def expected_counts(z, valid=None):
    cls = torch.from_numpy(oracle.pixels_by_class(z).argmax(axis=1))
    keep = torch.ones_like(cls, dtype=torch.bool) if valid is None else valid.cpu().reshape(-1)
    return torch.bincount(cls[keep], minlength=z.shape[1]).double()


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("shape", [(2, 19, 64, 65), (1, 150, 6, 7), (40, 3)], ids=str)
def test_counts_are_exact(backend, shape, deterministic):
    z = make_logits(shape, device=device_of(backend))
    valid = torch.rand(shape[0], *shape[2:], device=z.device) > 0.2
    z[~valid.unsqueeze(1).expand_as(z)] = float("nan")  # left out, not counted
    _, W, N = api.stats_and_counts(z, valid=valid, backend=backend, deterministic=deterministic,
                                   confidence_power=0.0)
    torch.testing.assert_close(N.cpu(), expected_counts(z, valid), rtol=0, atol=0)
    torch.testing.assert_close(W.cpu(), N.cpu(), rtol=0, atol=0)  # power 0: every pixel weighs 1


def test_counts_of_the_upsampled_pixels(backend):
    z = make_logits((2, 5, 7, 9), device=device_of(backend))
    _, _, N = api.stats_and_counts(z, backend=backend, size=(20, 30))
    up = oracle.interpolate(z, size=(20, 30))
    top_two = torch.from_numpy(oracle.pixels_by_class(up)).topk(2, dim=1).values
    near_ties = int((top_two[:, 0] - top_two[:, 1] <= 1e-5 * float(up.abs().max())).sum())
    assert N.sum() == 2 * 20 * 30
    # the float32 interpolation may move the argmax of a pixel whose two best logits nearly tie
    assert (N.cpu() - expected_counts(up)).abs().sum() <= 2 * near_ties
