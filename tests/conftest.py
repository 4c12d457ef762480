import os

# Triton kernels run on the CPU through the interpreter; this must be set before
# triton compiles anything, so it comes before every other import of the suite.
os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# tests/test_benchmarks.py imports the benchmark package that sits beside tests/
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
