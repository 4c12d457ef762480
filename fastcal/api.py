"""The functional API and its ``torch.library`` ops.

Every public call reads top-down: **check once, plan once** (:func:`fastcal._plan.plan`: the
arguments' types, shapes, devices and options, resolved into one cached plan), then **run** the
plan: ``_stats`` and ``_labels`` call the plan's backend, and read back at most one scalar, the
non-finite check of a stats pass.

The ops are ``torch.ops.fastcal.{prototype_stats, predict, calibrate}``. A tracer must see them
(``torch.compile`` treats each as one opaque call with a known output shape, its fake
implementation, so compiled inference code runs fastcal's own kernels without a graph break);
anywhere else the plan runs without the dispatcher (see :func:`_traced`): the result is the same,
a call costs less, and a process that never compiles never loads the compiler stack (the first
eager call of a custom op imports ``torch._dynamo``; with it, two-process gloo jobs aborted at
exit in about one run in six).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, _plan, _upsample, reference
from ._common import distance_operands


# ----- running a plan -------------------------------------------------------------------------
def _stats(plan: _plan.Plan, logits: torch.Tensor, valid: torch.Tensor | None):
    """``(S, W, N, bad)`` of the plan's stats pass; ``bad`` (valid pixels with a non-finite logit,
    an int or a 0-dim tensor on the device) is not read here: callers fold it into their one read."""
    if plan.pixels == 0:
        zeros = torch.zeros(plan.num_classes, plan.num_classes, dtype=torch.float64, device=logits.device)
        return zeros, zeros[0].clone(), zeros[0].clone(), 0
    return plan.backend.stats_pass(logits, valid, plan)


def _raise_nonfinite(count: int) -> None:
    if count > 0:
        raise ValueError(
            f"logits: {count} valid pixel(s) have NaN or infinite logits; "
            "mask them out with `valid` or fix the model output"
        )


def _raise_all_empty() -> None:
    raise ValueError("W: every class is empty, so with empty='skip' no class could be predicted")


def _labels(plan: _plan.Plan, logits: torch.Tensor, operands) -> torch.Tensor:
    """Labels (or scores) of the plan's predict pass with prepared prototypes; reads nothing back."""
    if plan.pixels == 0:
        return plan.output(logits.device)
    if plan.scores:
        return plan.backend.scores_pass(logits, operands, plan)
    return plan.backend.predict_pass(logits, operands, plan)


_TRACING_MODES = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY,
                  torch._C._TorchDispatchModeKey.FUNCTIONAL)


