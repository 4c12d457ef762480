"""The functional API, its ``torch.library`` ops, and the one place that chooses a backend.

Each public function checks its arguments (types, shapes, devices: nothing that reads a tensor's
values), then runs its op, ``torch.ops.fastcal.{prototype_stats, predict, calibrate}``: through the
dispatcher where a tracer must see it (``torch.compile`` treats it as one opaque call with a known
output shape, its fake implementation, so compiled inference code runs fastcal's own kernels
without a graph break), and as a plain call of the op's body otherwise (see ``_call``).
"""
from __future__ import annotations

import math
from types import ModuleType
from typing import Optional, Sequence

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
                    confidence_power=1.0, size=None, scale_factor=None, align_corners=False):
    """Prototype sums ``S`` [C, C] and weights ``W`` [C] of a batch of logits, as float64.

    ``S[k] = sum w(x) p(x)`` and ``W[k] = sum w(x)`` over the valid pixels ``x`` whose argmax is
    ``k``, each weighing ``w = conf ** confidence_power`` (default 1: the paper's ``conf``; 0: every
    pixel alike, the plain mean of soft labels; 2 or more: confident pixels count more; at most 8).
    Sums run in float32 inside a block of pixels (CPU) or a program (Triton) and are carried in
    float64. ``deterministic=None`` follows
    ``torch.are_deterministic_algorithms_enabled()``; only the Triton backend
    has a non-deterministic (atomic) mode. Raises ``ValueError`` when a valid
    pixel has a NaN or infinite logit (which needs the sums on the host: on CUDA, one
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
    _checks.check_logits(logits)
    temperature = _checks.check_temperature(temperature)
    upsample = _upsample.resolve(logits, size, scale_factor, align_corners)
    _checks.check_valid(valid, logits, _upsample.output_shape(logits, upsample))
    _checks.check_choice("backend", backend, _checks.BACKENDS)
    _checks.check_deterministic(deterministic)
    confidence_power = _checks.check_confidence_power(confidence_power)
    # calibration never back-propagates; logits straight from a model may carry grad
    return _call(_stats_op, _stats_impl, logits.detach(), valid, temperature, backend, deterministic, confidence_power,
                 *_resize(upsample))


def _call(op, implementation, *args):
    """``op(*args)`` where a tracer must see the op: while ``torch.compile`` traces, under a Python
    dispatch mode (fake tensors, ``make_fx``, ``torch.export``) or with tensor subclasses. Anywhere
    else ``implementation(*args)``, the op's own body, without the dispatcher: the result is the
    same, a call costs less, and a process that never compiles never loads the compiler stack
    (the first eager call of a custom op imports ``torch._dynamo``; with it, two-process gloo jobs
    aborted at exit in about one run in six)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or any(isinstance(a, torch.Tensor) and type(a) is not torch.Tensor for a in args)):
        return op(*args)
    return implementation(*args)


def _resize(upsample) -> tuple:
    """``(size, scale_factor, align_corners)`` as the ops take them: the caller's choice, checked."""
    if upsample is None:
        return None, None, False
    if upsample.scale_factor is not None:
        return None, list(upsample.scale_factor), upsample.align_corners
    return list(upsample.size), None, upsample.align_corners


