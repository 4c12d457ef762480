"""The examples run as a user would run them."""
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args):
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_wrapper_example_runs_every_mode():
    # the small model: the torchvision ones need torchvision's CUDA build beside a CPU torch
    out = run_example("wrap_segmentation_model.py", "--model", "small", "--size", "32")
    assert "model: small" in out
    assert out.count("batch ") == 3
    for mode in ("offline", "continual", "episodic"):
        assert f"{mode} " in out
    assert "labels (2, 32, 32)" in out
    assert "momentum=0.2, updates=3" in out and "after reset(): 0 updates" in out
