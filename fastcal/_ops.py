"""The steps a call runs once it is planned: the package's internal interface.

:mod:`fastcal.api` (the functions) and :mod:`fastcal.calibrator` (the class) check and plan a call
with :func:`fastcal._plan.plan`, then hand the plan to one step:

- :func:`stats_step`: the stats pass, ``S``, ``W``, ``N``, and its one read-back;
- :func:`predict_step`: the predict pass with prepared prototypes; nothing read back;
- :func:`calibrate_step`: the stats pass, the prototypes built on the device, the predict pass.

Each step runs the plan's backend directly or, where a tracer must see the call (:func:`traced`),
through its ``torch.library`` op, ``torch.ops.fastcal.{prototype_stats, predict, calibrate}``:
``torch.compile`` treats each as one opaque call with a known output shape (its fake
implementation), so compiled inference code runs fastcal's own kernels without a graph break.
Anywhere else the plan runs without the dispatcher: the result is the same, a call costs less,
and a process that never compiles never loads the compiler stack (the first eager call of a
custom op imports ``torch._dynamo``; with it, two-process gloo jobs aborted at exit in about one
run in six).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, _plan, _upsample
from ._operands import distance_operands

# ----- the steps ---------------------------------------------------------------------------------


def stats_step(plan: _plan.Plan, logits: torch.Tensor, valid: torch.Tensor | None, *, count: bool = False):
    """``(S, W, N)`` of the plan's stats pass, or with ``count`` ``(S, W, N, pixels)`` (the valid
    pixels counted, an int: read back in the same read as the non-finite check)."""
    if traced(logits, valid):
        S, W, N = _stats_op(logits, valid, plan.temperature, plan.requested_backend, plan.deterministic,
                            plan.confidence_power, *plan.resize)
        return (S, W, N, int(N.sum())) if count else (S, W, N)
    S, W, N, bad = _stats(plan, logits, valid)
    if count:
        return S, W, N, int(checked_read(bad, N.sum()))
    checked_read(bad)
    return S, W, N


def predict_step(plan: _plan.Plan, logits: torch.Tensor, prototypes: torch.Tensor, operands=None):
    """Labels (or scores) of the plan's predict pass. ``operands``: the prototypes already prepared
    and trusted (a calibrator's own); without them the caller's ``prototypes`` are prepared, their
    values checked (see :func:`fastcal._operands.distance_operands`)."""
    if traced(logits, prototypes):
        return _predict_op(logits, prototypes.detach(), plan.temperature, plan.requested_backend,
                           plan.label_dtype, plan.scores, *plan.resize)
    return _labels(plan, logits, checked_operands(prototypes, plan) if operands is None else operands)


def calibrate_step(plan: _plan.Plan, logits: torch.Tensor, valid: torch.Tensor | None):
    """Labels (or scores) of ``logits`` with the prototypes of their own statistics."""
    if traced(logits, valid):
        return _calibrate_op(logits, valid, plan.temperature, plan.empty, plan.requested_backend,
                             plan.label_dtype, plan.scores, plan.deterministic, plan.confidence_power,
                             *plan.resize)
    return _run_calibrate(plan, logits, valid)


def raise_all_empty() -> None:
    raise ValueError("W: every class is empty, so with empty='skip' no class could be predicted")


def checked_read(bad, value: torch.Tensor | None = None):
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


_TRACING_MODES = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY,
                  torch._C._TorchDispatchModeKey.FUNCTIONAL)


def traced(*tensors) -> bool:
    """Whether a tracer must see the op: while ``torch.compile`` traces, under a tracing dispatch mode
    (fake tensors, ``make_fx``, ``torch.export``, functionalization) or with tensor subclasses. Other
    dispatch modes (a profiler, a counter of read-backs) see the op's own operations instead."""
    return (any(t is not None and type(t) is not torch.Tensor for t in tensors)
            or torch.compiler.is_compiling()
            or (torch._C._len_torch_dispatch_stack() > 0
                and any(torch._C._get_dispatch_mode(key) is not None for key in _TRACING_MODES)))


def checked_operands(prototypes: torch.Tensor, plan: _plan.Plan):
    """The distance operands of caller-given prototypes, their values checked whenever the tensor
    holds values not seen before (not while a CUDA graph is being captured); prepared by the plan's
    backend where it has its own way (its ``prototype_operands``, None elsewhere: the Triton
    backend's one launch)."""
    capturing = prototypes.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return distance_operands(prototypes, None if capturing else _checks.check_prototype_values,
                             plan.backend.prototype_operands)


# ----- running a plan ------------------------------------------------------------------------------
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


def _labels(plan: _plan.Plan, logits: torch.Tensor, operands) -> torch.Tensor:
    """Labels (or scores) of the plan's predict pass with prepared prototypes; reads nothing back."""
    if plan.pixels == 0:
        return plan.output(logits.device)
    if plan.scores:
        return plan.backend.scores_pass(logits, operands, plan)
    return plan.backend.predict_pass(logits, operands, plan)


def _run_calibrate(plan, logits, valid):
    if plan.pixels == 0:  # nothing to build prototypes from, nothing to label
        return plan.output(logits.device)
    S, W, _, bad = _stats(plan, logits, valid)
    if checked_read(bad, (W == 0).all() if plan.empty == "skip" else None):
        raise_all_empty()
    return _labels(plan, logits, plan.backend.operands_pass(S, W, plan))


# ----- the torch.library ops: what a tracer records ------------------------------------------------
def _stats_impl(logits: torch.Tensor, valid: torch.Tensor | None, temperature: float, backend: str,
                deterministic: bool | None, confidence_power: float, size: Sequence[int] | None,
                scale_factor: Sequence[float] | None,
                align_corners: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan.plan("stats", logits, valid=valid, temperature=temperature, backend=backend,
                      deterministic=deterministic, confidence_power=confidence_power, size=size,
                      scale_factor=scale_factor, align_corners=align_corners)
    S, W, N, bad = _stats(plan, logits, valid)
    checked_read(bad)
    return S, W, N


_stats_op = torch.library.custom_op("fastcal::prototype_stats", _stats_impl, mutates_args=())


@_stats_op.register_fake
def _(logits, valid, temperature, backend, deterministic, confidence_power, size, scale_factor, align_corners):
    C = logits.shape[1]
    return (logits.new_empty((C, C), dtype=torch.float64), logits.new_empty((C,), dtype=torch.float64),
            logits.new_empty((C,), dtype=torch.float64))


def _predict_impl(logits: torch.Tensor, prototypes: torch.Tensor, temperature: float, backend: str,
                  label_dtype: torch.dtype, scores: bool, size: Sequence[int] | None,
                  scale_factor: Sequence[float] | None, align_corners: bool) -> torch.Tensor:
    plan = _plan.plan("predict", logits, prototypes=prototypes, temperature=temperature, backend=backend,
                      label_dtype=label_dtype, output="scores" if scores else "labels", size=size,
                      scale_factor=scale_factor, align_corners=align_corners)
    return _labels(plan, logits, checked_operands(prototypes, plan))


_predict_op = torch.library.custom_op("fastcal::predict", _predict_impl, mutates_args=())


@_predict_op.register_fake
def _(logits, prototypes, temperature, backend, label_dtype, scores, size, scale_factor, align_corners):
    return _fake_output(logits, label_dtype, scores, size, scale_factor, align_corners)


def _fake_output(logits, label_dtype, scores, size, scale_factor, align_corners):
    """The fake implementations' result: the output's shape and dtype, uninitialised."""
    shape = _upsample.output_shape(logits, _upsample.resolve(logits, size, scale_factor, align_corners))
    return _plan.empty_output(shape, logits.shape[1], label_dtype, scores, logits.device)


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
