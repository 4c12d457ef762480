"""Host work per call: ``python -m benchmarks.overhead [--out FILE]``.

On 1x19x8x8 float32 logits the compute is negligible, so what a call costs is the host work in
front of the kernels: checks, planning, preparing the prototypes, assembling the launch. Printed,
side by side in one run (best of ``--repeat`` rounds of ``--number`` calls each):

1. Per backend that runs here, each public call and the ``fastcal.nn`` wrapper's forward, beside
   ``torch.softmax(x, 1).argmax(1)`` on the same logits, and their ratio, with the goal per call
   (for the backends ``"auto"`` picks). The calls take turns round after round, the baseline
   among them, so that a slow moment of the machine falls on all of them alike; the baseline is
   also timed alone, before them, and both ratios are shown. On a shared virtual machine single
   figures move by tens of percent from run to run: the best of many short rounds is kept.
2. The Triton path's host work up to the launch (no CUDA needed): the plan looked up, the
   prototypes' operands found, the launch arguments assembled; the kernel call itself replaced
   by a no-op (see :func:`triton_host_work`).
3. The CPU loops on one thread against the pool, by image size: whether a small call would gain
   from not waking the pool.

``--out FILE`` also writes the tables as Markdown (``docs/overhead.md``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import timeit

import torch

if not torch.cuda.is_available():  # the Triton launchers on CPU tensors, before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastcal
from fastcal.nn import LabelCalibration

SHAPE = (1, 19, 8, 8)
GOALS = {"predict": 3, "calibrate": 6, "prototype_stats": 4, "LabelCalibrator.update": 4,
         "LabelCalibrator.predict": 3}
TRITON_GOALS_US = {"predict": 30, "calibrate": 60}
DEFAULT_BACKENDS = ("torch (CPU loops)", "triton (CUDA)")  # what backend="auto" picks: the goals are theirs


def best_us(call, number: int, repeat: int) -> float:
    call()  # plans, compiles, fills the caches
    return min(timeit.repeat(call, number=number, repeat=repeat)) / number * 1e6


def interleaved_best_us(calls: dict, number: int, repeat: int) -> dict:
    """Best time of each call, the calls taking turns round after round, so that a slow moment of
    the machine falls on all of them alike (the ratios to the first call are what is compared)."""
    for call in calls.values():
        call()
    best = {name: float("inf") for name in calls}
    for _ in range(repeat):
        for name, call in calls.items():
            best[name] = min(best[name], timeit.timeit(call, number=number) / number * 1e6)
    return best


def public_calls(backend: str, x: torch.Tensor) -> dict:
    P = fastcal.prototypes_from_stats(*fastcal.prototype_stats(x, backend="reference"))
    calibrator = fastcal.LabelCalibrator(x.shape[1], backend=backend).update(x)
    updating = fastcal.LabelCalibrator(x.shape[1], backend=backend)
    wrapper = LabelCalibration(torch.nn.Identity(), x.shape[1], mode="offline", backend=backend)
    wrapper.fit([x], progress=False)
    return {
        "predict": lambda: fastcal.predict(x, P, backend=backend),
        "calibrate": lambda: fastcal.calibrate(x, backend=backend),
        "prototype_stats": lambda: fastcal.prototype_stats(x, backend=backend),
        "LabelCalibrator.update": lambda: updating.update(x),
        "LabelCalibrator.predict": lambda: calibrator.predict(x),
        "LabelCalibration.forward": lambda: wrapper(x),
    }


@contextlib.contextmanager
def launches_replaced_by_no_op():
    from fastcal.kernels import _launch

    call = _launch.Launch.__call__
    _launch.Launch.__call__ = lambda self: None
    try:
        yield
    finally:
        _launch.Launch.__call__ = call


def triton_host_work(number: int, repeat: int) -> dict:
    """The Triton passes' host work: plan lookup, prototypes' operands, launch arguments, for logits
    [1, 19, 8, 8] (predict, calibrate) and [1, 19, 256, 512] upsampled 4x (calibrate), with every
    kernel call a no-op. The tensors are CPU tensors standing in for CUDA ones (a PyTorch operation
    on a small CPU tensor costs about what launching it on CUDA does on the host; meta tensors
    would time PyTorch's Python meta functions instead). The one read of calibrate is a CPU read
    here, a synchronisation on CUDA. On CUDA a caller's prototypes are prepared on every call (one
    launch of the operands kernel, nothing read back): "predict, prototypes prepared" times that
    path, which CPU tensors would not take (they compare the values with a kept copy instead)."""
    from fastcal import _ops, _plan, _triton

    rows = {}
    for name, shape, resize in (("predict", SHAPE, {}), ("calibrate", SHAPE, {}),
                                ("calibrate, upsampled 4x", (1, 19, 256, 512), {"scale_factor": 4})):
        z = torch.randn(shape)
        P = torch.eye(shape[1])
        if name == "predict":
            call = lambda z=z, P=P, resize=resize: fastcal.predict(z, P, backend="triton", **resize)  # noqa: E731
        else:
            call = lambda z=z, resize=resize: fastcal.calibrate(z, backend="triton", **resize)  # noqa: E731
        rows[name] = call
    z, P = torch.randn(SHAPE), torch.eye(SHAPE[1])

    def prepared_every_call():
        plan = _plan.plan("predict", z, prototypes=P, backend="triton")
        return _ops.predict_step(plan, z, P, _triton.prototype_operands(P))

    rows["predict, prototypes prepared"] = prepared_every_call
    with launches_replaced_by_no_op():
        return interleaved_best_us(rows, number, repeat)


def serial_crossover(number: int, repeat: int) -> list:
    """The CPU loops' predict and stats passes at 1x19xSxS on one thread and on the pool, side by
    side: whether small calls would gain from not waking the pool."""
    import numba

    rows = []
    threads = numba.get_num_threads()
    try:
        for side in (8, 16, 32, 64, 128):
            x = torch.randn(1, 19, side, side) * 3
            P = fastcal.prototypes_from_stats(*fastcal.prototype_stats(x))
            row = {"pixels": side * side}
            for mode, count in (("one thread", 1), ("pool", threads)):
                numba.set_num_threads(count)
                row[f"predict, {mode}"] = best_us(lambda x=x, P=P: fastcal.predict(x, P), number, repeat)
                row[f"stats, {mode}"] = best_us(lambda x=x: fastcal.prototype_stats(x), number, repeat)
            rows.append(row)
    finally:
        numba.set_num_threads(threads)
    return rows


def markdown(results: dict) -> str:
    lines = [f"Host work per call on {results['machine']}; logits {'x'.join(map(str, SHAPE))} float32; best of "
             f"{results['repeat']} x {results['number']} calls (`python -m benchmarks.overhead`).", ""]
    for backend, rows in results["calls"].items():
        base, alone = rows["softmax+argmax"], rows["softmax+argmax, alone"]
        goals = GOALS if backend in DEFAULT_BACKENDS else {}  # the reference reads like the paper, not fast
        lines += [f"**{backend}**: `torch.softmax(x, 1).argmax(1)` {base:.1f} µs taking turns with the calls "
                  f"below, {alone:.1f} µs alone", "",
                  "| call | µs | × softmax+argmax | × softmax+argmax alone | goal |", "|---|---:|---:|---:|---:|"]
        for name, value in rows.items():
            if name.startswith("softmax+argmax"):
                continue
            goal = goals.get(name)
            mark = "" if goal is None else f"≤ {goal}× ({'met' if value <= goal * base else 'not met'})"
            lines.append(f"| `{name}` | {value:.1f} | {value / base:.1f} | {value / alone:.1f} | {mark} |")
        lines.append("")
    lines += ["**Triton path, host work up to the launch** (kernel calls a no-op; CPU tensors stand in for "
              "CUDA ones)", "",
              "| pass | µs | goal |", "|---|---:|---:|"]
    for name, value in results["triton_host"].items():
        goal = TRITON_GOALS_US.get(name)
        mark = "" if goal is None else f"≤ {goal} µs ({'met' if value <= goal else 'not met'})"
        lines.append(f"| {name} | {value:.1f} | {mark} |")
    lines += ["", "**CPU loops: one thread or the pool** (1x19xSxS float32, µs a call)", "",
              "| pixels | predict, one thread | predict, pool | stats, one thread | stats, pool |",
              "|---:|---:|---:|---:|---:|"]
    for row in results["crossover"]:
        lines.append(f"| {row['pixels']} | {row['predict, one thread']:.0f} | {row['predict, pool']:.0f} | "
                     f"{row['stats, one thread']:.0f} | {row['stats, pool']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--number", type=int, default=100, help="calls a round (default 100)")
    parser.add_argument("--repeat", type=int, default=30, help="rounds; the best counts (default 30)")
    parser.add_argument("--out", help="also write the tables as Markdown to this file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(SHAPE) * 3
    backends = {"torch (CPU loops)": ("torch", x), "reference": ("reference", x)}
    if torch.cuda.is_available():
        backends["triton (CUDA)"] = ("triton", x.cuda())
    from benchmarks.run import machine

    results = {"machine": machine(),
               "number": args.number, "repeat": args.repeat, "calls": {}}
    for label, (backend, logits) in backends.items():
        baseline = lambda logits=logits: torch.softmax(logits, 1).argmax(1)  # noqa: E731
        alone = best_us(baseline, args.number, args.repeat)
        results["calls"][label] = interleaved_best_us({"softmax+argmax": baseline, **public_calls(backend, logits)},
                                                      args.number, args.repeat)
        results["calls"][label]["softmax+argmax, alone"] = alone
    results["triton_host"] = triton_host_work(args.number, args.repeat)
    results["crossover"] = serial_crossover(max(20, args.number // 5), max(5, args.repeat // 4))
    text = markdown(results)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
