"""The functional API: ``prototype_stats``, ``prototypes_from_stats``, ``predict``, ``calibrate``.

Every call reads top-down: **check once, plan once** (:func:`fastcal._plan.plan`: the arguments'
types, shapes, devices and options, resolved into one cached plan), then **run** one step of
:mod:`fastcal._ops` (the stats pass, the predict pass, or both), which reads back at most one
number, the non-finite check of a stats pass, and goes through the ``torch.library`` ops
``torch.ops.fastcal.{prototype_stats, predict, calibrate}`` only where a tracer must see them.
"""
from __future__ import annotations

import torch

from . import _checks, _ops, _plan, _space, reference
from .adapters import logits_of, mask_of


# ----- prototype_stats --------------------------------------------------------------------------
def prototype_stats(logits, *, temperature=1.0, valid=None, backend="auto", deterministic=None,
                    confidence_power=1.0, size=None, scale_factor=None, align_corners=False):
    """Prototype sums ``S`` [C, C] and weights ``W`` [C] of a batch of logits, as float64.

    ``S[k] = sum w(x) p(x)`` and ``W[k] = sum w(x)`` over the valid pixels ``x`` whose argmax is
    ``k``, each weighing ``w = conf ** confidence_power`` (default 1: the paper's ``conf``; 0: every
    pixel alike, the plain mean of soft labels; 2 or more: confident pixels count more; at most 8).
    Sums run in float32 inside a block of pixels (the fused CPU loops) or a program (Triton), in
    float64 with the ``torch-ops`` and reference backends, and are carried in float64. ``deterministic=None`` follows
    ``torch.are_deterministic_algorithms_enabled()``; only the Triton backend
    has a non-deterministic (atomic) mode. Raises ``ValueError`` when a valid
    pixel has a NaN or infinite logit (which needs one number on the host: on CUDA, one
    synchronisation).

    ``size=(H, W)`` or ``scale_factor=`` (with ``align_corners=``) computes the statistics of
    ``F.interpolate(logits, size, scale_factor, mode="bilinear", align_corners)`` (in float32)
    without writing it; ``valid`` is then at the output size. Logits must be [N, C, H, W].

    The op is ``torch.ops.fastcal.prototype_stats``: ``torch.compile`` traces a call to this
    function without a graph break.

    Args:
        logits (torch.Tensor): ``[N, C, *spatial]`` (0 to 3 spatial dims), float32, float16, bfloat16
            (float64 read as float32), any strides, CPU or CUDA; or a model's output holding them
            (``{"out": ...}``, ``.logits``).
        temperature (float): ``T > 0`` in float32's normal range, or ``math.inf`` (the limit).
            Default 1.
        valid (torch.Tensor | None): which pixels count: ``[N, *spatial]`` (at the output size with
            ``size``), ``[*spatial]`` for every image or ``[N, 1, *spatial]``; bool, or 0/1
            integer or float. Default None (every pixel).
        backend (str): ``"auto"`` (default), ``"triton"``, ``"torch"``, ``"numba"``, ``"torch-ops"``,
            ``"reference"`` (see ``fastcal._backends``).
        deterministic (bool | None): a fixed summation order on CUDA. Default None (PyTorch's flag).
        confidence_power (float): ``gamma`` in [0, 8]. Default 1.
        size (tuple[int, int] | None): ``(H', W')`` to upsample the logits to (bilinear), or None.
        scale_factor (float | tuple | None): instead of ``size``.
        align_corners (bool): as ``F.interpolate``'s. Default False.

    Returns:
        ``(S, W)``: ``S`` [C, C] float64, ``W`` [C] float64, on the logits' device.
    """
    S, W, _ = stats_and_counts(logits, temperature=temperature, valid=valid, backend=backend,
                               deterministic=deterministic, confidence_power=confidence_power,
                               size=size, scale_factor=scale_factor, align_corners=align_corners)
    return S, W


