import os
import sys
from pathlib import Path

import pytest
import torch  # importing torch does not import triton
from hypothesis import settings

# The suite draws the same property-test inputs on every run and machine; HYPOTHESIS_PROFILE=explore
# draws fresh ones (and more of them) to search for failures.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Without a GPU the Triton kernels run on CPU tensors in the interpreter; this must be
# set before triton is imported. With a GPU the kernel tests run the compiled kernels
# on CUDA tensors instead (see cases.KERNEL_DEVICE).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/test_benchmarks.py imports the benchmark package that sits beside tests/
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
