"""An independent float64 NumPy implementation of label calibration, and the
label comparison every backend test uses. It does not import fastcal."""
from __future__ import annotations

import numpy as np
import torch

# A label may differ from the oracle's nearest prototype only by a distance within
#   RTOL * (max_k d_k + ||p|| sqrt(max_k d_k))
# per pixel. The first term is the rounding of float32 distance arithmetic, relative to the
# pixel's distances; the second the reach of a float32 softmax: an error of a few ulps in p
# moves d_k - d_j by up to 2 |dp| ||P_k - P_j|| <= 4 |dp| sqrt(max d). Both are relative, so
# the check keeps its power at any temperature and logit scale.
RTOL = 2.0**-20


def pixels_by_class(logits: torch.Tensor) -> np.ndarray:
    """[M, C] float64: one row per pixel, in the C order of [N, *spatial]."""
    z = logits.detach().cpu().double().numpy()
    return np.moveaxis(z, 1, -1).reshape(-1, z.shape[1])


def soft_labels(z: np.ndarray, temperature: float = 1.0):
    """``(p, cls, conf)``; at the limit ``temperature = inf`` the centred logits and a confidence of
    1 (every pixel weighs the same, whatever the confidence power)."""
    if temperature == np.inf:
        return z - z.mean(axis=1, keepdims=True), z.argmax(axis=1), np.ones(len(z))
    shifted = (z - z.max(axis=1, keepdims=True)) / temperature
    e = np.exp(shifted)
    p = e / e.sum(axis=1, keepdims=True)
    return p, z.argmax(axis=1), p.max(axis=1)  # np.argmax takes the first maximum


def stats(logits: torch.Tensor, temperature: float = 1.0, valid: torch.Tensor | None = None,
          confidence_power: float = 1.0):
    z = pixels_by_class(logits)
    C = z.shape[1]
    if valid is not None:
        z = z[valid.cpu().numpy().reshape(-1)]
    p, cls, conf = soft_labels(z, temperature)
    weight = conf**confidence_power
    S, W = np.zeros((C, C)), np.zeros(C)
    np.add.at(S, cls, weight[:, None] * p)
    np.add.at(W, cls, weight)
    return S, W


def prototypes(S: np.ndarray, W: np.ndarray, empty: str = "onehot", temperature: float = 1.0) -> np.ndarray:
    """At the limit an empty class is infinitely far (NaN) while any class has weight; with none,
    ``"onehot"`` gives the argmax through the centred one-hot rows."""
    P = np.empty_like(S)
    C = len(W)
    for k in range(C):
        if W[k] > 0:
            P[k] = S[k] / W[k]
        elif temperature == np.inf and empty == "onehot" and not (W > 0).any():
            P[k] = np.eye(C)[k] - 1.0 / C
        elif temperature == np.inf:
            P[k] = np.nan
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


