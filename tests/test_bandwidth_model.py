"""The bandwidth model (benchmarks/bandwidth_model.py) and the kernels as the JIT really builds them.

The launches that matter are built by the launchers themselves on ``meta`` tensors and compiled
ahead of time with the JIT's own specialisations (16-byte-aligned pointers and sizes divisible by
16), so the registers, spills and loads checked here are those of the code that runs on a GPU.
"""
import dataclasses
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from benchmarks import aot
from benchmarks import bandwidth_model as model


def test_residency_and_prediction_arithmetic():
    h200 = model.H200
    assert 35 * 1024 < h200.bytes_needed_per_sm < 37 * 1024  # 4.8 TB/s / 132 SMs x 1 us
    # 180 registers x 128 threads: two programs' registers fit an SM's 64K, three do not
    assert model.resident_programs(h200, 180, 4, 1024, 10**6) == 2
    assert model.resident_programs(h200, 64, 4, 1024, 10**6) == 8         # registers: 64K / (64 x 128)
    assert model.resident_programs(h200, 32, 4, 1024, 10**6) == 16        # threads: 2048 / 128
    assert model.resident_programs(h200, 64, 4, 100 * 1024, 10**6) == 2   # shared memory
    assert model.resident_programs(h200, 64, 4, 1024, 4 * 132) == 4       # a persistent grid of 4 per SM
    # a 32-pixel x 19-class float32 tile, two programs: about 5 KB, well under a third of the bandwidth
    small = model.Prediction(resident=2, tile_bytes=32 * 19 * 4, tiles_in_flight=1)
    assert small.bytes_in_flight == 4864 and small.fraction() < 1 / 3
    assert model.Prediction(resident=5, tile_bytes=2432, tiles_in_flight=3).fraction() == 1.0


def test_specialisation_is_the_jits():
    """benchmarks/aot.py's rule, by hand and against triton's own where this triton exposes it."""
    cases = [(torch.zeros(16), ("*fp32", "D")), (torch.zeros(17)[1:], ("*fp32", "")),
             (torch.zeros(8, dtype=torch.float16), ("*fp16", "D")), (1, ("constexpr", 1)), (0, ("i32", "D")),
             (32, ("i32", "D")), (19, ("i32", "")), (-48, ("i32", "D")), (2**40, ("i64", "D")),
             (2**40 + 3, ("i64", "")), (1.5, ("fp32", None)), (True, ("u1", None)),
             (torch.zeros(4, dtype=torch.uint8), ("*u8", "D"))]
    import triton._C.libtriton as libtriton
    from triton.backends.compiler import BaseBackend

    native = getattr(libtriton, "native_specialize_impl", None)
    for value, expected in cases:
        assert aot.specialisation(value) == expected, value
        if native is not None:
            assert tuple(native(BaseBackend, value, False, True, True)) == expected, value


def _compile(item):
    """Build the launch in this (spawned, non-interpreter) process and compile it."""
    name, (dtype, shape, flags, kernel, unaligned) = item
    launch = model.goal_launches(getattr(torch, dtype), shape, **flags)[kernel]
    if unaligned:  # a view that starts 4 bytes into its allocation
        launch = dataclasses.replace(launch, args=(FakePointer(launch.args[0].dtype, 4),) + launch.args[1:])
    compiled = aot.compile_launch(launch)
    usage = aot.resource_usage(compiled)
    return name, usage, aot.global_load_widths(compiled), model.predict_launch(launch, usage)


KERNELS = {"cityscapes C=19": ["stats", "predict"], "ade20k C=150": ["row stats", "stats", "predict"]}
ODD_SHAPE = (1, 19, 1023, 2047)  # a sliced window: odd sizes and strides


def jit_variants():
    """``{name: spec}``: aligned NCHW Cityscapes- and ADE20K-like batches in every dtype, the other
    flags of aligned launches (a valid mask, deterministic partial sums, narrow labels), the
    temperature limit and an unaligned launch."""
    variants = {}
    for workload, shape in model.GOAL_WORKLOADS.items():
        for dtype in ("float32", "float16", "bfloat16"):
            for kernel in KERNELS[workload]:
                variants[f"{workload} {dtype} {kernel}"] = (dtype, shape, {}, kernel, False)
        for dtype in ("float32", "float16"):
            flags = {"masked": True, "deterministic": True, "label_dtype": torch.uint8}
            for kernel in KERNELS[workload]:
                name = f"{workload} {dtype} {kernel} masked-deterministic-uint8"
                variants[name] = (dtype, shape, flags, kernel, False)
                limit = {"temperature": math.inf}
                variants[f"{workload} {dtype} {kernel} limit"] = (dtype, shape, limit, kernel, False)
    for kernel in ("stats", "predict"):
        variants[f"unaligned float32 {kernel}"] = ("float32", ODD_SHAPE, {}, kernel, True)
    return variants


