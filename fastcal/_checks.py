"""Argument checks shared by every public entry point.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong value or shape) with a message that names the argument, before any state
is touched.
"""
from __future__ import annotations

import contextlib
import math
import threading
from numbers import Real

import torch

EMPTY_POLICIES = ("onehot", "skip")
LABEL_DTYPES = (torch.int64, torch.int32, torch.uint8)
MAX_SPATIAL_DIMS = 3


LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class _MetaAllowed(threading.local):
    value = False


_meta_allowed = _MetaAllowed()


def meta_logits_are_allowed() -> bool:
    return _meta_allowed.value


@contextlib.contextmanager
def meta_logits_allowed():
    """Accept meta logits in :func:`check_logits` (planning launches that will not run)."""
    _meta_allowed.value = True
    try:
        yield
    finally:
        _meta_allowed.value = False


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_dense(name: str, tensor: torch.Tensor) -> None:
    """A plain strided tensor: sparse, nested and other layouts are refused by name."""
    if tensor.is_nested:
        raise TypeError(f"{name}: expected a dense tensor, got a nested tensor; pad it into one "
                        "(torch.nested.to_padded_tensor) and mask the padding with valid=")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense tensor, got layout {tensor.layout}; convert it with .to_dense()")


def check_logits(logits) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
    check_dense("logits", logits)
    if logits.dtype not in LOGIT_DTYPES:
        raise TypeError(
            f"logits: expected a floating dtype (float32, float16, bfloat16 or float64), got {logits.dtype}"
        )
    if logits.device.type == "meta" and not _meta_allowed.value:
        raise ValueError("logits: on the meta device, which holds no values to calibrate; "
                         "expected a CPU or CUDA tensor")
    if logits.dim() < 2:
        raise ValueError(f"logits: expected shape [N, C, *spatial], got {tuple(logits.shape)}")
    if logits.dim() - 2 > MAX_SPATIAL_DIMS:
        raise ValueError(
            f"logits: at most {MAX_SPATIAL_DIMS} spatial dims are supported, "
            f"got shape {tuple(logits.shape)}"
        )
    if logits.shape[1] < 2:
        raise ValueError(f"logits: need at least 2 classes on dim 1, got C={logits.shape[1]}")


# Temperatures whose float32 value is a normal number: 1/T and (z - max z) / T stay defined in float32.
MIN_TEMPERATURE = float(torch.finfo(torch.float32).tiny)
MAX_TEMPERATURE = float(torch.finfo(torch.float32).max)


def check_temperature(temperature) -> float:
    """A positive number in float32's normal range, or ``math.inf`` (the limit, see
    :mod:`fastcal._space`), as a float. A finite number is never taken as the limit: an integer
    beyond float's range is refused. Under ``torch.compile(dynamic=True)`` a number may be symbolic:
    the range is then checked by comparisons alone (no f-string, no ``math`` call on it), which the
    tracer turns into guards."""
    if isinstance(temperature, bool) or not isinstance(temperature, (Real, torch.Tensor)):
        raise TypeError(f"temperature: expected a positive number or math.inf, got {temperature!r}")
    if isinstance(temperature, torch.Tensor):
        check_dense("temperature", temperature)
        if temperature.numel() != 1 or not temperature.dtype.is_floating_point:
            raise TypeError(f"temperature: expected a positive number or math.inf, got {temperature!r}")
        temperature = temperature.item()
    try:
        temperature = float(temperature)
    except OverflowError:  # an int beyond float64's range: finite, so not the limit
        temperature = math.nan
    if temperature == math.inf:
        return temperature
    if not (MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):  # NaN and -inf fail too
        raise ValueError(
            f"temperature: expected a positive number in float32's normal range "
            f"[{MIN_TEMPERATURE:.7g}, {MAX_TEMPERATURE:.7g}], or math.inf (the limit), got {temperature!r}"
        )
    return temperature


MAX_CONFIDENCE_POWER = 8.0  # (1/C)**8 stays a normal float32 for C up to 2^15 classes


def check_confidence_power(confidence_power) -> float:
    if isinstance(confidence_power, bool) or not isinstance(confidence_power, Real):
        raise TypeError(_confidence_power_expected(confidence_power))
    if not (0.0 <= float(confidence_power) <= MAX_CONFIDENCE_POWER):  # NaN fails too
        raise ValueError(_confidence_power_expected(confidence_power))
    return float(confidence_power)


def _confidence_power_expected(confidence_power) -> str:
    # built only on failure: a symbolic number (torch.compile) cannot be formatted while traced
    return f"confidence_power: expected a number in [0, {MAX_CONFIDENCE_POWER:g}], got {confidence_power!r}"


def check_num_classes(num_classes) -> int:
    if not is_int(num_classes):
        raise TypeError(f"num_classes: expected an int >= 2, got {type(num_classes).__name__}")
    if num_classes < 2:
        raise ValueError(f"num_classes: expected an int >= 2, got {num_classes!r}")
    return num_classes