def _traced(*tensors) -> bool:
    """Whether a tracer must see the op: while ``torch.compile`` traces, under a tracing dispatch mode
    (fake tensors, ``make_fx``, ``torch.export``, functionalization) or with tensor subclasses. Other
    dispatch modes (a profiler, a counter of read-backs) see the op's own operations instead."""
    return (any(t is not None and type(t) is not torch.Tensor for t in tensors)
            or torch.compiler.is_compiling()
            or (torch._C._len_torch_dispatch_stack() > 0
                and any(torch._C._get_dispatch_mode(key) is not None for key in _TRACING_MODES)))


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _checked_operands(prototypes: torch.Tensor):
    """The distance operands of caller-given prototypes, their values checked the first time this
    tensor is seen in its current state (not while a CUDA graph is being captured)."""
    check = None if _capturing(prototypes.device) else _checks.check_prototype_values
    return distance_operands(prototypes, check)  # keyed by the caller's tensor; built from it detached


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
    """
    S, W, _ = stats_and_counts(logits, temperature=temperature, valid=valid, backend=backend,
                               deterministic=deterministic, confidence_power=confidence_power,
                               size=size, scale_factor=scale_factor, align_corners=align_corners)
    return S, W


def stats_and_counts(logits, *, temperature=1.0, valid=None, backend="auto", deterministic=None,
                     confidence_power=1.0, size=None, scale_factor=None, align_corners=False):
    """:func:`prototype_stats`, and ``N`` [C] float64: the number of pixels counted per argmax class
    (what :class:`LabelCalibrator` keeps for its diagnostics)."""
    plan = _plan.plan("stats", logits, valid=valid, temperature=temperature, backend=backend,
                      deterministic=deterministic, confidence_power=confidence_power, size=size,
                      scale_factor=scale_factor, align_corners=align_corners)
    # calibration never back-propagates; logits straight from a model may carry grad
    logits = logits.detach()
    if _traced(logits, valid):
        return _stats_op(logits, valid, plan.temperature, backend, plan.deterministic, plan.confidence_power,
                         *plan.resize)
    return _run_stats(plan, logits, valid)


def _run_stats(plan, logits, valid):
    S, W, N, bad = _stats(plan, logits, valid)
    _checked_read(bad)
    return S, W, N


def _stats_impl(logits: torch.Tensor, valid: torch.Tensor | None, temperature: float, backend: str,
                deterministic: bool | None, confidence_power: float, size: Sequence[int] | None,
                scale_factor: Sequence[float] | None,
                align_corners: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan.plan("stats", logits, valid=valid, temperature=temperature, backend=backend,
                      deterministic=deterministic, confidence_power=confidence_power, size=size,
                      scale_factor=scale_factor, align_corners=align_corners)
    return _run_stats(plan, logits, valid)


_stats_op = torch.library.custom_op("fastcal::prototype_stats", _stats_impl, mutates_args=())


@_stats_op.register_fake
def _(logits, valid, temperature, backend, deterministic, confidence_power, size, scale_factor, align_corners):
    C = logits.shape[1]
    return (logits.new_empty((C, C), dtype=torch.float64), logits.new_empty((C,), dtype=torch.float64),
            logits.new_empty((C,), dtype=torch.float64))


# ----- prototypes -------------------------------------------------------------------------------
def check_stats(S, W) -> None:
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
    if (S < 0).any() or (W < 0).any():
        raise ValueError("S, W: sums of confidence-weighted probabilities cannot be negative")


def prototypes_from_stats(S, W, *, empty="onehot") -> torch.Tensor:
    """Prototypes ``P[k] = S[k] / W[k]`` as float32 [C, C].

    An empty class (``W[k] == 0``) gets the one-hot vector ``e_k`` with
    ``empty="onehot"``, or a row of NaN with ``empty="skip"``, which
    :func:`predict` never chooses. With ``"skip"`` and no statistics at all
    there is nothing to predict, and ``ValueError`` is raised. The sums are checked (finite,
    non-negative), which reads them (on CUDA, one synchronisation), and so are the prototypes:
    ``ValueError`` where ``S[k] / W[k]`` overflows float32 (a weight far too small for its sums,
    e.g. ``W[k] = 1e-300``) or exceeds the magnitude :func:`predict` accepts (sums of probability
    vectors never do: ``S[k] / W[k]`` lies in [0, 1]).
    """
    check_stats(S, W)
    _checks.check_choice("empty", empty, _checks.EMPTY_POLICIES)
    if empty == "skip" and bool((W == 0).all()):
        _raise_all_empty()
    P = reference.prototypes_from_stats(S, W, empty)
    kept = (W != 0)[:, None]
    if not bool((kept & ~(P.abs() <= _checks.MAX_PROTOTYPE_MAGNITUDE)).logical_not().all()):
        raise ValueError(f"S, W: a prototype S[k] / W[k] is not finite or exceeds "
                         f"{_checks.MAX_PROTOTYPE_MAGNITUDE:.4g} in magnitude (a weight W[k] far too small "
                         "for its sums S[k]); sums of confidence-weighted probabilities give [0, 1]")
    return P


# ----- predict ----------------------------------------------------------------------------------
def predict(logits, prototypes, *, temperature=1.0, backend="auto", label_dtype=torch.int64, output="labels",
            size=None, scale_factor=None, align_corners=False):
    """Labels ``argmin_k ||p(x) - P[k]||^2`` (lowest k on ties) as [N, *spatial].

    A NaN row of ``prototypes`` marks a class that is never predicted. Every
    pixel gets a label; the label of a pixel with non-finite logits is
    unspecified. ``label_dtype`` may be int64 (default), int32 or uint8.
    ``output="scores"`` returns instead the float32 scores ``-||p(x) - P[k]||^2`` as
    [N, C, *spatial] (``-inf`` for a NaN row), whose argmax over classes is the label (up to
    rounding where two distances agree to about 1e-6 of their size).
    ``size`` / ``scale_factor`` / ``align_corners``: labels (or scores) of the bilinearly upsampled
    logits [N, H, W], as in :func:`prototype_stats`.

    The op is ``torch.ops.fastcal.predict``: ``torch.compile`` traces it without a graph break.
    The prototypes' values are checked (finite, or a whole row of NaN) the first time a prototypes
    tensor is seen in its current state, when they are prepared for the distance loops (on CUDA,
    one synchronisation); later calls with the same, unmodified tensor read nothing back and
    prepare nothing. While a CUDA graph is being captured the check is skipped.
    """
    plan = _plan.plan("predict", logits, prototypes=prototypes, temperature=temperature, backend=backend,
                      label_dtype=label_dtype, output=output, size=size, scale_factor=scale_factor,
                      align_corners=align_corners)
    return _predict_with(plan, logits.detach(), prototypes, backend, label_dtype)


def _predict_with(plan, logits, prototypes, backend, label_dtype):
    """The predict pass with caller-given prototypes: through the op where a tracer must see it."""
    if _traced(logits, prototypes):
        return _predict_op(logits, prototypes.detach(), plan.temperature, backend, label_dtype, plan.scores,
                           *plan.resize)
    return _labels(plan, logits, _checked_operands(prototypes))


def _predict_impl(logits: torch.Tensor, prototypes: torch.Tensor, temperature: float, backend: str,
                  label_dtype: torch.dtype, scores: bool, size: Sequence[int] | None,
                  scale_factor: Sequence[float] | None, align_corners: bool) -> torch.Tensor:
    plan = _plan.plan("predict", logits, prototypes=prototypes, temperature=temperature, backend=backend,
                      label_dtype=label_dtype, output="scores" if scores else "labels", size=size,
                      scale_factor=scale_factor, align_corners=align_corners)
    return _labels(plan, logits, _checked_operands(prototypes))


_predict_op = torch.library.custom_op("fastcal::predict", _predict_impl, mutates_args=())


@_predict_op.register_fake
def _(logits, prototypes, temperature, backend, label_dtype, scores, size, scale_factor, align_corners):
    return _fake_output(logits, label_dtype, scores, size, scale_factor, align_corners)


def _fake_output(logits, label_dtype, scores, size, scale_factor, align_corners):
    """The fake implementations' result: the output's shape and dtype, uninitialised."""
    shape = _upsample.output_shape(logits, _upsample.resolve(logits, size, scale_factor, align_corners))
    if scores:
        return logits.new_empty((shape[0], logits.shape[1], *shape[1:]), dtype=torch.float32)
    return logits.new_empty(shape, dtype=label_dtype)


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
    """
    op = "calibrate" if prototypes is None else "calibrate-with-prototypes"
    plan = _plan.plan(op, logits, valid=valid, prototypes=prototypes, temperature=temperature, backend=backend,
                      deterministic=deterministic, confidence_power=confidence_power, empty=empty,
                      label_dtype=label_dtype, output=output, size=size, scale_factor=scale_factor,
                      align_corners=align_corners)
    logits = logits.detach()
    if prototypes is not None:
        return _predict_with(plan, logits, prototypes, backend, label_dtype)
    if _traced(logits, valid):
        return _calibrate_op(logits, valid, plan.temperature, empty, backend, label_dtype, plan.scores,
                             plan.deterministic, plan.confidence_power, *plan.resize)
    return _run_calibrate(plan, logits, valid)


