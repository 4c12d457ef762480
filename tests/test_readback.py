"""What a call reads back to the host, on every backend (Triton in the interpreter).

On CUDA each number read back is a synchronisation: the device idles until the host has it, and no
CUDA graph can be captured around the call. Reads of a tensor's values go through the dispatcher
as ``aten._local_scalar_dense`` or ``aten.is_nonzero``, counted here under a ``TorchDispatchMode``;
conversions that bypass it (``.numpy()``, ``.tolist()``, ``.cpu()``, ``.item()`` called by fastcal's
own code) are recorded by wrapping those methods. The contract: ``predict`` (functional, with
prototypes it has seen, and the calibrator's) reads nothing; the stats passes (``calibrate``,
``prototype_stats``, ``LabelCalibrator.update``) read one number, the non-finite check.
"""
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcal
from fastcal import _backends, numba_backend

from cases import device_of, make_logits

READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}
CONVERSIONS = ("numpy", "tolist", "cpu", "item")


class Reads(TorchDispatchMode):
    """Counts the reads of tensor values, and records the conversions made by fastcal's code."""

    def __init__(self):
        super().__init__()
        self.reads = 0
        self.conversions = []
        self._originals = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.reads += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for name in CONVERSIONS:
            original = self._originals[name] = getattr(torch.Tensor, name)

            def recorded(tensor, *args, _name=name, _original=original, **kwargs):
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if caller.startswith("fastcal"):
                    self.conversions.append((_name, caller))
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, recorded)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


def host_only(conversions):
    """Conversions outside the one backend allowed a route to host memory (the table's
    ``host_memory`` row: numba_backend.host_array)."""
    return [c for c in conversions if c[1] not in _backends.HOST_MEMORY]


CALLS = {
    "predict": lambda z, P, cal: fastcal.predict(z, P, backend=cal.backend),
    "predict scores": lambda z, P, cal: fastcal.predict(z, P, backend=cal.backend, output="scores"),
    "calibrate with prototypes": lambda z, P, cal: fastcal.calibrate(z, P, backend=cal.backend),
    "upsampled predict": lambda z, P, cal: fastcal.predict(z, P, backend=cal.backend, size=(9, 11)),
    "LabelCalibrator.predict": lambda z, P, cal: cal.predict(z),
    "LabelCalibrator.predict upsampled": lambda z, P, cal: cal.predict(z, size=(9, 11)),
    "LabelCalibrator.reset": lambda z, P, cal: cal.reset(),
    "a new LabelCalibrator": lambda z, P, cal: fastcal.LabelCalibrator(5, backend=cal.backend),
}
ONE_READ = {
    "calibrate": lambda z, P, cal: fastcal.calibrate(z, backend=cal.backend),
    "calibrate skip": lambda z, P, cal: fastcal.calibrate(z, backend=cal.backend, empty="skip"),
    "calibrate upsampled": lambda z, P, cal: fastcal.calibrate(z, backend=cal.backend, size=(9, 11)),
    "prototype_stats": lambda z, P, cal: fastcal.prototype_stats(z, backend=cal.backend),
    "prototype_stats masked": lambda z, P, cal: fastcal.prototype_stats(
        z, backend=cal.backend, valid=torch.rand(z.shape[0], *z.shape[2:], device=z.device) < 0.5),
    "LabelCalibrator.update": lambda z, P, cal: cal.update(z),
    "LabelCalibrator.update upsampled": lambda z, P, cal: cal.update(z, size=(9, 11)),
}


@pytest.mark.parametrize("name", list(CALLS) + list(ONE_READ))
def test_reads_back_at_most_the_non_finite_check(backend, name):
    z = make_logits((2, 5, 6, 7), device=device_of(backend))
    cal = fastcal.LabelCalibrator(5, backend=backend, momentum=0.5).update(z)
    P = cal.prototypes
    call = {**CALLS, **ONE_READ}[name]
    call(z, P, cal)  # the first call plans, and checks the prototypes it has not seen before
    with Reads() as reads:
        for _ in range(2):
            call(z, P, cal)
    # the CPU loops count the non-finite pixels on the host: their stats passes may read nothing
    assert reads.reads <= (0 if name in CALLS else 2), f"{name}: {reads.reads} reads in two calls"
    assert host_only(reads.conversions) == [], reads.conversions


def test_the_cpu_loops_convert_cpu_tensors_only_through_host_array(monkeypatch):
    """The CPU loops read host memory by design; every conversion on their path goes through
    ``numba_backend.host_array``, which a CUDA tensor would never reach (it takes the Triton path)."""
    seen = []
    original = numba_backend.host_array
    monkeypatch.setattr(numba_backend, "host_array", lambda t: seen.append(t.device.type) or original(t))
    z = make_logits((2, 5, 6, 7))
    with Reads() as reads:
        fastcal.calibrate(z, backend="torch")
        fastcal.calibrate(z, backend="torch", size=(9, 11))
    assert seen and set(seen) == {"cpu"}
    assert host_only(reads.conversions) == []
    assert [c for c in reads.conversions if c[0] != "numpy"] == []


def test_a_new_or_modified_prototypes_tensor_is_checked_again():
    """The prototypes' values are checked when a tensor is first seen in its current state; a
    change in place (a new version) is seen, and an invalid value refused."""
    z = make_logits((1, 4, 5, 5))
    P = torch.eye(4)
    fastcal.predict(z, P)
    with Reads() as reads:
        fastcal.predict(z, P)
    assert reads.reads == 0
    P[1, 2] = float("inf")
    with pytest.raises(ValueError, match="prototypes: entries must be finite"):
        fastcal.predict(z, P)
    P[1, 2] = 0.0
    fastcal.predict(z, P)
    with torch.inference_mode():  # inference tensors keep no version counter: checked every call
        Q = torch.eye(4)
        fastcal.predict(z, Q)
        Q[0, 0] = float("nan")
        with pytest.raises(ValueError, match="prototypes: entries must be finite"):
            fastcal.predict(z, Q)


def test_triton_launches_are_built_on_meta_tensors_without_cuda(monkeypatch):
    """A plan for meta logits (``_plan.meta_plan``) builds every launch of the Triton passes with no
    CUDA and no values: the host work of a call, ending where a kernel would start."""
    from fastcal import _ops, _plan
    from fastcal._operands import distance_operands
    from fastcal.kernels import _launch

    launched = []
    monkeypatch.setattr(_launch.Launch, "__call__", lambda launch: launched.append(launch.kernel.__name__))
    z = torch.empty(2, 19, 16, 24, device="meta")
    calibrate_plan = _plan.meta_plan("calibrate", z, size=(32, 48))
    labels = _ops.calibrate_step(calibrate_plan, z, None)
    assert labels.is_meta and labels.shape == (2, 32, 48) and labels.dtype == torch.int64
    assert launched == ["_stats_kernel", "_operands_kernel", "_predict_kernel"]
    predict_plan = _plan.meta_plan("predict", z, prototypes=torch.empty(19, 19, device="meta"), output="scores")
    prototypes = torch.eye(19, device="meta")
    scores = _ops.predict_step(predict_plan, z, prototypes, distance_operands(prototypes))
    assert scores.is_meta and scores.shape == (2, 19, 16, 24)
    with pytest.raises(ValueError, match="logits: on the meta device"):  # still refused by the public calls
        fastcal.calibrate(z)