def check_momentum(momentum) -> float | None:
    """None (cumulative) or a number in (0, 1], as a float."""
    if momentum is None:
        return None
    if not is_number(momentum):
        raise TypeError(f"momentum: expected None or a number in (0, 1], got {type(momentum).__name__}")
    if not (0 < momentum <= 1):
        raise ValueError(f"momentum: expected None or a number in (0, 1], got {momentum!r}")
    return float(momentum)


def check_class_names(names, num_classes: int, what: str = "class_names"):
    """None, or ``num_classes`` strings as a tuple."""
    if names is None:
        return None
    try:
        names = tuple(names) if not isinstance(names, str) else None
    except TypeError:
        names = None
    if names is None or not all(isinstance(n, str) for n in names):
        raise (ValueError if what.startswith("state") else TypeError)(
            f"{what}: expected None or a sequence of {num_classes} strings")
    if len(names) != num_classes:
        raise ValueError(f"{what}: expected {num_classes} names, got {len(names)}")
    return names


def check_valid(valid, logits: torch.Tensor, shape: tuple | None = None) -> None:
    """``valid``: None or a bool tensor of ``shape`` (default: the logits without the class dim),
    as :func:`fastcal.adapters.mask_of` makes it from the forms users hold."""
    if valid is None:
        return
    if not isinstance(valid, torch.Tensor):
        raise TypeError(f"valid: expected None or a mask tensor, got {type(valid).__name__}")
    check_dense("valid", valid)
    if valid.dtype != torch.bool:
        raise TypeError(f"valid: expected dtype torch.bool, or an integer or floating 0/1 mask, got {valid.dtype}")
    expected = tuple(shape) if shape is not None else (logits.shape[0], *logits.shape[2:])
    if tuple(valid.shape) != expected:
        what = "the output size" if shape is not None else "logits without the class dim"
        raise ValueError(f"valid: expected shape {expected} ({what}), {expected[1:]} (one mask for every "
                         f"image) or {(expected[0], 1, *expected[1:])}, got {tuple(valid.shape)}")
    if valid.device != logits.device:
        raise ValueError(f"valid: on {valid.device}, but logits are on {logits.device}")


def check_prototypes(prototypes, num_classes: int, device: torch.device) -> None:
    if not isinstance(prototypes, torch.Tensor):
        raise TypeError(f"prototypes: expected a torch.Tensor, got {type(prototypes).__name__}")
    check_dense("prototypes", prototypes)
    if not prototypes.dtype.is_floating_point:
        raise TypeError(f"prototypes: expected a floating dtype, got {prototypes.dtype}")
    if tuple(prototypes.shape) != (num_classes, num_classes):
        raise ValueError(
            f"prototypes: expected shape [C, C] = [{num_classes}, {num_classes}], "
            f"got {tuple(prototypes.shape)}"
        )
    if prototypes.device != device:
        raise ValueError(f"prototypes: on {prototypes.device}, but logits are on {device}")


# Prototypes are probability vectors; entries beyond this bound would overflow the float32
# distances (||p - P[k]||^2 up to C * (1 + |P|)^2) and leave every class tied at infinity.
MAX_PROTOTYPE_MAGNITUDE = 2.0**40


def check_prototype_values(prototypes: torch.Tensor) -> None:
    """Finite entries of magnitude at most :data:`MAX_PROTOTYPE_MAGNITUDE`, or a whole row of NaN
    for a class never predicted; not every row NaN. Reads one number back (on CUDA: one
    synchronisation)."""
    nan_rows = torch.isnan(prototypes).all(dim=1)
    not_finite = ~(torch.isfinite(prototypes) | nan_rows[:, None]).all()
    too_large = (prototypes.abs() > MAX_PROTOTYPE_MAGNITUDE).any()  # NaN compares False
    status = int(not_finite.to(torch.int8) + 2 * nan_rows.all().to(torch.int8) + 4 * too_large.to(torch.int8))
    if status & 1:
        raise ValueError(
            "prototypes: entries must be finite; a row of NaN marks a class that is never predicted"
        )
    if status & 2:
        raise ValueError("prototypes: every row is NaN, so no class could be predicted")
    if status & 4:
        raise ValueError(f"prototypes: entries must be at most {MAX_PROTOTYPE_MAGNITUDE:.4g} in magnitude "
                         "(prototypes are probability vectors; larger ones overflow the float32 distances)")


OUTPUTS = ("labels", "scores")


def check_deterministic(deterministic) -> None:
    if deterministic is not None and not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected None or a bool, got {deterministic!r}")


def check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def check_label_dtype(label_dtype, num_classes: int) -> None:
    if label_dtype not in LABEL_DTYPES:
        raise TypeError(
            f"label_dtype: expected one of torch.int64, torch.int32, torch.uint8, got {label_dtype!r}"
        )
    if label_dtype == torch.uint8 and num_classes > 256:
        raise ValueError(f"label_dtype: torch.uint8 holds at most 256 classes, got C={num_classes}")
