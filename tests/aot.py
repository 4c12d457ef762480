"""Ahead-of-time compilation of the kernels for NVIDIA GPUs, without a GPU.

``compile_kernel`` builds the cubin with ``triton.compile`` for a target
compute capability; ``resource_usage`` reads its registers and spills back
with the ``cuobjdump`` that ships inside the triton wheel.
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


def compile_kernel(kernel, signature: dict, constexprs: dict, capability: int, options: dict):
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def resource_usage(compiled) -> dict:
    """``{"REG": int, "LOCAL": int, "STACK": int, "SHARED": int}`` of the compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    assert usage, f"cuobjdump printed no resource usage:\n{out}"
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, usage.groups())))
