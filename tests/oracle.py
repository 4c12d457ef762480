"""An independent float64 NumPy implementation of label calibration, and the
label comparison every backend test uses. It does not import fastcal."""
from __future__ import annotations

import numpy as np
import torch

NEAR_TIE = 1e-6


def pixels_by_class(logits: torch.Tensor) -> np.ndarray:
    """[M, C] float64: one row per pixel, in the C order of [N, *spatial]."""
    z = logits.detach().cpu().double().numpy()
    return np.moveaxis(z, 1, -1).reshape(-1, z.shape[1])


def soft_labels(z: np.ndarray, temperature: float = 1.0):
    shifted = (z - z.max(axis=1, keepdims=True)) / temperature
    e = np.exp(shifted)
    p = e / e.sum(axis=1, keepdims=True)
    return p, z.argmax(axis=1), p.max(axis=1)  # np.argmax takes the first maximum


def stats(logits: torch.Tensor, temperature: float = 1.0, valid: torch.Tensor | None = None):
    z = pixels_by_class(logits)
    C = z.shape[1]
    if valid is not None:
        z = z[valid.cpu().numpy().reshape(-1)]
    p, cls, conf = soft_labels(z, temperature)
    S, W = np.zeros((C, C)), np.zeros(C)
    np.add.at(S, cls, conf[:, None] * p)
    np.add.at(W, cls, conf)
    return S, W


def prototypes(S: np.ndarray, W: np.ndarray, empty: str = "onehot") -> np.ndarray:
    P = np.empty_like(S)
    for k in range(len(W)):
        if W[k] > 0:
            P[k] = S[k] / W[k]
        elif empty == "onehot":
            P[k] = np.eye(len(W))[k]
        else:
            P[k] = np.nan
    return P


def distances(logits: torch.Tensor, P: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """[M, C] squared distances; NaN (skipped) prototypes are infinitely far."""
    p, _, _ = soft_labels(pixels_by_class(logits), temperature)
    d = ((p[:, None, :] - P[None, :, :]) ** 2).sum(axis=2)
    d[:, np.isnan(P).all(axis=1)] = np.inf
    return d


def assert_labels_match(labels: torch.Tensor, logits: torch.Tensor, P, temperature: float = 1.0):
    """Labels equal the oracle's argmin exactly, except at pixels whose two best
    distances differ by less than NEAR_TIE, where float32 rounding may pick either."""
    if isinstance(P, torch.Tensor):
        P = P.detach().cpu().double().numpy()
    d = distances(logits, P, temperature)
    expected = d.argmin(axis=1)
    got = labels.detach().cpu().numpy().reshape(-1).astype(np.int64)
    assert tuple(labels.shape) == (logits.shape[0], *logits.shape[2:])
    best_two = np.sort(d, axis=1)[:, :2]
    near_tie = (best_two[:, 1] - best_two[:, 0]) < NEAR_TIE
    mismatch = (got != expected) & ~near_tie
    assert not mismatch.any(), f"{mismatch.sum()} of {got.size} labels differ from the oracle"
    # a near-tie may go either way, but only to one of the two nearest classes
    picked = d[np.arange(len(got)), got]
    assert np.all(picked - best_two[:, 0] < NEAR_TIE)


def assert_stats_close(S, W, S_ref, W_ref, dtype_in=torch.float32):
    """float32 math inside one call: relative error of a few float32 ulps times log(pixels)."""
    S, W = S.detach().cpu().double().numpy(), W.detach().cpu().double().numpy()
    scale = max(1.0, W_ref.max())
    np.testing.assert_allclose(W, W_ref, rtol=2e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(S, S_ref, rtol=2e-5, atol=1e-6 * scale)
