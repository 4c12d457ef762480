"""Peak memory a pass needs above its input.

CUDA: the caching allocator's peak above what was allocated before the call.
CPU: the resident-set high-water mark (``VmHWM``) of a fresh process, reset with
``/proc/self/clear_refs`` right before the call, minus the resident set then. The
process runs with a fixed glibc mmap threshold and trims the heap before each
measurement, so memory freed by an earlier pass is returned to the system instead of
being reused unseen; a fresh process per provider and workload keeps one provider's
caches out of another's figure.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_above_input(fn, device: str) -> int:
    """Bytes of memory ``fn()`` needs above what is live before it."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def measure_in_fresh_process(workload: str, dtype: str, provider: str, passes: list[str]) -> dict:
    """``{pass: bytes}`` measured in a new Python process (CPU)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # big blocks: mmap, unmapped on free
    out = subprocess.run([sys.executable, "-m", "benchmarks.memory", workload, dtype, provider, *passes],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _main(workload: str, dtype: str, provider: str, *passes: str) -> None:
    from benchmarks.workloads import DTYPES, WORKLOADS, make_logits, pass_function, prototypes_for

    torch.set_num_threads(torch.get_num_threads())
    logits = make_logits(WORKLOADS[workload], DTYPES[dtype], "cpu")
    resize = WORKLOADS[workload].resize
    prototypes = prototypes_for(logits, resize)
    result = {}
    for pass_name in passes:
        fn = pass_function(provider, pass_name, logits, prototypes, resize)
        fn()  # first call: one-off allocations (thread pools, caches) are not the pass's memory
        result[pass_name] = peak_above_input(fn, "cpu")
    print(json.dumps(result))


if __name__ == "__main__":
    _main(*sys.argv[1:])