def _run_calibrate(plan, logits, valid):
    if plan.pixels == 0:  # nothing to build prototypes from, nothing to label
        return plan.output(logits.device)
    S, W, _, bad = _stats(plan, logits, valid)
    if _checked_read(bad, (W == 0).all() if plan.empty == "skip" else None):
        _raise_all_empty()
    return _labels(plan, logits, plan.backend.operands_pass(S, W, plan))


def _checked_read(bad, value: torch.Tensor | None = None):
    """The stats pass's one read: raise ``ValueError`` when ``bad`` (the valid pixels with a
    non-finite logit: an int counted on the host, or a 0-dim tensor) is positive, else return
    ``value`` (a 0-dim tensor >= 0, what else the caller must know) as a float; a count on the
    device and ``value`` are read back as one number. Meta tensors, on which launches are only
    built (:func:`fastcal._plan.meta_plan`), hold no number: nothing is read."""
    if isinstance(bad, torch.Tensor):
        if bad.is_meta:
            return None if value is None else 0.0
        if value is None:
            return _raise_nonfinite(int(bad))
        status = float(torch.where(bad > 0, -bad.double(), value.double()))
        _raise_nonfinite(int(-status) if status < 0 else 0)
        return status
    _raise_nonfinite(bad)
    return None if value is None else float(value)


def _calibrate_impl(logits: torch.Tensor, valid: torch.Tensor | None, temperature: float, empty: str,
                    backend: str, label_dtype: torch.dtype, scores: bool, deterministic: bool | None,
                    confidence_power: float, size: Sequence[int] | None, scale_factor: Sequence[float] | None,
                    align_corners: bool) -> torch.Tensor:
    plan = _plan.plan("calibrate", logits, valid=valid, temperature=temperature, backend=backend,
                      deterministic=deterministic, confidence_power=confidence_power, empty=empty,
                      label_dtype=label_dtype, output="scores" if scores else "labels", size=size,
                      scale_factor=scale_factor, align_corners=align_corners)
    return _run_calibrate(plan, logits, valid)


_calibrate_op = torch.library.custom_op("fastcal::calibrate", _calibrate_impl, mutates_args=())


@_calibrate_op.register_fake
def _(logits, valid, temperature, empty, backend, label_dtype, scores, deterministic, confidence_power, size,
      scale_factor, align_corners):
    return _fake_output(logits, label_dtype, scores, size, scale_factor, align_corners)
