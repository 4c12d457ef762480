"""The exported head where users deploy it: ``python -m benchmarks.deploy [--out docs/deploy.md]``.

ONNX Runtime's CPU execution provider and OpenVINO's CPU plugin against fastcal itself, on the
logits of one Cityscapes frame (1x19x1024x2048 float32) and on the same frame's logits at the
model's resolution (1x19x256x512) upsampled to 1024x2048 on the way:

- ``fastcal``: ``LabelCalibrator.predict`` (the fused CPU loops; ``size=`` upsamples on the fly);
- ``head channels_last`` / ``head nchw``: the exported calibration head in its two layouts
  (``fastcal.export.calibration_head``), ONNX Runtime's defaults except worker threads that do not
  spin (a spinning pool slows whatever runs next);
- ``argmax``: the argmax-only head of the same logits (``Resize`` then ``ArgMax`` when upsampled),
  what a deployment without calibration runs;
- ``... T = inf``: the same at the limit ``temperature=math.inf`` (a calibrator of its own);
- ``openvino ...``: the same ONNX files in OpenVINO's CPU plugin with
  ``INFERENCE_PRECISION_HINT="f32"`` (its default on CPUs with bfloat16 changes labels);
- the default head again under other session settings: one intra-op thread, and each graph
  optimisation level, to say which settings matter.

Each provider is timed in a block of its own (best of ``--rounds`` rounds of ``--calls`` calls),
with a pause between blocks, and the ratios come from the same run. ``--out`` writes the table
as Markdown.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time

import torch

import fastcal
from benchmarks.workloads import ArgmaxHead, onnx_session
from fastcal.export import calibration_head

C = 19
FULL, SMALL = (1024, 2048), (256, 512)


def best_ms(call, rounds: int, calls: int) -> float:
    call()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls)
    return min(times) * 1e3


def openvino_call(module: torch.nn.Module, example: torch.Tensor, logits: torch.Tensor):
    """The module exported to ONNX and compiled by OpenVINO's CPU plugin in float32."""
    import openvino

    from fastcal.export import export_onnx

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "head.onnx")
        export_onnx(module, example, path)
        compiled = openvino.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    x = logits.numpy()
    return lambda: request.infer([x])


def providers(calibrator: fastcal.LabelCalibrator, limit: fastcal.LabelCalibrator, logits: torch.Tensor,
              resize: dict):
    """``(name, call)`` per provider; the sessions are built (exported) here, before any timing."""
    example = torch.zeros(2, C, 16, 16)
    feed = {"input": logits.numpy()}

    def session_call(module, **options):
        session = onnx_session(module, example, **options)
        return lambda: session.run(None, feed)

    head = calibration_head(calibrator, **resize)
    nchw = calibration_head(calibrator, layout="nchw", **resize)
    limit_head = calibration_head(limit, **resize)
    limit_nchw = calibration_head(limit, layout="nchw", **resize)
    yield "fastcal", lambda: calibrator.predict(logits, **resize)
    yield "head channels_last", session_call(head)
    yield "head nchw", session_call(nchw)
    yield "argmax", session_call(ArgmaxHead(resize))
    yield "fastcal T = inf", lambda: limit.predict(logits, **resize)
    yield "head channels_last T = inf", session_call(limit_head)
    yield "head nchw T = inf", session_call(limit_nchw)
    yield "openvino head channels_last", openvino_call(head, example, logits)
    yield "openvino head nchw", openvino_call(nchw, example, logits)
    yield "openvino argmax", openvino_call(ArgmaxHead(resize), example, logits)
    yield "openvino head channels_last T = inf", openvino_call(limit_head, example, logits)
    yield "openvino head nchw T = inf", openvino_call(limit_nchw, example, logits)
    yield "head channels_last, 1 thread", session_call(head, threads=1)
    for level in ("disable", "basic", "extended"):
        yield f"head channels_last, optimisation {level}", session_call(head, level=level)