def stats_and_counts(logits, *, temperature=1.0, valid=None, backend="auto", deterministic=None,
                     confidence_power=1.0, size=None, scale_factor=None, align_corners=False):
    """:func:`prototype_stats`, and ``N`` [C] float64: the number of pixels counted per argmax class
    (what :class:`LabelCalibrator` keeps for its diagnostics)."""
    logits = logits_of(logits)
    valid = mask_of(valid, logits)
    plan = _plan.plan("stats", logits, valid=valid, temperature=temperature, backend=backend,
                      deterministic=deterministic, confidence_power=confidence_power, size=size,
                      scale_factor=scale_factor, align_corners=align_corners)
    # calibration never back-propagates; logits straight from a model may carry grad
    return _ops.stats_step(plan, logits.detach(), valid)


# ----- prototypes -------------------------------------------------------------------------------
def check_stats(S, W, *, signed: bool = False) -> None:
    """Sums as :func:`prototype_stats` returns them: finite, ``W >= 0``, and ``S >= 0`` but at the
    limit (``signed``: sums of centred logits)."""
    if not isinstance(S, torch.Tensor) or not isinstance(W, torch.Tensor):
        raise TypeError("S, W: expected torch tensors")
    _checks.check_dense("S", S)
    _checks.check_dense("W", W)
    if not S.dtype.is_floating_point or not W.dtype.is_floating_point:
        raise TypeError(f"S, W: expected floating dtypes, got {S.dtype} and {W.dtype}")
    if W.dim() != 1 or W.shape[0] < 2 or tuple(S.shape) != (W.shape[0], W.shape[0]):
        raise ValueError(f"S, W: expected shapes [C, C] and [C] with C >= 2, got {tuple(S.shape)} and {tuple(W.shape)}")
    if S.device != W.device:
        raise ValueError(f"S, W: on different devices ({S.device} and {W.device})")
    if not (torch.isfinite(S).all() and torch.isfinite(W).all()):
        raise ValueError("S, W: sums must be finite")
    if (W < 0).any() or (not signed and (S < 0).any()):
        raise ValueError("S, W: sums of confidence-weighted probabilities cannot be negative")


def prototypes_from_stats(S, W, *, empty="onehot", temperature=1.0) -> torch.Tensor:
    """Prototypes ``P[k] = S[k] / W[k]`` as float32 [C, C].

    An empty class (``W[k] == 0``) gets the one-hot vector ``e_k`` with
    ``empty="onehot"``, or a row of NaN with ``empty="skip"``, which
    :func:`predict` never chooses. With ``"skip"`` and no statistics at all
    there is nothing to predict, and ``ValueError`` is raised. ``temperature``: the one the
    statistics were taken at; it matters only at the limit ``math.inf``, where ``S`` holds sums of
    centred logits (negative entries allowed) and an empty class is never chosen while any class
    has weight (a NaN row; with none, ``"onehot"`` gives the argmax: see :mod:`fastcal._space`).
    The sums are checked (finite, non-negative), which reads them (on CUDA, one synchronisation),
    and so are the prototypes: ``ValueError`` where ``S[k] / W[k]`` overflows float32 (a weight far
    too small for its sums, e.g. ``W[k] = 1e-300``) or exceeds the magnitude :func:`predict` accepts
    (sums of probability vectors never do: ``S[k] / W[k]`` lies in [0, 1]).

    Args:
        S (torch.Tensor): [C, C] floating sums, as :func:`prototype_stats` returns them.
        W (torch.Tensor): [C] floating weights, on ``S``'s device.
        empty (str): ``"onehot"`` (default) or ``"skip"``.
        temperature (float): ``T > 0`` in float32's normal range, or ``math.inf`` (the limit).
            Default 1.

    Returns:
        ``P`` [C, C] float32 on ``S``'s device; NaN rows for classes never predicted.
    """
    temperature = _checks.check_temperature(temperature)
    check_stats(S, W, signed=_space.is_limit(temperature))
    _checks.check_choice("empty", empty, _checks.EMPTY_POLICIES)
    if empty == "skip" and bool((W == 0).all()):
        _ops.raise_all_empty()
    P = reference.prototypes_from_stats(S, W, empty, temperature)
    out_of_range = (W != 0)[:, None] & ~(P.abs() <= _checks.MAX_PROTOTYPE_MAGNITUDE)  # NaN and inf too
    if bool(out_of_range.any()):
        raise ValueError(f"S, W: a prototype S[k] / W[k] is not finite or exceeds "
                         f"{_checks.MAX_PROTOTYPE_MAGNITUDE:.4g} in magnitude (a weight W[k] far too small "
                         "for its sums S[k]); sums of confidence-weighted probabilities give [0, 1]")
    return P


