"""Sharing the CPU loops' compiled code between the suite's workers.

Each signature of the Numba loops (a logits dtype, with or without upsampling, a label dtype)
compiles in seconds, once per machine: afterwards every process loads it from Numba's cache on
disk. The workers of a parallel run (pytest-xdist) would each compile what their first tests
need, often the same signatures. Instead each worker compiles its share of every signature the
suite uses, then waits for the others' shares, so each signature compiles once, the shares in
parallel, and every later call loads it from the cache.
"""
from __future__ import annotations

import os
import time

import torch

import fastcal


def signatures():
    """Calls that between them compile every signature of the loops the tests reach."""
    calls = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for resize in ({}, {"size": (9, 11)}):
            few = (torch.randn(1, 5, 6, 7) * 3).to(dtype)
            many = (torch.randn(1, 40, 6, 7) * 3).to(dtype)  # beyond the fused nearest search
            P_few = fastcal.prototypes_from_stats(*fastcal.prototype_stats(few.float(), backend="reference"))
            P_many = fastcal.prototypes_from_stats(*fastcal.prototype_stats(many.float(), backend="reference"))
            calls.append(lambda z=few, r=resize: fastcal.calibrate(z, backend="numba", **r))
            for label_dtype in (torch.int32, torch.uint8):
                calls.append(lambda z=few, P=P_few, r=resize, d=label_dtype:
                             fastcal.predict(z, P, backend="numba", label_dtype=d, **r))
            calls.append(lambda z=many, P=P_many, r=resize: fastcal.predict(z, P, backend="numba", **r))
    for label_dtype in (torch.int32, torch.uint8):
        many = torch.randn(1, 40, 6, 7) * 3
        P_many = fastcal.prototypes_from_stats(*fastcal.prototype_stats(many, backend="reference"))
        calls.append(lambda z=many, P=P_many, d=label_dtype: fastcal.predict(z, P, backend="numba", label_dtype=d))
    return calls


def compile_share(worker: int, workers: int, meeting_place: str, timeout: float = 600.0) -> None:
    """Run this worker's share of :func:`signatures`, then wait until every worker has run its own
    (a file per worker in ``meeting_place``), so that later calls load the others' from the cache."""
    for index, call in enumerate(signatures()):
        if index % workers == worker:
            call()
    os.makedirs(meeting_place, exist_ok=True)
    open(os.path.join(meeting_place, f"compiled-{worker}"), "w").close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(os.path.exists(os.path.join(meeting_place, f"compiled-{w}")) for w in range(workers)):
            return
        time.sleep(0.2)
