"""Logits in the shapes, dtypes and layouts every backend must handle."""
from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# where the Triton kernel tests put their tensors: compiled kernels on a GPU, the interpreter on CPU
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_of(backend: str) -> str:
    """Where a test puts its tensors for ``backend``: the Triton kernels' device, else the CPU."""
    return KERNEL_DEVICE if backend == "triton" else "cpu"


def make_logits(shape, dtype=torch.float32, layout="contiguous", scale=3.0, device="cpu"):
    """Random logits of ``shape`` [N, C, *spatial] in the given memory ``layout``:
    "contiguous" (NCHW), "channels_last" (class axis innermost) or "sliced"
    (a strided window of a larger tensor)."""
    if layout == "sliced":
        N, C, *spatial = shape
        big = torch.randn(N + 1, C + 2, *[s + 3 for s in spatial], device=device) * scale
        window = (slice(1, None), slice(1, C + 1), *[slice(2, s + 2) for s in spatial])
        return big[window].to(dtype)
    z = (torch.randn(shape, device=device) * scale).to(dtype)
    if layout == "channels_last":
        z = z.movedim(1, -1).contiguous().movedim(-1, 1)
    return z


SHAPES = [(7, 5), (2, 19, 17, 23), (1, 3, 4, 5, 6), (3, 2, 9, 1), (1, 150, 6, 7), (9, 1024)]
LAYOUTS = ["contiguous", "channels_last", "sliced"]


def exact_tie_prototypes(num_classes: int, nearest: tuple, device="cpu") -> torch.Tensor:
    """Prototypes for the uniform ``p`` of all-equal logits (``1/C``, exact for a power-of-two C):
    the rows in ``nearest`` are uniform too (distance 0), every other row is one-hot.

    Every value involved, centred or not, is a short dyadic fraction, so every product and every
    partial sum of the distances is exact in float32: the tie between the ``nearest`` classes is
    exact whatever the summation order of the GEMM or the vector width.
    """
    P = torch.eye(num_classes, device=device)
    P[list(nearest)] = 1.0 / num_classes
    return P
