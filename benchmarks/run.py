"""One command for the whole benchmark suite: ``python -m benchmarks.run [--out DIR] [--doc FILE]``.

Runs the pytest-benchmark rows of ``benchmarks/test_bench.py`` (GPU rows too when CUDA
is present), measures peak memory, and writes ``DIR/results.json`` (every figure) and
``DIR/results.md`` (the tables, and the bandwidth model's predictions for the Triton kernels
on each GPU it models, ``benchmarks/bandwidth_model.py``). ``--doc docs/benchmarks.md`` writes
the same tables into the project's benchmark page, under its fixed introduction: a rerun edits
no prose by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import pytest
import torch

from benchmarks.memory import measure_in_fresh_process
from benchmarks.workloads import LIMIT_SUFFIX, cases

GIB = 1 << 30


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def run_benchmarks(out_dir: str) -> list[dict]:
    raw = os.path.join(out_dir, "pytest-benchmark.json")
    here = os.path.dirname(os.path.abspath(__file__))
    code = pytest.main([os.path.join(here, "test_bench.py"), "-q", "-p", "no:cacheprovider", "--benchmark-enable",
                        f"--benchmark-json={raw}", "--benchmark-columns=median,rounds",
                        "--benchmark-sort=name", "-o", "addopts="])
    if code != 0:
        raise SystemExit(f"benchmark run failed (pytest exit code {code})")
    with open(raw) as f:
        return [{**b["extra_info"], "seconds": b["stats"]["median"]} for b in json.load(f)["benchmarks"]]


def add_memory(rows: list[dict]) -> None:
    if torch.cuda.is_available():
        return  # measured inside the benchmark
    wanted: dict[tuple, list[str]] = {}
    for r in rows:
        if r["provider"] in ("torch", "torch-ops", "reference", "interpolate+torch", "interpolate+torch-ops"):
            wanted.setdefault((r["workload"], r["dtype"], r["provider"]), []).append(r["pass_name"])
    for (workload, dtype, provider), passes in wanted.items():
        print(f"memory: {workload} {dtype} {provider} ...", flush=True)
        peaks = measure_in_fresh_process(workload, dtype, provider, passes)
        for r in rows:
            if (r["workload"], r["dtype"], r["provider"]) == (workload, dtype, provider):
                r["peak_bytes"] = peaks[r["pass_name"]]


def derive(rows: list[dict]) -> None:
    copy = {(r["workload"], r["dtype"]): r for r in rows if r["provider"] == "copy"}
    ref = {(r["workload"], r["dtype"], r["pass_name"]): r for r in rows if r["provider"] == "reference"}
    exp = {(r["workload"], r["dtype"]): r for r in rows if r["provider"] == "exp"}
    materialised = {(r["workload"], r["dtype"], r["pass_name"], r["provider"].split("+", 1)[1]): r
                    for r in rows if r["provider"].startswith("interpolate+")}
    by_provider = {(r["workload"], r["dtype"], r["pass_name"], r["provider"]): r for r in rows}
    for r in rows:
        r["gbps"] = r["bytes"] / r["seconds"] / 1e9
        r["mpix_per_s"] = r["pixels"] / r["seconds"] / 1e6
        key = (r["workload"], r["dtype"])
        if key in copy:
            r["fraction_of_copy"] = r["gbps"] / copy[key]["gbps"]
        finite = by_provider.get((*key, r["pass_name"], r["provider"].removesuffix(LIMIT_SUFFIX)))
        if r["provider"].endswith(LIMIT_SUFFIX) and finite is not None:
            r["times_finite"] = r["seconds"] / finite["seconds"]
        if r["provider"].startswith("onnx") and (*key, r["pass_name"], "onnx-argmax") in by_provider:
            r["times_argmax_head"] = r["seconds"] / by_provider[(*key, r["pass_name"], "onnx-argmax")]["seconds"]
        if (*key, r["pass_name"]) in ref:
            r["speedup_vs_reference"] = ref[(*key, r["pass_name"])]["seconds"] / r["seconds"]
        if key in exp and r["provider"] not in ("copy", "exp"):
            r["times_exp"] = r["seconds"] / exp[key]["seconds"]
        if (*key, r["pass_name"], r["provider"]) in materialised:
            r["speedup_vs_materialised"] = materialised[(*key, r["pass_name"], r["provider"])]["seconds"] / r["seconds"]
        if "peak_bytes" in r:
            r["peak_over_logits"] = r["peak_bytes"] / bytes_of_logits(r)


def bytes_of_logits(r: dict) -> int:
    from benchmarks.workloads import DTYPES, WORKLOADS

    w = WORKLOADS[r["workload"]]
    return w.input_pixels * w.num_classes * DTYPES[r["dtype"]].itemsize


def fmt(value, spec: str, missing: str = "") -> str:
    return missing if value is None else format(value, spec)


def markdown(rows: list[dict], left_out: list, seconds: float) -> str:
    lines = [f"Machine: {machine()}. Suite time: {seconds:.0f} s.", "",
             "| workload | dtype | pass | provider | time (ms) | Mpixel/s | GB/s | % of copy | x reference "
             "| x exp | x interpolate-then | x T = 1 | x argmax head | peak above input (MiB) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    order = {"copy": 0, "exp": 1, "triton": 2, "triton@inf": 2.5, "interpolate+triton": 3, "torch": 4, "torch@inf": 4.5,
             "interpolate+torch": 5, "torch-ops": 6, "interpolate+torch-ops": 7, "compile": 8, "onnx": 9,
             "onnx@inf": 9.5, "onnx-argmax": 10, "reference": 11}
    passes = {"copy": 0, "exp": 0, "stats": 1, "predict": 2, "calibrate": 3}
    for r in sorted(rows, key=lambda r: (r["workload"], r["dtype"], passes[r["pass_name"]], order[r["provider"]])):
        lines.append(
            f"| {r['workload']} | {r['dtype']} | {r['pass_name']} | {r['provider']} | {r['seconds'] * 1e3:.1f} "
            f"| {r['mpix_per_s']:.3g} | {r['gbps']:.1f} | {fmt(r.get('fraction_of_copy'), '.0%')} "
            f"| {fmt(r.get('speedup_vs_reference'), '.1f')} | {fmt(r.get('times_exp'), '.2f')} "
            f"| {fmt(r.get('speedup_vs_materialised'), '.2f')} | {fmt(r.get('times_finite'), '.2f')} "
            f"| {fmt(r.get('times_argmax_head'), '.2f')} "
            f"| {fmt(r.get('peak_bytes') and r['peak_bytes'] / 2**20, '.1f')} |")
    if left_out:
        lines += ["", "Not run on this device:"] + [f"- {what}: {why}" for what, why in left_out]
    return "\n".join(lines) + "\n"


DOC_INTRO = """# Benchmarks

