"""Ahead-of-time compilation of the kernels for NVIDIA and AMD GPUs, without a GPU.

Targets are named as in ``kernels/configs.py`` (``"sm_90"``, ``"sm_80"``, ``"gfx942"``,
``"gfx90a"``; an int capability ``c`` means ``"sm_c"``). ``compile_launch`` builds the cubin
or hsaco the JIT would build for a launch (``kernels._launch.Launch``):
the same specialisations (16-byte-aligned pointers and integers divisible by 16 marked
``tt.divisibility``, integers equal to 1 made constants) from the launch's own arguments, which
may be ``meta`` tensors: no memory, no GPU. ``compile_kernel`` compiles a hand-written signature.
``resource_usage`` reads registers and spills back: for NVIDIA with the ``cuobjdump`` inside the
triton wheel, for AMD from the code object's metadata in the AMDGCN assembly (``.vgpr_count``,
``.agpr_count``, ``.sgpr_count``, ``.vgpr_spill_count``, ``.sgpr_spill_count`` and
``.private_segment_fixed_size``, the scratch memory a wavefront needs: VGPR spills land there;
SGPR spills land in VGPR lanes).
``global_load_widths`` lists the bits of each global load in the PTX.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def gpu_target(target) -> GPUTarget:
    """The ``GPUTarget`` of a target name of ``kernels/configs.py`` (or an NVIDIA capability)."""
    from fastcal.kernels.configs import TARGETS

    table = TARGETS[f"sm_{target}" if isinstance(target, int) else target]
    return GPUTarget(table.backend, table.arch, table.warp_size)


def _options(options: dict, target: GPUTarget) -> dict:
    """The launch options as the target's backend takes them (AMD has no ``maxnreg``)."""
    return dict(options) if target.backend == "cuda" else {k: v for k, v in options.items() if k != "maxnreg"}


def compile_kernel(kernel, signature: dict, constexprs: dict, target, options: dict):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    gpu = gpu_target(target)
    return triton.compile(source, target=gpu, options=_options(options, gpu))


def specialisation(value) -> tuple[str, object]:
    """``(type, key)`` the JIT gives one argument (``JITFunction``'s rule): a tensor is a pointer,
    ``"D"`` when its address is a multiple of 16; an int equal to 1 becomes the constant 1, one
    divisible by 16 gets ``"D"``; floats and bools are plain scalars."""
    if hasattr(value, "data_ptr"):
        kind = "*" + {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64",
                      "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}[str(value.dtype)[6:]]
        return kind, "D" if value.data_ptr() % 16 == 0 else ""
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -2**31 <= value < 2**31 else "i64"
        return kind, "D" if value % 16 == 0 else ""
    return "fp32", None


def jit_specialisation(kernel, launch_args: tuple, constexprs: dict):
    """``(signature, constexprs, attrs)`` as ``JITFunction.run`` derives them."""
    runtime = [name for name in kernel.arg_names if name not in constexprs]
    assert len(runtime) == len(launch_args), f"{kernel.__name__}: {len(launch_args)} arguments for {runtime}"
    values = dict(zip(runtime, launch_args))
    signature, constants, attrs = {}, dict(constexprs), {}
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        kind, key = specialisation(values[name])
        signature[name] = kind
        if kind == "constexpr":
            constants[name] = key
        elif key:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs


def compile_launch(launch, target=90):
    """The cubin or hsaco (``triton.compile`` result) the JIT would build for ``launch`` on ``target``."""
    signature, constants, attrs = jit_specialisation(launch.kernel, launch.args, launch.constexprs)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constants, attrs=attrs)
    gpu = gpu_target(target)
    return triton.compile(source, target=gpu, options=_options(launch.options, gpu))


def global_load_widths(compiled) -> list[int]:
    """Bits moved by each global load in the PTX: ``ld.global`` (128 for ``.v4.b32``, 32 for
    ``.b32``...) and the asynchronous copies of a pipelined loop (``cp.async ..., 16`` is 128)."""
    ptx = compiled.asm["ptx"]
    widths = [int(vector or 1) * int(bits) for vector, bits in
              re.findall(r"ld\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b", ptx)]
    widths += [8 * int(size, 0) for size in
               re.findall(r"cp\.async\.c[ag]\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],\s*(0x[0-9a-f]+|\d+)", ptx)]
    return widths


def resource_usage(compiled) -> dict:
    """``{"REG": int, "LOCAL": int, "STACK": int, "SHARED": int}`` of the compiled kernel (on AMD
    ``REG`` counts VGPRs and AGPRs, ``LOCAL`` the scratch bytes, ``STACK`` the VGPRs spilled to
    scratch; ``SGPR_SPILLS`` the scalar registers parked in VGPR lanes, which cost no memory)."""
    if "amdgcn" in compiled.asm:
        return _amd_resource_usage(compiled)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert usage, f"cuobjdump printed no resource usage:\n{out}"
    result = dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, usage.groups())))
    result["SHARED"] += compiled.metadata.shared  # the dynamic shared memory the launch asks for
    result["ASYNC_COPIES"] = len(re.findall(r"cp\.async", compiled.asm["ptx"]))  # a pipelined loop
    return result


def _amd_resource_usage(compiled) -> dict:
    metadata = compiled.asm["amdgcn"]

    def field(name: str) -> int:
        found = re.findall(rf"\.{name}:\s+(\d+)", metadata)
        assert found, f"no .{name} in the code object metadata"
        return int(found[-1])

    # SGPR spills go to lanes of a VGPR (v_writelane), not to memory: counted apart
    return {"REG": field("vgpr_count") + field("agpr_count"), "SGPR": field("sgpr_count"),
            "SGPR_SPILLS": field("sgpr_spill_count"), "STACK": field("vgpr_spill_count"),
            "LOCAL": field("private_segment_fixed_size"),
            "SHARED": max(field("group_segment_fixed_size"), compiled.metadata.shared), "ASYNC_COPIES": 0}