def distance_tolerance(logits: torch.Tensor, d: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """[M] per pixel: how far past the nearest prototype a float32 label may land (see ``RTOL``)."""
    p, _, _ = soft_labels(pixels_by_class(logits), temperature)
    finite = np.where(np.isfinite(d), d, 0.0).max(axis=1)
    return RTOL * (finite + np.sqrt((p * p).sum(axis=1) * finite))


def assert_labels_match(labels: torch.Tensor, logits: torch.Tensor, P, temperature: float = 1.0,
                        logit_error: float = 0.0):
    """Each label's distance is within ``distance_tolerance`` of the oracle's nearest prototype.

    ``logit_error``: how far the backend's own logits may be from ``logits`` (float32 rounding of
    an interpolation): it moves ``p`` by up to ``2 ||p|| logit_error / T``, so the distances by up
    to ``8 ||p|| sqrt(max d) logit_error / T``."""
    if isinstance(P, torch.Tensor):
        P = P.detach().cpu().double().numpy()
    d = distances(logits, P, temperature)
    got = labels.detach().cpu().numpy().reshape(-1).astype(np.int64)
    assert tuple(labels.shape) == (logits.shape[0], *logits.shape[2:])
    assert ((got >= 0) & (got < P.shape[0])).all()
    excess = d[np.arange(len(got)), got] - d.min(axis=1)
    tolerance = distance_tolerance(logits, d, temperature)
    if logit_error:
        tolerance = tolerance + _logit_reach(logits, d, temperature, logit_error)
    wrong = ~(excess <= tolerance)  # a skipped class (inf) is wrong
    assert not wrong.any(), (
        f"{wrong.sum()} of {got.size} labels are farther than the tolerance from the nearest prototype "
        f"(worst excess {excess[wrong].max():.3g})"
    )


def _logit_reach(logits, d, temperature, logit_error):
    """How far an error of ``logit_error`` in the logits moves the distances: ``p`` moves by up to
    ``2 ||p|| logit_error / T``; at the limit (taking the error relative to the logits' size) the
    centred logits move by up to ``2 sqrt(C) logit_error max|z|``."""
    z = pixels_by_class(logits)
    p, _, _ = soft_labels(z, temperature)
    finite = np.where(np.isfinite(d), d, 0.0).max(axis=1)
    if temperature == np.inf:
        return 8 * np.sqrt(z.shape[1] * finite) * logit_error * np.abs(z).max(axis=1)
    return 8 * np.sqrt((p * p).sum(axis=1) * finite) * logit_error / temperature


def clear_winners(logits: torch.Tensor, P, temperature: float = 1.0) -> np.ndarray:
    """[M] bool: pixels whose nearest prototype beats the second by more than the tolerance, where
    every float32 backend must pick exactly the oracle's label."""
    if isinstance(P, torch.Tensor):
        P = P.detach().cpu().double().numpy()
    d = distances(logits, P, temperature)
    best_two = np.sort(d, axis=1)[:, :2]
    return best_two[:, 1] - best_two[:, 0] > 2 * distance_tolerance(logits, d, temperature)


def assert_stats_close(S, W, S_ref, W_ref, dtype_in=torch.float32):
    """float32 math inside one call: relative error of a few float32 ulps times log(pixels)."""
    S, W = S.detach().cpu().double().numpy(), W.detach().cpu().double().numpy()
    scale = max(1.0, W_ref.max())
    np.testing.assert_allclose(W, W_ref, rtol=2e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(S, S_ref, rtol=2e-5, atol=1e-6 * scale)


def interpolate(logits: torch.Tensor, size=None, scale_factor=None, align_corners=False) -> torch.Tensor:
    """Bilinear upsampling in float64 NumPy, from PyTorch's documented rule for the source
    coordinates (independent of fastcal and of ``F.interpolate``); returns a float64 tensor."""
    z = logits.detach().cpu().double().numpy()
    in_h, in_w = z.shape[2:]
    if size is not None:
        out = (size, size) if isinstance(size, int) else tuple(size)
        scales = [i / o for i, o in zip((in_h, in_w), out)]
    else:
        factors = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
        out = tuple(int(np.floor(i * f)) for i, f in zip((in_h, in_w), factors))
        scales = [1.0 / f for f in factors]

    def axis(n_out, n_in, scale):
        dst = np.arange(n_out, dtype=np.float64)
        if align_corners:
            src = dst * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
        else:
            src = np.maximum((dst + 0.5) * scale - 0.5, 0.0)
        i0 = np.floor(src).astype(np.int64)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    y0, y1, ly = axis(out[0], in_h, scales[0])
    x0, x1, lx = axis(out[1], in_w, scales[1])
    ly, lx = ly[:, None], lx[None, :]
    top = z[:, :, y0][:, :, :, x0] * (1 - lx) + z[:, :, y0][:, :, :, x1] * lx
    bottom = z[:, :, y1][:, :, :, x0] * (1 - lx) + z[:, :, y1][:, :, :, x1] * lx
    return torch.from_numpy(top * (1 - ly) + bottom * ly)


def assert_scores_close(scores: torch.Tensor, logits: torch.Tensor, P, temperature: float = 1.0,
                        logit_error: float = 0.0):
    """``scores`` [N, C, *spatial] equal ``-||p - P[k]||^2`` to 4x the labels' tolerance per pixel
    (each score, not only the differences between them, carries the rounding); skipped (NaN)
    prototypes score exactly ``-inf``. ``logit_error`` as in :func:`assert_labels_match`."""
    if isinstance(P, torch.Tensor):
        P = P.detach().cpu().double().numpy()
    assert scores.dtype == torch.float32
    assert tuple(scores.shape) == (logits.shape[0], P.shape[0], *logits.shape[2:])
    got = pixels_by_class(scores)
    d = distances(logits, P, temperature)
    skipped = np.isnan(P).all(axis=1)
    assert (got[:, skipped] == -np.inf).all(), "a skipped class must score -inf"
    tolerance = 4 * distance_tolerance(logits, d, temperature)
    if logit_error:
        tolerance = tolerance + _logit_reach(logits, d, temperature, logit_error)
    error = np.abs(got[:, ~skipped] + d[:, ~skipped]).max(axis=1, initial=0.0)
    bad = ~(error <= tolerance)
    assert not bad.any(), f"{bad.sum()} of {len(bad)} pixels have a score off by more than the tolerance " \
                          f"(worst {error[bad].max():.3g} against {tolerance[bad].min():.3g})"
