"""A kernel launch as a value: the launchers build them, then run them; the ahead-of-time tests
compile exactly what the JIT would build for them (``benchmarks/aot.py``)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Launch:
    kernel: object          # a triton JITFunction
    grid: tuple
    args: tuple             # the runtime arguments, in the kernel's order
    constexprs: dict        # meta-parameters by name
    options: dict           # num_warps, num_stages, maxnreg

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)
