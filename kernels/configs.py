"""Launch configurations as data: one table per GPU target, and the rule that picks the target.

Adding a GPU is adding a table to ``TARGETS`` (and, if its name is new, a line to ``target_of``).

Each table keeps enough bytes of logits requested per SM / CU to cover DRAM latency (resident
programs x tiles in flight x tile bytes; ``benchmarks/bandwidth_model.py`` checks it per device)
with no register spills: persistent programs prefetch ``num_stages - 1`` tiles (``cp.async`` on
NVIDIA, register double-buffering on AMD), and the fused stats kernel runs small programs, many per
SM, because its one-hot reduction needs many registers. Any entry may be keyed by bytes per logit
("4": float32, "2": float16 / bfloat16; see ``entry``). The pipelined entries are for the JIT's aligned NCHW
specialisation (16-byte-aligned logits, contiguous pixels, sizes divisible by 16); any other launch
gets ``conservative``, which compiles without spills in every variant.

Dot precisions (``tl.dot``'s ``input_precision``), per target, chosen so that labels keep about
2^-22 relative error in the distances (the contract's float32 accuracy):

- ``onehot``: the stats pass's ``onehot(cls)^T @ [w p | w | 1]``. ``"tf32"`` means two TF32
  products on a split operand (exact one-hot, head and remainder of the float32 values: what
  3xTF32 gives, with one product less) on NVIDIA tensor cores; ``"ieee"`` one float32 product,
  which AMD's matrix cores run natively (``v_mfma_f32_*_f32`` on CDNA2 and CDNA3; gfx90a has no
  TF32 at all).
- ``distance``: the predict pass's ``(p - c) . A^T``. ``"tf32x3"`` on NVIDIA (three TF32 products,
  about 2^-22); ``"ieee"`` on AMD, where Triton offers no ``tf32x3`` and float32 matrix cores exist.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

LOG2E = 1.4426950408889634
FUSED_MAX_CLASSES = 64         # up to this many class rows (classes, plus W and N in stats) in one tile
CHUNK_CLASSES = 64             # the stats pass's class blocks beyond that
PREDICT_CHUNK_CLASSES = 32     # the predict pass's: p . A^T blocks in 3xTF32 need three operand copies


def _frozen(**entries) -> Mapping:
    return MappingProxyType(entries)


@dataclass(frozen=True)
class Target:
    name: str
    backend: str                 # triton's GPUTarget backend: "cuda" or "hip"
    arch: object                 # GPUTarget arch: 80, 90, "gfx942", "gfx90a"
    warp_size: int
    fused_stats: Mapping         # C + 2 <= FUSED_MAX_CLASSES: the whole class axis in one tile
    chunked_stats: Mapping       # larger C: class blocks of CHUNK_CLASSES
    row_stats: Mapping           # the row pass before the chunked stats
    predict_fused: Mapping
    predict_chunked: Mapping
    conservative: Mapping        # any launch that is not aligned NCHW
    operands: Mapping            # the one-program launch between the passes of calibrate
    onehot_precision: str        # "tf32" (split) or "ieee"
    distance_precision: str      # "tf32x3" or "ieee"
    # register cap handed to the compiler: left alone, ptxas caps some variants at 128 registers
    # and spills (the AMD backend ignores it)
    max_registers: int = 255
    # upsampling launches gather four neighbours a pixel, mostly cache hits: no prefetch, fewer
    # registers
    upsample_num_stages: int = 1

    def num_stages(self, chosen: Mapping, element_size: int, upsample: bool) -> int:
        """The pipeline depth of a launch on ``chosen`` (an entry of this table)."""
        return self.upsample_num_stages if upsample else entry(chosen, "num_stages", element_size)


_NVIDIA = dict(
    backend="cuda", warp_size=32,
    fused_stats=_frozen(tile_elements=1024, num_warps=2, num_stages=_frozen(**{"4": 4, "2": 7}), programs_per_sm=8),
    chunked_stats=_frozen(pixels=32, num_warps=4, num_stages=_frozen(**{"4": 3, "2": 5}), programs_per_sm=4),
    # at most 128 registers a thread: four programs resident per SM (the temperature limit's row pass
    # takes 131 uncapped in half precision, and 126 with no spill capped)
    row_stats=_frozen(pixels=_frozen(**{"4": 32, "2": 64}), num_warps=4, num_stages=1, max_registers=128),
    predict_fused=_frozen(tile_elements=4096, num_warps=4, num_stages=_frozen(**{"4": 3, "2": 5}), programs_per_sm=4),
    predict_chunked=_frozen(tile_elements=2048, num_warps=4, num_stages=_frozen(**{"4": 3, "2": 5}),
                            programs_per_sm=4),
    conservative=_frozen(tile_elements=1024, num_warps=4, num_stages=1, programs_per_sm=4),
    operands=_frozen(num_warps=_frozen(small=4, large=8), num_stages=1),  # large: 64 classes a block
    onehot_precision="tf32", distance_precision="tf32x3",
)
# AMD CDNA: 64-wide wavefronts (a 4-warp program is 256 lanes), 512 VGPRs per SIMD lane and 64 KiB
# of LDS per CU. Residency is bounded by VGPRs and LDS, not by prefetch depth: the fused passes run
# unpipelined (num_stages=1: no LDS staging, fewer registers, more programs resident) and half
# precision takes tiles twice as long, so every goal launch keeps >= 85% of the bytes in flight that
# the HBM needs (benchmarks/bandwidth_model.py; tests/test_bandwidth_model.py asserts it).
_AMD = dict(
    backend="hip", warp_size=64,
    # half-precision tiles twice as long: the same bytes in flight from the registers a CU has
    fused_stats=_frozen(tile_elements=_frozen(**{"4": 1024, "2": 2048}), num_warps=2, num_stages=1, programs_per_sm=8),
    chunked_stats=_frozen(pixels=32, num_warps=4, num_stages=2, programs_per_sm=4),
    row_stats=_frozen(pixels=64, num_warps=4, num_stages=1),
    predict_fused=_frozen(tile_elements=4096, num_warps=4, num_stages=1, programs_per_sm=4),
    predict_chunked=_frozen(tile_elements=2048, num_warps=_frozen(**{"4": 4, "2": 2}), num_stages=2,
                            programs_per_sm=_frozen(**{"4": 4, "2": 8})),
    conservative=_frozen(tile_elements=1024, num_warps=4, num_stages=1, programs_per_sm=4),
    operands=_frozen(num_warps=_frozen(small=4, large=8), num_stages=1),
    onehot_precision="ieee", distance_precision="ieee",
)

TARGETS = {
    "sm_90": Target(name="sm_90", arch=90, **_NVIDIA),        # H100, H200
    "sm_80": Target(name="sm_80", arch=80, **_NVIDIA),        # A100
    "gfx942": Target(name="gfx942", arch="gfx942", **_AMD),   # MI300X, MI300A, MI325X
    "gfx90a": Target(name="gfx90a", arch="gfx90a", **_AMD),   # MI250X, MI210
}
DEFAULT_TARGET = "sm_90"  # the interpreter and meta tensors, which only build launches


def target_of(device) -> Target:
    """The table for ``device``: a CUDA device's compute capability (9.x and later: sm_90, else
    sm_80), a ROCm device's ``gcnArchName`` (gfx942 and gfx90a by name; other CDNA parts take the
    gfx942 table), ``DEFAULT_TARGET`` for the interpreter's CPU tensors and for meta tensors."""
    if getattr(device, "type", device) != "cuda":
        return TARGETS[DEFAULT_TARGET]
    return TARGETS[_cuda_target_name(device.index)]


@functools.cache
def _cuda_target_name(index) -> str:
    import torch

    properties = torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device())
    if getattr(torch.version, "hip", None):
        arch = getattr(properties, "gcnArchName", "").split(":")[0]
        return arch if arch in TARGETS else "gfx942"
    return "sm_90" if properties.major >= 9 else "sm_80"


def entry(table: Mapping, key: str, element_size: int) -> int:
    """``table[key]`` for logits of ``element_size`` bytes: a number, or one per size ("4", "2")."""
    value = table[key]
    return value if isinstance(value, int) else value["4" if element_size >= 4 else "2"]


def max_programs(device, per_sm: int = 4) -> int:
    """Persistent programs: ``per_sm`` per SM (CU on AMD) on a GPU; a few in the interpreter, which
    runs programs one after another (and on meta tensors, where launches are only built)."""
    return per_sm * _multiprocessors(device) if getattr(device, "type", None) == "cuda" else 4


@functools.cache
def _multiprocessors(device) -> int:
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count