This page is written by `python -m benchmarks.run --doc docs/benchmarks.md`; rerun it to refresh
every table below (about 5 minutes on a 2-core CPU machine).

One pytest-benchmark row per (workload, dtype, pass, provider): the stats pass, the predict pass
and `calibrate`; providers are the eager `reference`, the default CPU path (`torch`: the fused
Numba loops), PyTorch operations a chunk at a time (`torch-ops`), `torch.compile` of the
reference (`compile`), on CUDA the Triton kernels (`triton`), `interpolate+...` for
`F.interpolate` then the same pass where the logits come at the model's resolution, and `onnx`
for the exported calibration head in ONNX Runtime (CPU execution provider, worker threads not
spinning; `fastcal.export`, default layout) beside `onnx-argmax`, the argmax-only head of the
same logits (with the same `Resize` when upsampled) that a deployment without calibration runs.
A provider ending in `@inf` runs at the limit `temperature=math.inf` (with the limit's own
prototypes); "x T = 1" divides its time by the same provider's at T = 1, "x argmax head" an
ONNX head's time by the argmax-only head's.
GB/s follow the bytes model of `docs/design.md` (stats reads the logits once, predict reads them
and writes int64 labels, calibrate both); "% of copy" compares with a copy of the same logits
measured in the same run; "x exp" with one elementwise `torch.exp` over the same logits into a
preallocated tensor. Peak memory above the input is the resident-set high-water mark of a fresh
process per provider (CPU) or the allocator's peak (CUDA). On CPU the slow providers run on the
Cityscapes N=1 image only; the list under the table says what was left out.

The bandwidth-model tables predict, for each GPU modelled, the share of copy bandwidth the
Triton kernels reach, from their compiled registers and tiles (see `docs/backends.md`); they are
predictions, compiled ahead of time without a GPU.

"""


def write_doc(path: str, table: str) -> None:
    with open(path, "w") as f:
        f.write(DOC_INTRO + "Output of `python -m benchmarks.run`:\n\n" + table)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out", help="folder for results.json and results.md")
    parser.add_argument("--doc", help="also write the tables into this page (docs/benchmarks.md)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    rows = run_benchmarks(args.out)
    add_memory(rows)
    derive(rows)
    _, left_out = cases("cuda" if torch.cuda.is_available() else "cpu")
    elapsed = time.perf_counter() - start
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"machine": machine(), "seconds": elapsed, "rows": rows, "left_out": left_out}, f, indent=1)
    table = markdown(rows, left_out, elapsed)
    from benchmarks import bandwidth_model  # the GPU kernels' predicted bandwidth, compiled ahead of time

    for device in bandwidth_model.DEVICES.values():
        table += "\n" + bandwidth_model.markdown(bandwidth_model.table(device=device), device)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    if args.doc:
        write_doc(args.doc, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