# ----- predict ----------------------------------------------------------------------------------
def predict(logits, prototypes, *, temperature=1.0, backend="auto", label_dtype=torch.int64, output="labels",
            size=None, scale_factor=None, align_corners=False):
    """Labels ``argmin_k ||p(x) - P[k]||^2`` (lowest k on ties) as [N, *spatial].

    A NaN row of ``prototypes`` marks a class that is never predicted. Every
    pixel gets a label. A logit of ``-inf`` gives its class probability 0, as the softmax does,
    while the pixel has a finite logit (a class masked out by the model: the label still follows
    the nearest prototype; a NaN row forbids a class); the label of a pixel with a NaN or
    ``+inf`` logit, or only ``-inf`` ones, is unspecified, and so is any non-finite logit with
    ``size`` / ``scale_factor`` (interpolation meets it with zero weights). ``label_dtype`` may be
    int64 (default), int32 or uint8.
    ``output="scores"`` returns instead the float32 scores ``-||p(x) - P[k]||^2`` as
    [N, C, *spatial] (``-inf`` for a NaN row), whose argmax over classes is the label (up to
    rounding where two distances agree to about 1e-6 of their size).
    ``size`` / ``scale_factor`` / ``align_corners``: labels (or scores) of the bilinearly upsampled
    logits [N, H, W], as in :func:`prototype_stats`.

    The op is ``torch.ops.fastcal.predict``: ``torch.compile`` traces it without a graph break.
    The prototypes' values are checked (finite, or a whole row of NaN) the first time a prototypes
    tensor is seen in its current state, when they are prepared for the distance loops (on CUDA,
    one synchronisation); later calls with the same, unmodified tensor read nothing back. On the
    CPU they prepare nothing either (the values are compared with the copy the operands were built
    from); on CUDA the operands are prepared from the current values in one launch per call. While
    a CUDA graph is being captured the check is skipped.

    Args:
        logits (torch.Tensor): ``[N, C, *spatial]`` (0 to 3 spatial dims), float32, float16, bfloat16
            (float64 read as float32), any strides, CPU or CUDA; or a model's output holding them
            (``{"out": ...}``, ``.logits``).
        prototypes (torch.Tensor): [C, C] floating, on the logits' device; a NaN row: never chosen.
        temperature (float): ``T > 0`` in float32's normal range, or ``math.inf`` (the limit).
            Default 1.
        backend (str): ``"auto"`` (default), ``"triton"``, ``"torch"``, ``"numba"``, ``"torch-ops"``,
            ``"reference"`` (see ``fastcal._backends``).
        label_dtype (torch.dtype): int64 (default), int32, or uint8 (C <= 256).
        output (str): ``"labels"`` (default) or ``"scores"``.
        size (tuple[int, int] | None): ``(H', W')`` to upsample the logits to (bilinear), or None.
        scale_factor (float | tuple | None): instead of ``size``.
        align_corners (bool): as ``F.interpolate``'s. Default False.

    Returns:
        labels ``[N, *spatial]`` of ``label_dtype``, or scores ``[N, C, *spatial]`` float32.
    """
    logits = logits_of(logits)
    plan = _plan.plan("predict", logits, prototypes=prototypes, temperature=temperature, backend=backend,
                      label_dtype=label_dtype, output=output, size=size, scale_factor=scale_factor,
                      align_corners=align_corners)
    return _ops.predict_step(plan, logits.detach(), prototypes)