@dataclasses.dataclass(frozen=True)
class FakePointer:
    """A tensor argument at a given address (how the JIT sees a view that starts mid-allocation)."""
    dtype: torch.dtype
    address: int

    def data_ptr(self):
        return self.address

    def element_size(self):
        return torch.empty(0, dtype=self.dtype).element_size()


@pytest.fixture(scope="module")
def compiled(monkeypatch_module):
    monkeypatch_module.delenv("TRITON_INTERPRET", raising=False)  # fresh processes import real JIT functions
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        results = {name: (usage, widths, prediction)
                   for name, usage, widths, prediction in pool.map(_compile, jit_variants().items())}
    print("\nJIT variants (sm_90): registers, spills, widest global load, predicted share of H200 bandwidth")
    for name, (usage, widths, prediction) in results.items():
        print(f"  {name:32s} REG:{usage['REG']:3d} SPILL:{usage['LOCAL'] + usage['STACK']} "
              f"LOAD:{max(widths, default=0):3d} bits  in flight/SM {prediction.bytes_in_flight / 1024:5.1f} KiB "
              f"-> {prediction.fraction():.0%}")
    return results


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_jit_variants_compile_without_spills(compiled):
    for name, (usage, _, _) in compiled.items():
        assert usage["LOCAL"] == 0 and usage["STACK"] == 0, f"{name} spills: {usage}"


def test_aligned_logits_load_128_bits_at_a_time(compiled):
    for name, (_, widths, _) in compiled.items():
        if not name.startswith("unaligned"):
            assert max(widths) == 128, f"{name}: widest global load {max(widths)} bits"
    # without 16-byte alignment the same loads are narrower: the specialisation is what was compiled
    assert max(compiled["unaligned float32 stats"][1]) < 128


@pytest.mark.parametrize("workload", list(model.GOAL_WORKLOADS))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_model_predicts_85_percent_of_bandwidth(compiled, workload, dtype):
    for name, (_, _, prediction) in compiled.items():
        if name.startswith(f"{workload} {dtype} "):
            assert prediction.fraction() >= 0.85, f"{name}: {prediction}"


def _compile_for(item):
    """One goal launch built with ``device``'s table and compiled for its target (spawned process)."""
    device_name, workload, dtype, kernel = item
    device = model.DEVICES[device_name]
    launch = model.goal_launches(getattr(torch, dtype), model.GOAL_WORKLOADS[workload], device)[kernel]
    usage = aot.resource_usage(aot.compile_launch(launch, device.target))
    return item, usage, model.predict_launch(launch, usage, device)


AMD_GOALS = [(device, workload, dtype, kernel) for device in ("MI300X", "MI250X")
             for workload, kernels in KERNELS.items() for dtype in ("float32", "float16") for kernel in kernels]


@pytest.fixture(scope="module")
def compiled_amd(monkeypatch_module):
    monkeypatch_module.delenv("TRITON_INTERPRET", raising=False)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=context) as pool:
        return {item: (usage, prediction) for item, usage, prediction in pool.map(_compile_for, AMD_GOALS)}


def test_amd_residency_arithmetic():
    mi300x = model.MI300X
    assert 16 * 1024 < mi300x.bytes_needed_per_sm < 18 * 1024  # 5.3 TB/s / 304 CUs x 1 us
    # 128 VGPRs: 4 wavefronts a SIMD, 16 a CU: eight 2-wavefront programs; 129 rounds up to 136: 3 a SIMD
    assert model.resident_programs(mi300x, 128, 2, 0, 10**6) == 8
    assert model.resident_programs(mi300x, 129, 4, 0, 10**6) == 3
    assert model.resident_programs(mi300x, 32, 4, 0, 10**6) == 8              # at most 8 wavefronts a SIMD
    assert model.resident_programs(mi300x, 32, 4, 40 * 1024, 10**6) == 1      # 64 KiB of LDS a CU


@pytest.mark.parametrize("device", ["MI300X", "MI250X"])
def test_amd_goal_launches_spill_nothing_and_reach_85_percent(compiled_amd, device):
    """The Cityscapes and ADE20K passes, float32 and float16, compiled for gfx942 / gfx90a with
    their own tables: no VGPR spilled, no scratch, and at least 85% of copy bandwidth predicted."""
    for (name, workload, dtype, kernel), (usage, prediction) in compiled_amd.items():
        if name == device:
            what = f"{device} {workload} {dtype} {kernel}"
            assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"{what} spills: {usage}"
            assert prediction.fraction(model.DEVICES[device]) >= 0.85, f"{what}: {prediction}"
