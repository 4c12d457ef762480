"""The prepared device check: ``python -m benchmarks.gpu_check OUTDIR`` (or ``bash benchmarks/gpu_check.sh OUTDIR``).

On a CUDA machine (NVIDIA, or AMD through a ROCm build of PyTorch) with no network, in one call and
within 8 minutes on an H200:

1. the kernel tests on CUDA tensors (labels equal to the oracle's, deterministic mode bit-stable);
2. the benchmark suite on CUDA (``benchmarks/run.py``): copy bandwidth, and the stats, predict and
   calibrate passes of the Triton kernels, the eager reference and ``torch.compile`` of the
   reference, on Cityscapes N=1 and N=4, ADE20K and the upsampling workloads, fp32 and fp16;
3. ``ncu --clock-control none`` on the stats and predict kernels when ncu works: achieved DRAM
   throughput, registers, occupancy; on ROCm, ``rocprofv3 --kernel-trace --stats`` when present:
   each kernel's calls and durations;
4. the bandwidth model's predictions for the same kernels on the device modelled for this GPU's
   target (H200, MI300X, MI250X), to set beside what was measured.

Everything goes under OUTDIR; the summary table is printed last. The exit status is 1 when a
check fails (a test, a step that crashed or ran out of time), with the reason; performance goals
are reported as met or missed, not failed.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

DEADLINE_S = 470  # the whole check, on an H200: leaves room in an 8-minute budget
KERNEL_TESTS = ["tests/test_kernel_stats.py", "tests/test_kernel_predict.py", "tests/test_scores.py",
                "tests/test_confidence_power.py", "tests/test_counts.py", "tests/test_upsample.py"]
# every test of the two kernel modules, and the Triton cases of the modules that test every backend
KERNEL_SELECTION = "test_kernel_stats or test_kernel_predict or triton"
NCU_METRICS = ["dram__throughput.avg.pct_of_peak_sustained_elapsed", "launch__registers_per_thread",
               "sm__warps_active.avg.pct_of_peak_sustained_active", "gpu__time_duration.sum"]
GOAL_FRACTION_OF_COPY = 0.85


@dataclass
class Step:
    name: str
    ok: bool
    detail: str


def run_step(name: str, command: list[str], out_dir: str, timeout: float, env=None) -> Step:
    """Run ``command``, its output into OUTDIR/<name>.log; a crash or a time-out fails the step."""
    log = os.path.join(out_dir, f"{name}.log")
    start = time.perf_counter()
    try:
        with open(log, "w") as f:
            code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=max(1, timeout),
                                  env={**os.environ, **(env or {})}).returncode
    except subprocess.TimeoutExpired:
        return Step(name, False, f"ran past {timeout:.0f} s (see {log})")
    seconds = time.perf_counter() - start
    return Step(name, code == 0, f"exit {code} in {seconds:.0f} s (see {log})")


def summary_rows(results: dict) -> list[dict]:
    """From ``benchmarks/run.py``'s results.json: one row per Triton pass with GB/s, % of copy,
    and its speed-up over the eager reference and over torch.compile of the reference."""
    rows = results["rows"]
    seconds = {(r["workload"], r["dtype"], r["pass_name"], r["provider"]): r["seconds"] for r in rows}
    out = []
    for r in rows:
        if r["provider"] != "triton":
            continue
        key = (r["workload"], r["dtype"], r["pass_name"])
        eager, compiled = seconds.get((*key, "reference")), seconds.get((*key, "compile"))
        materialised = seconds.get((*key, "interpolate+triton"))
        out.append({"workload": r["workload"], "dtype": r["dtype"], "pass": r["pass_name"],
                    "ms": r["seconds"] * 1e3, "gbps": r["gbps"], "copy": r.get("fraction_of_copy"),
                    "eager": eager / r["seconds"] if eager else None,
                    "compile": compiled / r["seconds"] if compiled else None,
                    "materialised": materialised / r["seconds"] if materialised else None})
    return out


def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def summary_table(rows: list[dict]) -> str:
    lines = ["| workload | dtype | pass | ms | GB/s | % of copy | x eager | x compile | x interpolate-then | goal |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        goal = "" if r["copy"] is None else ("met" if r["copy"] >= GOAL_FRACTION_OF_COPY else "missed")
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['pass']} | {r['ms']:.3f} | {r['gbps']:.0f} "
                     f"| {_fmt(r['copy'], '.0%')} | {_fmt(r['eager'], '.1f')} | {_fmt(r['compile'], '.1f')} "
                     f"| {_fmt(r['materialised'], '.2f')} | {goal} |")
    return "\n".join(lines) + "\n"


def parse_ncu_csv(text: str) -> list[dict]:
    """Rows of ``ncu --csv`` output (lines before the header are ncu's own messages)."""
    start = text.find('"ID"')
    if start < 0:
        return []
    return list(csv.DictReader(io.StringIO(text[start:])))


def ncu_table(rows: list[dict]) -> str:
    lines = ["| kernel | metric | value |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.get('Kernel Name', '')[:40]} | {r.get('Metric Name', '')} "
                     f"| {r.get('Metric Value', '')} {r.get('Metric Unit', '')} |")
    return "\n".join(lines) + "\n"


def parse_rocprof_stats(text: str) -> list[dict]:
    """Rows of rocprofv3's kernel statistics CSV (``Name``, ``Calls``, ``AverageNs``, ...)."""
    return list(csv.DictReader(io.StringIO(text)))


def rocprof_table(rows: list[dict]) -> str:
    lines = ["| kernel | calls | average (us) |", "|---|---:|---:|"]
    for r in rows:
        microseconds = float(r.get("AverageNs", "nan")) / 1e3
        lines.append(f"| {r.get('Name', '')[:40]} | {r.get('Calls', '')} | {microseconds:.1f} |")
    return "\n".join(lines) + "\n"


def modelled_device(torch):
    """The bandwidth model's device for this GPU's configuration table (the H200 by default)."""
    from benchmarks import bandwidth_model
    from fastcal.kernels import configs

    target = configs.target_of(torch.device("cuda")).name
    return next((d for d in bandwidth_model.DEVICES.values() if d.target == target), bandwidth_model.H200)


def ncu_target() -> None:
    """What ncu profiles: one stats and one predict launch on a Cityscapes-like float32 image."""
    import torch

    import fastcal

    logits = 3 * torch.randn(1, 19, 1024, 2048, device="cuda")
    S, W = fastcal.prototype_stats(logits, backend="triton")
    fastcal.predict(logits, fastcal.prototypes_from_stats(S, W), backend="triton")
    torch.cuda.synchronize()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", help="folder for every log, table and result")
    parser.add_argument("--ncu-target", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--skip-tests", action="store_true", help="leave out the kernel tests")
    args = parser.parse_args(argv)
    if args.ncu_target:
        ncu_target()
        return 0
    if not args.out_dir:
        parser.error("OUTDIR is required")
    import torch

    os.makedirs(args.out_dir, exist_ok=True)
    deadline = time.perf_counter() + DEADLINE_S
    if not torch.cuda.is_available():
        print("gpu_check: FAILED: no CUDA device is visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 1
    python = sys.executable
    runtime = f"ROCm {torch.version.hip}" if getattr(torch.version, "hip", None) else f"CUDA {torch.version.cuda}"
    environment = (f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
                   f"triton {__import__('triton').__version__}; {runtime}")
    with open(os.path.join(args.out_dir, "environment.txt"), "w") as f:
        f.write(environment + "\n")
    steps = []
    if not args.skip_tests:
        # -x: a wrong kernel stops the tests early and leaves the time to the measurements
        steps.append(run_step("kernel-tests", [python, "-m", "pytest", "-x", "-q", "-o", "addopts=",
                                               "-p", "no:cacheprovider",
                                               "-k", KERNEL_SELECTION, *KERNEL_TESTS], args.out_dir,
                              min(150, deadline - time.perf_counter())))
    bench_dir = os.path.join(args.out_dir, "bench")
    steps.append(run_step("benchmarks", [python, "-m", "benchmarks.run", "--out", bench_dir], args.out_dir,
                          deadline - time.perf_counter() - 60))
    ncu, rocprof = shutil.which("ncu"), shutil.which("rocprofv3")
    ncu_text = ""
    if rocprof and not ncu and deadline - time.perf_counter() > 30:
        trace_dir = os.path.join(args.out_dir, "rocprof")
        command = [rocprof, "--kernel-trace", "--stats", "-d", trace_dir, "-o", "run", "--",
                   python, "-m", "benchmarks.gpu_check", "--ncu-target"]
        step = run_step("rocprofv3", command, args.out_dir, deadline - time.perf_counter() - 20)
        found = [os.path.join(root, name) for root, _, names in os.walk(trace_dir) for name in names
                 if name.endswith("kernel_stats.csv")]
        if step.ok and found:
            rows = [r for r in parse_rocprof_stats(open(found[0]).read())
                    if "_stats_kernel" in r.get("Name", "") or "_predict_kernel" in r.get("Name", "")]
            ncu_text = rocprof_table(rows)
        steps.append(Step("rocprofv3", True, step.detail + ("" if step.ok else " (rocprofv3 did not work here: "
                                                                               "not a failure)")))
    elif ncu and deadline - time.perf_counter() > 30:
        command = [ncu, "--clock-control", "none", "--csv", "-k", "regex:_stats_kernel|_predict_kernel",
                   "--metrics", ",".join(NCU_METRICS), python, "-m", "benchmarks.gpu_check", "--ncu-target"]
        step = run_step("ncu", command, args.out_dir, deadline - time.perf_counter() - 20)
        ncu_text = ncu_table(parse_ncu_csv(open(os.path.join(args.out_dir, "ncu.log")).read())) if step.ok else ""
        steps.append(Step("ncu", True, step.detail + ("" if step.ok else " (ncu did not work here: not a failure)")))
    else:
        steps.append(Step("profiler", True, "not run (neither ncu nor rocprofv3 found, or no time left)"))

    from benchmarks import bandwidth_model

    try:
        device = modelled_device(torch)
        model_text = bandwidth_model.markdown(bandwidth_model.table(device=device), device)
    except Exception as error:  # the model is a prediction: its failure is reported, not fatal
        model_text = f"(the bandwidth model could not be computed here: {error!r})\n"
    results_path = os.path.join(bench_dir, "results.json")
    table = ""
    if os.path.exists(results_path):
        with open(results_path) as f:
            table = summary_table(summary_rows(json.load(f)))
    report = [f"# fastcal GPU check\n\n{environment}\n", "## Steps\n"]
    report += [f"- {s.name}: {'ok' if s.ok else 'FAILED'}: {s.detail}" for s in steps]
    report += ["", "## Bandwidth model (predictions)\n", model_text]
    if ncu_text:
        report += ["## ncu\n" if ncu else "## rocprofv3\n", ncu_text]
    report += ["## Summary (Triton passes)\n", table or "(no benchmark results)\n"]
    text = "\n".join(report)
    with open(os.path.join(args.out_dir, "report.md"), "w") as f:
        f.write(text)
    print(text)
    failed = [s for s in steps if not s.ok]
    if failed or not table:
        print(f"gpu_check: FAILED: {', '.join(s.name for s in failed) or 'no benchmark results'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
