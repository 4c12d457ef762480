"""Plans: what a call will do, checked and resolved once from what its arguments look like.

A public call hands its arguments to :func:`plan`, which checks them (types, shapes, dtypes,
devices, option values: never a tensor's values) and resolves them into a :class:`Plan`: the
backend, the output shape and pixel count, the upsampling, the options in the form the op bodies
use. The op bodies trust the plan and check nothing again.

A plan depends only on the key of the call (the op; the logits' shape, strides, dtype and device;
those of ``valid`` and the prototypes; every option, with its type, so that ``True`` and ``1``
differ as the checks tell them apart; whether deterministic algorithms are on), so plans are kept
in a small cache (:data:`CACHE_SIZE` keys, least recently built dropped first), as Triton keeps
its launchers: a steady inference loop finds its plan and does no resolution work. Since the
checks depend on the key alone, a key found in the cache has passed them. A call whose options
cannot be keyed (a tensor temperature) is planned afresh each time.

A plan is immutable. The CPU backends keep their own preparations (the fused loops' walks, the
upsampling's row tables) beside it (:func:`fastcal._prepared.prepared`), built on first use and
gone with it, so they too are made once per key; the Triton launchers cache their launch layouts
in ``kernels/_layout.py``, by shape, strides and device. The backend comes from the one dispatch
point, :func:`fastcal._backends.resolve`. Nothing here reads a tensor's values: a plan can be
built for meta tensors (:func:`meta_plan`), and with it the Triton launches, without CUDA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from types import ModuleType

import torch

from . import _backends, _checks, _space, _upsample
from ._fifo import FifoCache

CACHE_SIZE = 64
# "own-predict": a calibrator predicting with its own prototypes, which need no check
OPS = ("stats", "predict", "own-predict", "calibrate", "calibrate-with-prototypes")


@dataclass(frozen=True, eq=False)
class Plan:
    op: str
    backend: ModuleType                 # the module of a row of fastcal._backends.TABLE
    num_classes: int
    upsample: _upsample.Upsample | None
    shape: tuple                        # [N, *spatial] of the labels (and of ``valid``)
    pixels: int                         # output pixels; 0: an empty batch, nothing to compute
    temperature: float
    deterministic: bool = False
    confidence_power: float = 1.0
    empty: str = "onehot"
    label_dtype: torch.dtype = torch.int64
    scores: bool = False
    requested_backend: str = "auto"     # the name the call gave, as the torch.library ops take it

    @property
    def resize(self) -> tuple:
        """``(size, scale_factor, align_corners)`` as the ``torch.library`` ops take them."""
        upsample = self.upsample
        if upsample is None:
            return None, None, False
        if upsample.scale_factor is not None:
            return None, list(upsample.scale_factor), upsample.align_corners
        return list(upsample.size), None, upsample.align_corners

    def output(self, device) -> torch.Tensor:
        """An uninitialised output of this call on ``device`` (see :func:`empty_output`)."""
        return empty_output(self.shape, self.num_classes, self.label_dtype, self.scores, device)


def empty_output(shape, num_classes: int, label_dtype: torch.dtype, scores: bool, device) -> torch.Tensor:
    """An uninitialised output for ``shape`` = [N, *spatial]: labels [N, *spatial] of ``label_dtype``, or
    float32 scores [N, C, *spatial] (also what the ``torch.library`` ops' fake implementations return)."""
    if scores:
        return torch.empty((shape[0], num_classes, *shape[1:]), dtype=torch.float32, device=device)
    return torch.empty(tuple(shape), dtype=label_dtype, device=device)


# a forked child plans afresh: its backends differ (no fused loops there)
_cache = FifoCache(CACHE_SIZE, forget_in_forked_child=True)


@dataclass(frozen=True)
class Options:
    """The options of one call as the caller gave them (unchecked: :func:`_build` checks them),
    one immutable value that is keyed, checked and read by name."""
    temperature: object = 1.0
    backend: object = "auto"
    deterministic: object = None
    confidence_power: object = 1.0
    empty: object = "onehot"
    label_dtype: object = torch.int64
    output: object = "labels"
    size: object = None
    scale_factor: object = None
    align_corners: object = False


def plan(op: str, logits, *, valid=None, prototypes=None, **given) -> Plan:
    """The checked plan of one call of ``op`` (one of :data:`OPS`) with the options ``given`` by
    name (the fields of :class:`Options`); raises the argument's error.

    Logits on the meta device are refused by the public calls; :func:`meta_plan` plans for them."""
    options = Options(**given)
    if options.deterministic is None and op not in ("predict", "own-predict"):
        options = replace(options, deterministic=torch.are_deterministic_algorithms_enabled())
    # traced once into the graph: nothing to keep, no lock to take; a meta plan is never kept either,
    # or a public call with meta logits would find it and pass the check that refuses them
    if torch.compiler.is_compiling() or _checks.meta_logits_are_allowed():
        return _build(op, logits, valid, prototypes, options)
    key = _key(op, logits, valid, prototypes, options)
    found = _cache.get(key) if key is not None else None
    if found is not None:
        return found
    built = _build(op, logits, valid, prototypes, options)
    if key is not None:
        _cache.put(key, built)
    return built


def meta_plan(op: str, logits: torch.Tensor, *, backend: str = "triton", **options) -> Plan:
    """The plan of ``op`` for meta-device logits, never cached: the launches of the Triton passes
    can then be built without CUDA (``tests/test_readback.py`` builds them). Checked as
    :func:`plan` checks, except that the logits may hold no values."""
    if logits.device.type != "meta":
        raise ValueError(f"logits: expected a meta tensor, got one on {logits.device}")
    with _checks.meta_logits_allowed():
        return plan(op, logits, backend=backend, **options)


_KEYABLE = (type(None), bool, int, float, str, torch.dtype)


def _frozen(options) -> tuple:
    """A hashable image of the options that keeps what the checks look at (each value's type and
    value, inside lists and tuples too); ``TypeError`` for what cannot be keyed (a tensor, NaN)."""
    frozen = []
    for value in options:
        kind = type(value)
        if kind is list or kind is tuple:
            value = tuple((type(v), v) for v in value)
            if any(k not in _KEYABLE or v != v for k, v in value):
                raise TypeError("cannot key this sequence")
        elif kind not in _KEYABLE or value != value:  # NaN is never equal to itself
            raise TypeError(f"cannot key {kind.__name__}")
        frozen.append((kind, value))
    return tuple(frozen)


def _signature(tensor):
    if tensor is None:
        return None
    if type(tensor) is not torch.Tensor or tensor.is_nested or tensor.layout != torch.strided:
        raise TypeError  # subclasses, other layouts, or not a tensor: planned afresh, and refused there
    return tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device


def _key(op, logits, valid, prototypes, options):
    try:
        return (op, _signature(logits), _signature(valid), _signature(prototypes),
                _frozen(getattr(options, f.name) for f in fields(options)))
    except TypeError:
        return None


def _build(op, logits, valid, prototypes, options: Options) -> Plan:
    """Every check of ``op``'s arguments, in the order the contract documents, then the
    resolution."""
    o = options
    stats, predicts = op in ("stats", "calibrate", "calibrate-with-prototypes"), op != "stats"
    if op.startswith("calibrate"):
        _checks.check_choice("empty", o.empty, _checks.EMPTY_POLICIES)
    _checks.check_logits(logits)
    confidence_power = _checks.check_confidence_power(o.confidence_power) if stats else o.confidence_power
    temperature = _checks.check_temperature(o.temperature)
    upsample = _upsample.resolve(logits, o.size, o.scale_factor, o.align_corners)
    shape = _upsample.output_shape(logits, upsample)
    C = logits.shape[1]
    if stats:
        _checks.check_valid(valid, logits, shape)
        _checks.check_deterministic(o.deterministic)
    if op == "calibrate-with-prototypes" and valid is not None:
        raise ValueError("valid: masks pixels out of the statistics, and with prototypes given there are "
                         "none to build (every pixel gets a label); drop valid or the prototypes")
    if op in ("predict", "calibrate-with-prototypes"):
        _checks.check_prototypes(prototypes, C, logits.device)
    if predicts:
        _checks.check_label_dtype(o.label_dtype, C)
        _checks.check_choice("output", o.output, _checks.OUTPUTS)
    _checks.check_choice("backend", o.backend, _backends.NAMES)
    module = _backends.resolve(o.backend, logits, _space.is_limit(temperature))
    return Plan(op=op, backend=module, num_classes=C, upsample=upsample, shape=tuple(shape),
                pixels=math.prod(shape), temperature=temperature, deterministic=bool(o.deterministic),
                confidence_power=float(confidence_power), empty=o.empty, label_dtype=o.label_dtype,
                scores=o.output == "scores", requested_backend=o.backend)
