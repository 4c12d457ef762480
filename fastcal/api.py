"""The functional API and the one place that chooses a backend."""
from __future__ import annotations

import math
from types import ModuleType

import torch

from . import _checks, _upsample, reference, torch_backend


def resolve_backend(backend: str, device: torch.device) -> ModuleType:
    """The module implementing ``prototype_stats`` and ``predict`` for ``backend`` on ``device``.

    ``"auto"`` is Triton for CUDA tensors and the PyTorch fast path elsewhere.
    """
    _checks.check_choice("backend", backend, _checks.BACKENDS)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "reference":
        return reference
    if backend == "torch":
        return torch_backend
    from . import _triton

    _triton.require(device)
    return _triton


def pixel_count(logits: torch.Tensor, upsample=None) -> int:
    """Pixels of the labels: of the logits, or of the upsampled output."""
    return math.prod(_upsample.output_shape(logits, upsample))


def prototype_stats(logits, *, temperature=1.0, valid=None, backend="auto", deterministic=None,
                    size=None, scale_factor=None, align_corners=False):
    """Prototype sums ``S`` [C, C] and weights ``W`` [C] of a batch of logits, as float64.

    ``S[k] = sum conf(x) p(x)`` and ``W[k] = sum conf(x)`` over the valid pixels
    ``x`` whose argmax is ``k``. Sums run in float32 inside a block of pixels (CPU) or a
    program (Triton) and are carried in float64. ``deterministic=None`` follows
    ``torch.are_deterministic_algorithms_enabled()``; only the Triton backend
    has a non-deterministic (atomic) mode. Raises ``ValueError`` when a valid
    pixel has a NaN or infinite logit.

    ``size=(H, W)`` or ``scale_factor=`` (with ``align_corners=``) computes the statistics of
    ``F.interpolate(logits, size, scale_factor, mode="bilinear", align_corners)`` (in float32)
    without writing it; ``valid`` is then at the output size. Logits must be [N, C, H, W].
    """
    _checks.check_logits(logits)
    temperature = _checks.check_temperature(temperature)
    upsample = _upsample.resolve(logits, size, scale_factor, align_corners)
    _checks.check_valid(valid, logits, _upsample.output_shape(logits, upsample))
    module = resolve_backend(backend, logits.device)
    C = logits.shape[1]
    if pixel_count(logits, upsample) == 0:
        zeros = torch.zeros(C, C, dtype=torch.float64, device=logits.device)
        return zeros, zeros[0].clone()
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    with torch.no_grad():  # calibration never back-propagates; logits straight from a model may carry grad
        S, W, nonfinite = module.prototype_stats(logits.detach(), temperature, valid, deterministic, upsample)
    if nonfinite:
        raise ValueError(
            f"logits: {nonfinite} valid pixel(s) have NaN or infinite logits; "
            "mask them out with `valid` or fix the model output"
        )
    return S, W


def check_stats(S, W) -> None:
    if not isinstance(S, torch.Tensor) or not isinstance(W, torch.Tensor):
        raise TypeError("S, W: expected torch tensors")
    if not S.dtype.is_floating_point or not W.dtype.is_floating_point:
        raise TypeError(f"S, W: expected floating dtypes, got {S.dtype} and {W.dtype}")
    if W.dim() != 1 or W.shape[0] < 2 or tuple(S.shape) != (W.shape[0], W.shape[0]):
        raise ValueError(f"S, W: expected shapes [C, C] and [C] with C >= 2, got {tuple(S.shape)} and {tuple(W.shape)}")
    if S.device != W.device:
        raise ValueError(f"S, W: on different devices ({S.device} and {W.device})")
    if not (torch.isfinite(S).all() and torch.isfinite(W).all()):
        raise ValueError("S, W: sums must be finite")
    if (S < 0).any() or (W < 0).any():
        raise ValueError("S, W: sums of confidence-weighted probabilities cannot be negative")


def prototypes_from_stats(S, W, *, empty="onehot") -> torch.Tensor:
    """Prototypes ``P[k] = S[k] / W[k]`` as float32 [C, C].

    An empty class (``W[k] == 0``) gets the one-hot vector ``e_k`` with
    ``empty="onehot"``, or a row of NaN with ``empty="skip"``, which
    :func:`predict` never chooses. With ``"skip"`` and no statistics at all
    there is nothing to predict, and ``ValueError`` is raised.
    """
    check_stats(S, W)
    _checks.check_choice("empty", empty, _checks.EMPTY_POLICIES)
    if empty == "skip" and bool((W == 0).all()):
        raise ValueError("W: every class is empty, so with empty='skip' no class could be predicted")
    return reference.prototypes_from_stats(S, W, empty)


def predict(logits, prototypes, *, temperature=1.0, backend="auto", label_dtype=torch.int64,
            size=None, scale_factor=None, align_corners=False):
    """Labels ``argmin_k ||p(x) - P[k]||^2`` (lowest k on ties) as [N, *spatial].

    A NaN row of ``prototypes`` marks a class that is never predicted. Every
    pixel gets a label; the label of a pixel with non-finite logits is
    unspecified. ``label_dtype`` may be int64 (default), int32 or uint8.
    ``size`` / ``scale_factor`` / ``align_corners``: labels of the bilinearly upsampled logits
    [N, H, W], as in :func:`prototype_stats`.
    """
    _checks.check_logits(logits)
    temperature = _checks.check_temperature(temperature)
    upsample = _upsample.resolve(logits, size, scale_factor, align_corners)
    C = logits.shape[1]
    _checks.check_prototypes(prototypes, C, logits.device)
    _checks.check_label_dtype(label_dtype, C)
    module = resolve_backend(backend, logits.device)
    if pixel_count(logits, upsample) == 0:
        return torch.empty(_upsample.output_shape(logits, upsample), dtype=label_dtype, device=logits.device)
    with torch.no_grad():
        return module.predict(logits.detach(), prototypes.detach(), temperature, label_dtype, upsample)


def calibrate(logits, prototypes=None, *, temperature=1.0, valid=None, empty="onehot",
              backend="auto", label_dtype=torch.int64, deterministic=None,
              size=None, scale_factor=None, align_corners=False):
    """Calibrated labels for ``logits`` [N, C, *spatial] -> [N, *spatial].

    With ``prototypes=None`` the prototypes are built from these logits
    (transductive: one stats pass, then one predict pass); ``valid`` masks
    pixels out of the statistics, and every pixel still gets a label.
    ``size`` / ``scale_factor`` / ``align_corners``: calibrate the bilinearly upsampled logits
    (labels and ``valid`` at the output size) without writing them, as in :func:`prototype_stats`.
    """
    _checks.check_choice("empty", empty, _checks.EMPTY_POLICIES)
    _checks.check_logits(logits)
    upsample = _upsample.resolve(logits, size, scale_factor, align_corners)
    resize = {"size": size, "scale_factor": scale_factor, "align_corners": align_corners}
    if prototypes is None:
        S, W = prototype_stats(logits, temperature=temperature, valid=valid, backend=backend,
                               deterministic=deterministic, **resize)
        if pixel_count(logits, upsample) == 0:  # nothing to build prototypes from, nothing to label
            _checks.check_label_dtype(label_dtype, logits.shape[1])
            return torch.empty(_upsample.output_shape(logits, upsample), dtype=label_dtype, device=logits.device)
        prototypes = prototypes_from_stats(S, W, empty=empty)
    elif valid is not None:
        _checks.check_valid(valid, logits, _upsample.output_shape(logits, upsample))
    return predict(logits, prototypes, temperature=temperature, backend=backend, label_dtype=label_dtype,
                   **resize)
