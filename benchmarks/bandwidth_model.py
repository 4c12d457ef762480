"""How much of the memory bandwidth a streaming kernel can reach, from its cubin and its launch.

Little's law: to move ``B`` bytes per second through memory with a latency of ``t`` seconds,
``B * t`` bytes must be requested and not yet arrived at any moment. An H200 moves 4.8 TB/s
over 132 SMs, 36 bytes per ns per SM; at a loaded DRAM latency near 1 us each SM needs about
36 KB in flight. A kernel's programs each have requested the logits of the tiles they have
issued and not yet consumed (one tile with ``num_stages=1``, ``num_stages - 1`` ahead when the
loop is pipelined), and only the programs resident on an SM at once count:

    resident  = min(by registers, by threads, by shared memory, 32, programs the grid puts there)
    in flight = resident * tiles in flight * useful bytes of a tile (the classes that exist)
    predicted = min(1, in flight / (bandwidth per SM * latency))

On AMD Instinct GPUs (CDNA2 gfx90a, CDNA3 gfx942) the same law holds per compute unit (CU):
a CU has 4 SIMDs, each holding at most 8 wavefronts of 64 lanes, with 512 vector registers
(VGPRs and AGPRs together) per lane allocated in granules of 8; a program of ``num_warps``
wavefronts is resident when all of them fit. Triton's AMD pipeliner streams the next tile
through registers (no asynchronous copies to count), so a program has one tile in flight.

``python -m benchmarks.bandwidth_model`` compiles the launches that matter as the JIT would
(``benchmarks/aot.py``, no GPU needed), for each device of ``DEVICES`` on its own target, and
prints the tables; the tests assert them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth: float          # bytes per second
    sms: int
    latency: float            # seconds, loaded DRAM latency
    registers: int = 65536    # per SM
    max_threads: int = 2048   # per SM
    max_programs: int = 32    # resident thread blocks per SM
    shared: int = 228 * 1024  # bytes per SM
    target: str = "sm_90"     # the kernels' configuration table and compile target (kernels/configs.py)
    vendor: str = "nvidia"

    @property
    def bytes_needed_per_sm(self) -> float:
        return self.bandwidth / self.sms * self.latency


H200 = Device("H200", bandwidth=4.8e12, sms=132, latency=1e-6)
# AMD's published figures: MI300X (CDNA3, gfx942) 5.3 TB/s HBM3 over 304 CUs; MI250X (CDNA2, gfx90a)
# 3.2 TB/s over two dies of 110 CUs each, which ROCm shows as two devices: one die is modelled,
# 1.6 TB/s over 110 CUs. Both: 64 KiB of LDS per CU, 4 SIMDs of up to 8 wavefronts (AMD CDNA3 ISA
# and "AMD Instinct MI300X / MI200 series" data sheets and CDNA white papers). The loaded
# latency is taken as the H200's, 1 us.
MI300X = Device("MI300X", bandwidth=5.3e12, sms=304, latency=1e-6, registers=4 * 512, max_threads=2048,
                max_programs=32, shared=64 * 1024, target="gfx942", vendor="amd")
MI250X = Device("MI250X (one die)", bandwidth=1.6384e12, sms=110, latency=1e-6, registers=4 * 512,
                max_threads=2048, max_programs=32, shared=64 * 1024, target="gfx90a", vendor="amd")
DEVICES = {"H200": H200, "MI300X": MI300X, "MI250X": MI250X}

AMD_WAVES_PER_SIMD = 8
AMD_SIMDS = 4
AMD_VGPR_GRANULE = 8


def resident_programs(device: Device, registers: int, num_warps: int, shared: int, grid_programs: int) -> int:
    """Programs one SM (CU) holds at once. NVIDIA: registers are allocated per warp in units of
    256. AMD: each wavefront takes its VGPRs (granules of 8) from its SIMD's 512 per lane, at most
    8 wavefronts a SIMD; a program's wavefronts spread over the 4 SIMDs."""
    by_grid = math.ceil(grid_programs / device.sms)
    by_shared = device.shared // shared if shared else device.max_programs
    if device.vendor == "amd":
        granted = math.ceil(max(registers, 1) / AMD_VGPR_GRANULE) * AMD_VGPR_GRANULE
        waves = AMD_SIMDS * min(AMD_WAVES_PER_SIMD, (device.registers // AMD_SIMDS) // granted)
        return max(0, min(waves // num_warps, by_shared, device.max_programs, by_grid))
    per_warp = math.ceil(registers * 32 / 256) * 256
    by_registers = (device.registers // per_warp) // num_warps
    by_threads = device.max_threads // (32 * num_warps)
    return max(0, min(by_registers, by_threads, by_shared, device.max_programs, by_grid))


@dataclass(frozen=True)
class Prediction:
    resident: int
    tile_bytes: int
    tiles_in_flight: int

    @property
    def bytes_in_flight(self) -> int:
        return self.resident * self.tiles_in_flight * self.tile_bytes

    def fraction(self, device: Device = H200) -> float:
        return min(1.0, self.bytes_in_flight / device.bytes_needed_per_sm)


def predict_launch(launch, usage: dict, device: Device = H200) -> Prediction:
    """The model for one ``kernels._launch.Launch`` and its cubin's ``resource_usage``."""
    logits = launch.args[0]
    num_classes = next(a for a in launch.args if isinstance(a, int) and not isinstance(a, bool))  # C: first scalar
    classes = min(num_classes, launch.constexprs["C_BLOCK"])
    tile_bytes = classes * launch.constexprs["PIX_BLOCK"] * logits.element_size()
    if launch.constexprs.get("UPSAMPLE"):
        tile_bytes *= 4  # four neighbours a pixel, mostly cache hits: an upper bound on DRAM bytes
    grid_programs = math.prod(launch.grid)
    resident = resident_programs(device, usage["REG"], launch.options["num_warps"], usage["SHARED"], grid_programs)
    pipelined = usage.get("ASYNC_COPIES", 0) > 0  # the compiler did prefetch tiles into shared memory
    return Prediction(resident, tile_bytes, max(1, launch.options["num_stages"] - 1) if pipelined else 1)


# The launches the GPU goals are about: aligned NCHW Cityscapes- and ADE20K-like batches.
GOAL_WORKLOADS = {
    "cityscapes C=19": (1, 19, 1024, 2048),
    "ade20k C=150": (1, 150, 512, 512),
}


def goal_launches(dtype: torch.dtype, shape: tuple, device: Device = H200, *, masked: bool = False,
                  deterministic: bool = False, label_dtype: torch.dtype = torch.int64, temperature: float = 1.0):
    """``{name: Launch}`` of the stats and predict passes on a ``meta`` tensor of ``shape``, as the
    launchers build them (``masked``: with a ``valid`` mask; ``temperature=math.inf``: the limit's
    exp-free kernels)."""
    from fastcal._operands import DistanceOperands
    from fastcal.kernels import predict, stats

    logits = torch.empty(shape, dtype=dtype, device="meta")
    valid = torch.empty((shape[0], *shape[2:]), dtype=torch.bool, device="meta") if masked else None
    C, size = shape[1], logits.element_size()
    aligned = shape[-1] % 16 == 0
    programs = stats.stats_config(C, size, aligned, device.target)["programs_per_sm"] * device.sms
    launches, *_ = stats.stats_launches(logits, temperature, valid, deterministic, None, programs=programs,
                                        target=device.target)
    names = ["row stats", "stats"] if len(launches) == 2 else ["stats"]
    result = dict(zip(names, launches))
    programs = predict.predict_config(C, size, aligned, device.target)["programs_per_sm"] * device.sms
    operands = DistanceOperands(torch.eye(C, device="meta"))
    result["predict"], _ = predict.predict_launch(logits, operands, temperature, label_dtype,
                                                  programs=programs, target=device.target)
    return result


def table(target: str | None = None, device: Device = H200) -> list[dict]:
    """One row per (workload, dtype, kernel): registers, spills, residency, bytes in flight, fraction."""
    from benchmarks import aot

    rows = []
    for workload, shape in GOAL_WORKLOADS.items():
        for dtype in (torch.float32, torch.float16):
            for kernel, launch in goal_launches(dtype, shape, device).items():
                compiled = aot.compile_launch(launch, target or device.target)
                usage = aot.resource_usage(compiled)
                model = predict_launch(launch, usage, device)
                rows.append({"workload": workload, "dtype": str(dtype).replace("torch.", ""), "kernel": kernel,
                             "registers": usage["REG"], "spills": usage["LOCAL"] + usage["STACK"],
                             "shared": usage["SHARED"], "warps": launch.options["num_warps"],
                             "resident": model.resident, "tile_bytes": model.tile_bytes,
                             "in_flight": model.bytes_in_flight, "fraction": model.fraction(device),
                             "load_bits": (max(aot.global_load_widths(compiled), default=0)
                                           if "ptx" in compiled.asm else "-")})
    return rows


def markdown(rows: list[dict], device: Device = H200) -> str:
    lines = [f"Bandwidth model ({device.name}: {device.bandwidth / 1e12:.1f} TB/s, {device.sms} SMs, "
             f"{device.latency * 1e6:.0f} us: {device.bytes_needed_per_sm / 1024:.1f} KiB in flight per SM needed)", "",
             "| workload | dtype | kernel | registers | spills | warps | resident/SM | tile (B) | in flight/SM (KiB) "
             "| widest load (bits) | predicted % of bandwidth |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['kernel']} | {r['registers']} | {r['spills']} "
                     f"| {r['warps']} | {r['resident']} | {r['tile_bytes']} | {r['in_flight'] / 1024:.1f} "
                     f"| {r['load_bits']} | {r['fraction']:.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for device in DEVICES.values():
        print(markdown(table(device=device), device))
