"""pytest-benchmark rows: every (workload, dtype, provider, pass) of ``workloads.cases``.

Run through ``python -m benchmarks.run``, which also measures memory and writes the tables.
"""
from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.memory import peak_above_input
from benchmarks.workloads import DTYPES, WORKLOADS, bytes_moved, cases, make_logits, pass_function, prototypes_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS, _ = cases(DEVICE)


@functools.lru_cache(maxsize=1)  # one input alive at a time: rows are ordered by workload and dtype
def inputs(workload: str, dtype: str):
    logits = make_logits(WORKLOADS[workload], DTYPES[dtype], DEVICE)
    return logits, prototypes_for(logits, WORKLOADS[workload].resize)


def synchronized(fn):
    if DEVICE != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("row", ROWS, ids=["-".join(r) for r in ROWS])
def test_pass(benchmark, row):
    workload, dtype, provider, pass_name = row
    logits, prototypes = inputs(workload, dtype)
    fn = synchronized(pass_function(provider, pass_name, logits, prototypes, WORKLOADS[workload].resize))
    slow = provider in ("reference", "compile") and DEVICE == "cpu"
    if provider == "compile":
        fn()  # compilation is not part of the pass
    benchmark.group = f"{workload} {dtype} {pass_name}"
    benchmark.extra_info.update(workload=workload, dtype=dtype, provider=provider, pass_name=pass_name,
                                pixels=WORKLOADS[workload].pixels,
                                bytes=bytes_moved(WORKLOADS[workload], DTYPES[dtype], pass_name),
                                device=DEVICE)
    benchmark.pedantic(fn, rounds=1 if slow else 15, iterations=1, warmup_rounds=0 if slow else 2)
    if DEVICE == "cuda":
        benchmark.extra_info["peak_bytes"] = peak_above_input(fn, "cuda")
