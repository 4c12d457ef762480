"""The benchmark suite's own machinery, on a tiny workload (the timings themselves are not tests)."""
import torch

from benchmarks import memory, run, workloads

import oracle

TINY = workloads.Workload("tiny", (2, 5, 8, 8))
TINY_UP = workloads.Workload("tiny-up", (1, 5, 6, 8), (24, 32), align_corners=True)


def test_providers_compute_what_they_claim():
    logits = workloads.make_logits(TINY, torch.float32, "cpu")
    prototypes = workloads.prototypes_for(logits)
    for provider in ("torch", "torch-ops", "reference"):
        labels = workloads.pass_function(provider, "calibrate", logits, prototypes)()
        assert torch.equal(labels, workloads.pass_function("reference", "predict", logits, prototypes)())
    onnx_labels = torch.from_numpy(workloads.pass_function("onnx", "predict", logits, prototypes)())
    oracle.assert_labels_match(onnx_labels, logits, prototypes)
    argmax = torch.from_numpy(workloads.pass_function("onnx-argmax", "predict", logits, prototypes)())
    assert torch.equal(argmax, logits.argmax(dim=1))
    assert torch.equal(workloads.pass_function("exp", "exp", logits, prototypes)(), logits.exp())
    assert torch.equal(workloads.pass_function("copy", "copy", logits, prototypes)(), logits)
    # the limit's rows (triton@inf on CUDA, in the interpreter here)
    at_limit = workloads.pass_function("reference@inf", "calibrate", logits, prototypes)()
    for provider in ("torch@inf", "triton@inf"):
        assert torch.equal(workloads.pass_function(provider, "calibrate", logits, prototypes)(), at_limit)


def test_upsampling_providers_compute_what_they_claim():
    logits = workloads.make_logits(TINY_UP, torch.float32, "cpu")
    prototypes = workloads.prototypes_for(logits, TINY_UP.resize)
    upsampled = oracle.interpolate(logits, (24, 32), align_corners=True)
    for provider in ("torch", "interpolate+torch", "torch-ops", "interpolate+torch-ops", "reference"):
        labels = workloads.pass_function(provider, "predict", logits, prototypes, TINY_UP.resize)()
        assert labels.shape == (1, 24, 32)
        oracle.assert_labels_match(labels, upsampled, prototypes, logit_error=1e-6 * float(logits.abs().max()))
    onnx_labels = torch.from_numpy(workloads.pass_function("onnx", "predict", logits, prototypes, TINY_UP.resize)())
    oracle.assert_labels_match(onnx_labels, upsampled, prototypes, logit_error=1e-6 * float(logits.abs().max()))
    argmax = torch.from_numpy(workloads.pass_function("onnx-argmax", "predict", logits, prototypes, TINY_UP.resize)())
    assert argmax.shape == (1, 24, 32)
    exp = workloads.pass_function("exp", "exp", logits, prototypes, TINY_UP.resize)()
    assert exp.shape == (1, 5, 24, 32)


def test_bytes_model_of_upsampling_counts_what_the_task_requires():
    logits_bytes = 5 * 48 * 4
    assert workloads.bytes_moved(TINY_UP, torch.float32, "stats") == logits_bytes
    assert workloads.bytes_moved(TINY_UP, torch.float32, "calibrate") == 2 * logits_bytes + 24 * 32 * 8
    assert workloads.bytes_moved(TINY_UP, torch.float32, "exp") == 2 * 5 * 24 * 32 * 4


def test_bytes_model():
    logits_bytes = 2 * 5 * 64 * 2
    assert workloads.bytes_moved(TINY, torch.float16, "stats") == logits_bytes
    assert workloads.bytes_moved(TINY, torch.float16, "predict") == logits_bytes + 2 * 64 * 8
    assert workloads.bytes_moved(TINY, torch.float16, "calibrate") == 2 * logits_bytes + 2 * 64 * 8


def test_cpu_rows_and_left_out_rows_cover_every_workload():
    rows, left_out = workloads.cases("cpu")
    assert {r[0] for r in rows} == set(workloads.WORKLOADS)
    assert all(r[2] in ("copy", "exp", "torch", "torch-ops", "reference", "compile", "interpolate+torch",
                        "interpolate+torch-ops", "onnx", "onnx-argmax", "torch@inf", "onnx@inf") for r in rows)
    assert left_out and all(reason for _, reason in left_out)


def test_torch_ops_provider_bypasses_the_fused_loops(monkeypatch):
    from fastcal import cpu_kernels

    logits = workloads.make_logits(TINY, torch.float32, "cpu")
    monkeypatch.setattr(cpu_kernels, "stats_chunk", None)  # would fail if called
    got = workloads.pass_function("torch-ops", "stats", logits, None)()
    expected = workloads.pass_function("reference", "stats", logits, None)()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_peak_memory_sees_an_allocation():
    size = 64 << 20
    peak = memory.peak_above_input(lambda: torch.ones(size // 4).sum(), "cpu")
    assert peak >= size // 2


def test_table_derivation():
    base = {"workload": "cityscapes-n1", "dtype": "float32", "pixels": 100}
    rows = [{**base, "provider": "copy", "pass_name": "copy", "bytes": 800, "seconds": 1.0},
            {**base, "provider": "exp", "pass_name": "exp", "bytes": 800, "seconds": 1.0},
            {**base, "provider": "reference", "pass_name": "stats", "bytes": 400, "seconds": 8.0},
            {**base, "provider": "interpolate+torch", "pass_name": "stats", "bytes": 400, "seconds": 5.0},
            {**base, "provider": "torch", "pass_name": "stats", "bytes": 400, "seconds": 2.0, "peak_bytes": 2 << 20}]
    run.derive(rows)
    fast = rows[-1]
    assert fast["speedup_vs_materialised"] == 2.5
    assert fast["speedup_vs_reference"] == 4.0 and fast["times_exp"] == 2.0
    assert fast["fraction_of_copy"] == 0.25
    table = run.markdown(rows, [("x", "why")], 1.0)
    assert "| cityscapes-n1 | float32 | stats | torch | 2000.0 |" in table and "- x: why" in table


def test_breakdown_steps_run():
    from benchmarks import breakdown

    logits = torch.randn(1, 19, 40, 50)
    fns = breakdown.steps(logits)
    assert "calibrate" in fns and "exp (one pass, the floor)" in fns
    for fn in fns.values():
        fn()
