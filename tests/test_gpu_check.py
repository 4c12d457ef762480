"""The prepared device check, on what a CPU machine can check: its arguments, its failure without a
GPU, and the code that turns results into its tables."""
import subprocess
import sys

from benchmarks import gpu_check


def test_outdir_is_required():
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], capture_output=True, text=True)
    assert result.returncode == 2 and "OUTDIR is required" in result.stderr


def test_without_cuda_it_fails_loudly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", str(tmp_path)], capture_output=True,
                            text=True, env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "FAILED: no CUDA device" in result.stderr


def test_shell_wrapper_needs_an_outdir():
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh"], capture_output=True, text=True)
    assert result.returncode != 0 and "usage: bash benchmarks/gpu_check.sh OUTDIR" in result.stderr


def test_summary_rows_and_table():
    base = {"workload": "cityscapes-n1", "dtype": "float32", "pass_name": "stats"}
    results = {"rows": [
        {**base, "provider": "triton", "seconds": 40e-6, "gbps": 4000.0, "fraction_of_copy": 0.9},
        {**base, "provider": "reference", "seconds": 4e-3},
        {**base, "provider": "compile", "seconds": 400e-6},
        {**base, "provider": "copy", "pass_name": "copy", "seconds": 1e-3},
        {**base, "workload": "ade20k", "provider": "triton", "seconds": 1e-3, "gbps": 1000.0,
         "fraction_of_copy": 0.5},
    ]}
    rows = gpu_check.summary_rows(results)
    assert len(rows) == 2
    first = rows[0]
    assert round(first["eager"]) == 100 and round(first["compile"]) == 10 and first["materialised"] is None
    table = gpu_check.summary_table(rows)
    assert "| cityscapes-n1 | float32 | stats | 0.040 | 4000 | 90% | 100.0 | 10.0 |  | met |" in table
    assert "| ade20k | float32 | stats | 1.000 | 1000 | 50% |  |  |  | missed |" in table


def test_ncu_csv_parsing():
    text = ('==PROF== Connected to process 1\n"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\n'
            '"0","_stats_kernel","dram__throughput.avg.pct_of_peak_sustained_elapsed","%","87.5"\n')
    rows = gpu_check.parse_ncu_csv(text)
    assert rows[0]["Kernel Name"] == "_stats_kernel" and rows[0]["Metric Value"] == "87.5"
    expected = "| _stats_kernel | dram__throughput.avg.pct_of_peak_sustained_elapsed | 87.5 % |"
    assert expected in gpu_check.ncu_table(rows)
    assert gpu_check.parse_ncu_csv("ncu: no kernels were profiled") == []


def test_rocprofv3_stats_parsing():
    """rocprofv3 --stats writes one row per kernel: name, calls, durations in nanoseconds."""
    text = ('"Name","Calls","TotalDurationNs","AverageNs","Percentage","MinNs","MaxNs","StdDev"\n'
            '"_stats_kernel","2","1200000","600000.0","60.0","590000","610000","10000.0"\n'
            '"_predict_kernel","1","800000","800000.0","40.0","800000","800000","0"\n')
    rows = gpu_check.parse_rocprof_stats(text)
    assert [r["Name"] for r in rows] == ["_stats_kernel", "_predict_kernel"]
    table = gpu_check.rocprof_table(rows)
    assert "| _stats_kernel | 2 | 600.0 |" in table and "| _predict_kernel | 1 | 800.0 |" in table


def test_the_modelled_device_follows_the_target(monkeypatch):
    """The report's bandwidth model is the one of this GPU's configuration table."""
    import torch

    from benchmarks import bandwidth_model
    from fastcal.kernels import configs

    for target, device in (("sm_90", "H200"), ("gfx942", "MI300X"), ("gfx90a", "MI250X")):
        monkeypatch.setattr(configs, "target_of", lambda _device, t=target: configs.TARGETS[t])
        assert gpu_check.modelled_device(torch) is bandwidth_model.DEVICES[device]