# ----- calibrate --------------------------------------------------------------------------------
def calibrate(logits, prototypes=None, *, temperature=1.0, valid=None, empty="onehot",
              backend="auto", label_dtype=torch.int64, output="labels", deterministic=None,
              confidence_power=1.0, size=None, scale_factor=None, align_corners=False):
    """Calibrated labels for ``logits`` [N, C, *spatial] -> [N, *spatial].

    With ``prototypes=None`` the prototypes are built from these logits
    (transductive: one stats pass, then one predict pass); ``valid`` masks
    pixels out of the statistics, and every pixel still gets a label (with ``prototypes`` given
    there are no statistics, and ``valid`` is refused); ``confidence_power`` weighs
    the pixels as in :func:`prototype_stats` (with ``prototypes`` given it has nothing to weigh).
    ``output="scores"``: the float32 scores [N, C, *spatial] of :func:`predict` instead.
    ``size`` / ``scale_factor`` / ``align_corners``: calibrate the bilinearly upsampled logits
    (labels and ``valid`` at the output size) without writing them, as in :func:`prototype_stats`.

    The op is ``torch.ops.fastcal.calibrate`` (or ``fastcal::predict`` with ``prototypes``):
    ``torch.compile`` traces it without a graph break. Building the prototypes reads one number
    back to the host (on CUDA, one synchronisation) to reject non-finite logits (and, with
    ``empty="skip"``, a batch where every class is empty); empty classes are resolved on the
    device.

    Args:
        logits (torch.Tensor): ``[N, C, *spatial]`` (0 to 3 spatial dims), float32, float16, bfloat16
            (float64 read as float32), any strides, CPU or CUDA; or a model's output holding them
            (``{"out": ...}``, ``.logits``).
        prototypes (torch.Tensor | None): [C, C] to predict with, or None (default): from these logits.
        temperature (float): ``T > 0`` in float32's normal range, or ``math.inf`` (the limit).
            Default 1.
        valid (torch.Tensor | None): which pixels count: ``[N, *spatial]`` (at the output size with
            ``size``), ``[*spatial]`` for every image or ``[N, 1, *spatial]``; bool, or 0/1
            integer or float. Default None (every pixel).
        empty (str): ``"onehot"`` (default) or ``"skip"``.
        backend (str): ``"auto"`` (default), ``"triton"``, ``"torch"``, ``"numba"``, ``"torch-ops"``,
            ``"reference"`` (see ``fastcal._backends``).
        label_dtype (torch.dtype): int64 (default), int32, or uint8 (C <= 256).
        output (str): ``"labels"`` (default) or ``"scores"``.
        deterministic (bool | None): a fixed summation order on CUDA. Default None (PyTorch's flag).
        confidence_power (float): ``gamma`` in [0, 8]. Default 1.
        size (tuple[int, int] | None): ``(H', W')`` to upsample the logits to (bilinear), or None.
        scale_factor (float | tuple | None): instead of ``size``.
        align_corners (bool): as ``F.interpolate``'s. Default False.

    Returns:
        labels ``[N, *spatial]`` of ``label_dtype``, or scores ``[N, C, *spatial]`` float32.
    """
    op = "calibrate" if prototypes is None else "calibrate-with-prototypes"
    logits = logits_of(logits)
    valid = mask_of(valid, logits)
    plan = _plan.plan(op, logits, valid=valid, prototypes=prototypes, temperature=temperature, backend=backend,
                      deterministic=deterministic, confidence_power=confidence_power, empty=empty,
                      label_dtype=label_dtype, output=output, size=size, scale_factor=scale_factor,
                      align_corners=align_corners)
    if prototypes is not None:
        return _ops.predict_step(plan, logits.detach(), prototypes)
    return _ops.calibrate_step(plan, logits.detach(), valid)
