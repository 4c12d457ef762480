import os

# Triton kernels run on the CPU through the interpreter; this must be set before
# triton compiles anything, so it comes before every other import of the suite.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