def _stats_impl(logits: torch.Tensor, valid: Optional[torch.Tensor], temperature: float, backend: str,
                deterministic: Optional[bool], confidence_power: float, size: Optional[Sequence[int]],
                scale_factor: Optional[Sequence[float]],
                align_corners: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    upsample = _upsample.resolve(logits, size, scale_factor, align_corners)
    module = resolve_backend(backend, logits.device)
    C = logits.shape[1]
    if pixel_count(logits, upsample) == 0:
        zeros = torch.zeros(C, C, dtype=torch.float64, device=logits.device)
        return zeros, zeros[0].clone(), zeros[0].clone()
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    S, W, N, nonfinite = module.prototype_stats(logits, temperature, valid, deterministic, upsample,
                                                confidence_power)
    if nonfinite:
        raise ValueError(
            f"logits: {nonfinite} valid pixel(s) have NaN or infinite logits; "
            "mask them out with `valid` or fix the model output"
        )
    return S, W, N


_stats_op = torch.library.custom_op("fastcal::prototype_stats", _stats_impl, mutates_args=())


@_stats_op.register_fake
def _(logits, valid, temperature, backend, deterministic, confidence_power, size, scale_factor, align_corners):
    C = logits.shape[1]
    return (logits.new_empty((C, C), dtype=torch.float64), logits.new_empty((C,), dtype=torch.float64),
            logits.new_empty((C,), dtype=torch.float64))


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
    It checks the prototypes' values (finite, or a whole row of NaN), which on CUDA reads them
    back once; while a CUDA graph is being captured the check is skipped and nothing
    synchronises (the labels are then those of whatever the prototypes hold).
    """
    _checks.check_logits(logits)
    temperature = _checks.check_temperature(temperature)
    upsample = _upsample.resolve(logits, size, scale_factor, align_corners)
    C = logits.shape[1]
    _checks.check_prototypes(prototypes, C, logits.device)
    _checks.check_label_dtype(label_dtype, C)
    _checks.check_choice("backend", backend, _checks.BACKENDS)
    _checks.check_choice("output", output, _checks.OUTPUTS)
    return _call(_predict_op, _predict_impl, logits.detach(), prototypes.detach(), temperature, backend,
                 label_dtype, output == "scores", *_resize(upsample))


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _run_predict(logits, prototypes, temperature, backend, label_dtype, scores, upsample):
    module = resolve_backend(backend, logits.device)
    if pixel_count(logits, upsample) == 0:
        return _empty_output(logits, upsample, scores, label_dtype)
    if scores:
        return module.scores(logits, prototypes, temperature, upsample)
    return module.predict(logits, prototypes, temperature, label_dtype, upsample)


def _empty_output(logits, upsample, scores: bool, label_dtype) -> torch.Tensor:
    """An uninitialised output: labels [N, *spatial] of ``label_dtype``, or float32 scores
    [N, C, *spatial] (the fake implementations' result, and the answer for an empty batch)."""
    shape = _upsample.output_shape(logits, upsample)
    if scores:
        return logits.new_empty((shape[0], logits.shape[1], *shape[1:]), dtype=torch.float32)
    return logits.new_empty(shape, dtype=label_dtype)


def _predict_impl(logits: torch.Tensor, prototypes: torch.Tensor, temperature: float, backend: str,
                  label_dtype: torch.dtype, scores: bool, size: Optional[Sequence[int]],
                  scale_factor: Optional[Sequence[float]], align_corners: bool) -> torch.Tensor:
    if not _capturing(prototypes.device):
        _checks.check_prototype_values(prototypes)
    upsample = _upsample.resolve(logits, size, scale_factor, align_corners)
    return _run_predict(logits, prototypes, temperature, backend, label_dtype, scores, upsample)


_predict_op = torch.library.custom_op("fastcal::predict", _predict_impl, mutates_args=())


@_predict_op.register_fake
def _(logits, prototypes, temperature, backend, label_dtype, scores, size, scale_factor, align_corners):
    upsample = _upsample.resolve(logits, size, scale_factor, align_corners)
    return _empty_output(logits, upsample, scores, label_dtype)


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
    ``torch.compile`` traces it without a graph break. Building the prototypes reads the sums
    back to the host (on CUDA, one synchronisation) to reject non-finite logits.
    """
    _checks.check_choice("empty", empty, _checks.EMPTY_POLICIES)
    _checks.check_logits(logits)
    confidence_power = _checks.check_confidence_power(confidence_power)
    upsample = _upsample.resolve(logits, size, scale_factor, align_corners)
    _checks.check_valid(valid, logits, _upsample.output_shape(logits, upsample))
    _checks.check_deterministic(deterministic)
    if prototypes is not None:
        if valid is not None:
            raise ValueError("valid: masks pixels out of the statistics, and with prototypes given there are "
                             "none to build (every pixel gets a label); drop valid or the prototypes")
        return predict(logits, prototypes, temperature=temperature, backend=backend, label_dtype=label_dtype,
                       output=output, size=size, scale_factor=scale_factor, align_corners=align_corners)
    temperature = _checks.check_temperature(temperature)
    _checks.check_choice("backend", backend, _checks.BACKENDS)
    _checks.check_choice("output", output, _checks.OUTPUTS)
    _checks.check_label_dtype(label_dtype, logits.shape[1])
    return _call(_calibrate_op, _calibrate_impl, logits.detach(), valid, temperature, empty, backend, label_dtype,
                 output == "scores", deterministic, confidence_power, *_resize(upsample))


def _calibrate_impl(logits: torch.Tensor, valid: Optional[torch.Tensor], temperature: float, empty: str,
                    backend: str, label_dtype: torch.dtype, scores: bool, deterministic: Optional[bool],
                    confidence_power: float, size: Optional[Sequence[int]], scale_factor: Optional[Sequence[float]],
                    align_corners: bool) -> torch.Tensor:
    upsample = _upsample.resolve(logits, size, scale_factor, align_corners)
    if pixel_count(logits, upsample) == 0:  # nothing to build prototypes from, nothing to label
        return _run_predict(logits, None, temperature, backend, label_dtype, scores, upsample)
    S, W, _ = _stats_impl(logits, valid, temperature, backend, deterministic, confidence_power, size, scale_factor,
                     align_corners)
    prototypes = prototypes_from_stats(S, W, empty=empty)
    return _run_predict(logits, prototypes, temperature, backend, label_dtype, scores, upsample)


_calibrate_op = torch.library.custom_op("fastcal::calibrate", _calibrate_impl, mutates_args=())


@_calibrate_op.register_fake
def _(logits, valid, temperature, empty, backend, label_dtype, scores, deterministic, confidence_power, size,
      scale_factor, align_corners):
    upsample = _upsample.resolve(logits, size, scale_factor, align_corners)
    return _empty_output(logits, upsample, scores, label_dtype)
