import os
import sys
from pathlib import Path

import pytest
import torch  # importing torch does not import triton

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
