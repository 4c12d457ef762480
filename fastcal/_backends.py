"""The backends as data, and the one dispatch point that chooses among them.

One row per name ``backend=`` takes. A row is either a backend, a module implementing the backend
interface (light to import: each defers Numba or Triton to its first call), or a choice: the rows it tries in
order, per device type, taking the first that can run the call. Everything that lists the
backends derives from :data:`TABLE`: the accepted names (:data:`NAMES`), the ``"auto"`` and
``"torch"`` rules, the tests' backend fixture (:data:`TESTED`), and the one backend allowed to
convert tensors to host memory (:data:`HOST_MEMORY`).

A backend module provides:

- ``can_run(logits, limit) -> bool``: whether it takes the call (the logits' device and class
  count, this process, the limit ``temperature=math.inf``), from shapes and devices alone;
- ``REQUIRES``: what it takes, for the error a call that names it gets otherwise;
- the passes :mod:`fastcal._ops` runs: ``stats_pass(logits, valid, plan)``,
  ``operands_pass(S, W, plan)``, ``predict_pass(logits, operands, plan)`` and
  ``scores_pass(logits, operands, plan)``; and ``prototype_operands``: None, or its own
  preparation of a caller's prototypes (the Triton backend's one launch).

Adding a backend: its module, one row here (and a place in a choice if ``"auto"`` should take
it); docs/design.md lists the rest.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

from . import _triton, numba_backend, reference, torch_ops


@dataclass(frozen=True)
class Backend:
    name: str
    module: ModuleType | None = None  # the implementing module; None for a choice among other rows
    choice: dict = field(default_factory=dict)  # device type (or "*") -> the rows tried, in order
    tested: bool = True           # run against the oracle by the tests' backend fixture
    host_memory: bool = False     # may convert tensors to host memory (its one route: numba_backend.host_array)


TABLE = (
    Backend("auto", choice={"cuda": ("triton", "torch-ops"), "*": ("numba", "torch-ops")}, tested=False),
    Backend("triton", _triton),
    Backend("torch", choice={"*": ("numba", "torch-ops")}),   # the CPU fast path
    Backend("numba", numba_backend, tested=False, host_memory=True),  # tested as "torch"
    Backend("torch-ops", torch_ops),
    Backend("reference", reference),
)
BY_NAME = {row.name: row for row in TABLE}
NAMES = tuple(BY_NAME)
TESTED = tuple(row.name for row in TABLE if row.tested)
HOST_MEMORY = tuple(row.module.__name__ for row in TABLE if row.host_memory)


def module_of(name: str) -> ModuleType:
    """The module of backend row ``name`` (not a choice)."""
    return BY_NAME[name].module


def resolve(name: str, logits, limit: bool = False) -> ModuleType:
    """The module that runs a call naming ``name`` (a checked name of :data:`NAMES`) on ``logits``
    at a finite temperature or the ``limit``: the row's own module, or a choice's first row that
    can run the call. A backend named directly that cannot run it raises ``ValueError``."""
    row = BY_NAME[name]
    if row.module is None:
        for candidate in row.choice.get(logits.device.type, row.choice["*"]):
            module = module_of(candidate)
            if module.can_run(logits, limit):
                return module
        raise AssertionError(f"backend {name!r}: its last choice must take every call")
    module = module_of(name)
    if not module.can_run(logits, limit):
        at = " at temperature=math.inf" if limit else ""
        raise ValueError(f"backend={name!r}: {module.REQUIRES}; got {logits.shape[1]} classes on "
                         f"{logits.device}{at} (use 'auto' or 'torch')")
    return module
