"""Where the CPU path's time goes: ``python -m benchmarks.breakdown``.

Times each step of ``calibrate`` on one 1x19x1024x2048 float32 image, as the torch
backend runs it, interleaved with one ``torch.exp`` over the same logits (into a
preallocated tensor) so that every ratio comes from the same minutes of the machine.
Prints the median of ``--rounds`` rounds per step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import fastcal
from benchmarks.workloads import WORKLOADS, make_logits
from fastcal import _chunks, cpu_kernels, numba_backend


def steps(logits: torch.Tensor) -> dict:
    N, C = logits.shape[:2]
    z = logits.view(N, C, -1).numpy()
    L = z.shape[2]
    n = _chunks.CHUNK_ELEMENTS // C
    pieces = [(start, min(n, L - start)) for start in range(0, L, n)]
    prototypes = fastcal.prototypes_from_stats(*fastcal.prototype_stats(logits))
    A_times_minus_2, centre, bias = numba_backend._centred_on_host(prototypes.numpy())
    d = np.empty(C * n, np.float32)  # a chunk buffer, as the scores output uses
    labels = np.empty(L, np.int64)
    out = torch.empty_like(logits)
    no_mask = np.empty(0, np.uint8)
    plain = (0, cpu_kernels.NO_ROWS, cpu_kernels.NO_COLS)  # no upsampling

    def stats_loops():
        S = np.zeros((cpu_kernels.UNITS, C, C))
        W, N = np.zeros((cpu_kernels.UNITS, C)), np.zeros((cpu_kernels.UNITS, C))
        for start, m in pieces:
            cpu_kernels.stats_chunk(z, 0, start, m, np.float32(1), np.float32(1), no_mask, S, W, N, *plain)

    def softmax_loops():
        for start, m in pieces:
            cpu_kernels.centred_softmax_chunk(z, 0, start, m, np.float32(1), centre, d[:C * m].reshape(C, m),
                                              cpu_kernels.UNITS, *plain)

    def predict_loops():
        for start, m in pieces:
            cpu_kernels.predict_chunk(z, 0, start, m, np.float32(1), centre, A_times_minus_2, bias,
                                      labels[start:start + m], cpu_kernels.UNITS, *plain)

    return {
        "exp (one pass, the floor)": lambda: torch.exp(logits, out=out),
        "stats pass: stats_chunk": stats_loops,
        "predict pass: softmax alone": softmax_loops,
        "predict pass: predict_chunk": predict_loops,
        "prototype_stats (whole pass)": lambda: fastcal.prototype_stats(logits),
        "predict (whole pass)": lambda: fastcal.predict(logits, prototypes),
        "calibrate": lambda: fastcal.calibrate(logits),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    logits = make_logits(WORKLOADS["cityscapes-n1"], torch.float32, "cpu")
    fns = steps(logits)
    for fn in fns.values():
        fn()  # compile / load the loops, warm the caches
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    floor = statistics.median(times["exp (one pass, the floor)"])
    print(f"{'step':36} {'ms':>7} {'x exp':>6}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:36} {median * 1e3:7.1f} {median / floor:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