def measure(rounds: int, calls: int, pause: float) -> list[tuple[str, str, float]]:
    torch.manual_seed(0)
    calibrator = fastcal.LabelCalibrator(C).update(torch.randn(2, C, 64, 128) * 3)
    limit = fastcal.LabelCalibrator(C, temperature=math.inf).update(torch.randn(2, C, 64, 128) * 3)
    rows = []
    for case, shape, resize in (("1x19x1024x2048", (1, C, *FULL), {}),
                                ("1x19x256x512 -> 1024x2048", (1, C, *SMALL), {"size": FULL})):
        logits = torch.randn(shape) * 3
        for name, call in list(providers(calibrator, limit, logits, resize)):
            time.sleep(pause)  # ONNX Runtime's pools settle; each provider runs in a block of its own
            rows.append((case, name, best_ms(call, rounds, calls)))
    return rows


def markdown(rows, seconds: float) -> str:
    lines = [f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__}, onnxruntime {_ort_version()}, openvino {_ov_version()}. "
             f"Run time: {seconds:.0f} s.", "",
             "| logits | provider | ms | x fastcal | x argmax head |", "|---|---|---:|---:|---:|"]
    by_case: dict = {}
    for case, name, ms in rows:
        by_case.setdefault(case, {})[name] = ms
    for case, found in by_case.items():
        for name, ms in found.items():
            lines.append(f"| {case} | {name} | {ms:.1f} | {ms / found['fastcal']:.2f} | {ms / found['argmax']:.2f} |")
    return "\n".join(lines) + "\n"


def _ov_version() -> str:
    import openvino

    return openvino.__version__


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


INTRO = """# The exported head in ONNX Runtime and OpenVINO

This page is written by `python -m benchmarks.deploy --out docs/deploy.md`; rerun it to refresh
the table. See the module docstring of `benchmarks/deploy.py` for what each row runs.

**Which layout.** The default, `layout="channels_last"`, is the fastest graph found for ONNX
Runtime's CPU provider: the classes move to the last axis once, by a matrix product that also
divides by the temperature (the runtime fuses the transpose into it), then `Softmax`, one
`MatMul` with the centring and bias folded into its weights, and `ArgMax`, all on the last
axis (docs/design.md, section 10). It takes logits of any rank (3-D volumes too).
`layout="nchw"` keeps the class axis where it is (softmax over axis 1, a centred 1x1
convolution): take it for TensorRT, which works NCHW; in ONNX Runtime it is more than ten
times slower (the table). TensorRT: keep the head in float32 (its scores are differences of
squared distances, which half precision rounds away), and expect its ArgMax to become a TopK
layer. The head computes in float32 whatever the input dtype (the cast is in the graph); ties
go to the lowest class.

**Session settings.** Keep ONNX Runtime's default thread count, one per physical core (the
"1 thread" rows), and its graph optimisation on: the upsampled head needs it to cancel the
transposes around its `Resize` (the "optimisation disable" rows); the levels from basic to all
differ by less than a shared machine's noise. Turn worker spinning off
(`session.intra_op.allow_spinning = "0"`) when anything else shares the cores: a spinning pool
slows what runs next. fastcal reads each logit once; a graph of standard operators passes over
them four times, which is the gap to the `fastcal` row.

**The limit T = inf.** A calibrator at `temperature=math.inf` exports as one product and an
ArgMax (no softmax): the `T = inf` rows. In the channels-last layout the centring is folded away
(each prototype sums to 0), so its products round at the scale of the raw logits; the `nchw`
layout centres the logits first (exact under a large common offset).

**OpenVINO.** The same ONNX file runs in OpenVINO's CPU plugin. Keep it in float32:
`core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})` (or
`EXECUTION_MODE_HINT="ACCURACY"`); by default the plugin computes in bfloat16 on CPUs that have
it and changes labels (the head's scores are differences of squared distances). Give OpenVINO
whichever layout its rows here measure faster; `tests/test_export.py` checks both layouts and an
upsampled head in OpenVINO against the calibrator.

"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the table as Markdown (docs/deploy.md)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between providers' blocks")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = measure(args.rounds, args.calls, args.pause)
    table = markdown(rows, time.perf_counter() - start)
    if args.out:
        with open(args.out, "w") as f:
            f.write(INTRO + "Output of `python -m benchmarks.deploy`:\n\n" + table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
