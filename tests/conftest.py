import os

import pytest
import torch  # importing torch does not import triton
from hypothesis import settings

from fastcal import _backends  # imports no backend module: triton is imported after TRITON_INTERPRET

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


def _check_interpreter_numpy() -> None:
    """triton <= 3.7's interpreter fails under numpy >= 2.4 ("only 0-dimensional arrays can be
    converted to Python scalars", triton-lang/triton#9171): say so once instead of in every test."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy
    import triton

    def version(text):
        return tuple(int(part) for part in text.split(".")[:2])

    if version(triton.__version__) <= (3, 7) and version(numpy.__version__) >= (2, 4):
        raise pytest.UsageError(
            f"triton {triton.__version__}'s interpreter does not work with numpy {numpy.__version__} "
            "(triton-lang/triton#9171): install 'numpy<2.4' or triton >= 3.8 to run the kernel tests on CPU"
        )


_check_interpreter_numpy()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=_backends.TESTED)
def backend(request):
    """Every backend of the table (``fastcal._backends.TESTED``): "torch" is the CPU fast path (the
    fused Numba loops up to 256 classes), "torch-ops" the PyTorch operations it falls back to. Use
    ``cases.device_of(backend)`` for the device its tensors go on."""
    return request.param
