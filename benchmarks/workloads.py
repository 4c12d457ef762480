"""Benchmark workloads, providers and the bytes model of docs/design.md, section 5."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import fastcal
from fastcal import reference


@dataclass(frozen=True)
class Workload:
    name: str
    shape: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return self.shape[1]

    @property
    def pixels(self) -> int:
        return self.shape[0] * math.prod(self.shape[2:])


WORKLOADS = {
    "cityscapes-n1": Workload("cityscapes-n1", (1, 19, 1024, 2048)),
    "cityscapes-n4": Workload("cityscapes-n4", (4, 19, 1024, 2048)),
    "ade20k": Workload("ade20k", (1, 150, 512, 512)),
    "imagenet-cls": Workload("imagenet-cls", (65536, 1000)),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PASSES = ("stats", "predict", "calibrate")
LABEL_BYTES = 8  # int64 labels


def bytes_moved(workload: Workload, dtype: torch.dtype, pass_name: str) -> int:
    """The bytes model (docs/design.md): stats reads the logits once; predict reads them and writes a label;
    calibrate does both. ``copy`` and ``exp`` read and write the logits once."""
    logits = workload.pixels * workload.num_classes * dtype.itemsize
    return {"stats": logits, "predict": logits + workload.pixels * LABEL_BYTES,
            "calibrate": 2 * logits + workload.pixels * LABEL_BYTES,
            "copy": 2 * logits, "exp": 2 * logits}[pass_name]


def make_logits(workload: Workload, dtype: torch.dtype, device: str) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(0)
    return (3 * torch.randn(workload.shape, generator=generator, device=device)).to(dtype)


def _compiled(fn):
    cache = {}

    def call(*args):
        if "fn" not in cache:
            cache["fn"] = torch.compile(fn)
        return cache["fn"](*args)

    return call


_compiled_stats = _compiled(reference.prototype_stats)
_compiled_predict = _compiled(reference.predict)


def pass_function(provider: str, pass_name: str, logits: torch.Tensor, prototypes: torch.Tensor):
    """A zero-argument callable running ``pass_name`` with ``provider`` on ``logits``."""
    if provider == "copy":
        out = torch.empty_like(logits)
        return lambda: out.copy_(logits)
    if provider == "exp":  # into a preallocated tensor: a fresh output would time page faults
        out = torch.empty_like(logits)
        return lambda: torch.exp(logits, out=out)
    if provider == "compile":
        stats = lambda: _compiled_stats(logits, 1.0, None)  # noqa: E731
        predict = lambda: _compiled_predict(logits, prototypes, 1.0)  # noqa: E731

        def calibrate():
            S, W, _ = _compiled_stats(logits, 1.0, None)
            return _compiled_predict(logits, reference.prototypes_from_stats(S, W, "onehot"), 1.0)

        return {"stats": stats, "predict": predict, "calibrate": calibrate}[pass_name]
    if provider == "torch-ops":  # the torch backend with PyTorch operations instead of the fused CPU loops
        fused = pass_function("torch", pass_name, logits, prototypes)
        return lambda: _without_fused_loops(fused)
    backend = provider
    return {
        "stats": lambda: fastcal.prototype_stats(logits, backend=backend),
        "predict": lambda: fastcal.predict(logits, prototypes, backend=backend),
        "calibrate": lambda: fastcal.calibrate(logits, backend=backend),
    }[pass_name]


def _without_fused_loops(fn):
    from fastcal import cpu_kernels

    limit = cpu_kernels.MAX_CLASSES
    cpu_kernels.MAX_CLASSES = 0
    try:
        return fn()
    finally:
        cpu_kernels.MAX_CLASSES = limit


def cases(device: str):
    """``(workload, dtype, provider, pass)`` rows for ``device``, and ``(row, reason)`` left out.

    On CPU the suite must finish in minutes on 2 cores, so the slow providers run on
    the Cityscapes N=1 image only: the eager reference (its predict takes 3 s there and
    about 15 s on ADE20K) and torch.compile (30 s of compilation per graph). On CUDA
    torch.compile runs on that image only too (see the reason in ``left_out``).
    """
    rows, left_out = [], []
    if device == "cuda":
        for w, d, p in _product(WORKLOADS, DTYPES, ("copy", "triton", "torch", "reference", "compile")):
            if p == "compile" and w != "cityscapes-n1":
                continue
            rows += [(w, d, p, s) for s in ((p,) if p == "copy" else PASSES)]
        left_out.append(("compile on workloads other than cityscapes-n1",
                         "the reference's predict loops over pixel blocks, which torch.compile unrolls: "
                         "thousands of blocks for the classification workload"))
        return rows, left_out
    for w, d in _product(WORKLOADS, ("float32", "float16")):
        rows += [(w, d, "copy", "copy"), (w, d, "exp", "exp")]
        rows += [(w, d, "torch", s) for s in PASSES]
        if w == "cityscapes-n1":
            rows += [(w, d, "reference", s) for s in PASSES]
            if d == "float32":
                rows += [(w, d, p, s) for p in ("torch-ops", "compile") for s in PASSES]
            else:
                left_out.append((f"{w} {d} compile", "one compiled graph (float32) keeps the CPU suite short"))
        else:
            left_out.append((f"{w} {d} reference, compile", "too slow for the 5-minute CPU suite"))
    return rows, left_out


def _product(*iterables):
    import itertools

    return itertools.product(*iterables)


def prototypes_for(logits: torch.Tensor) -> torch.Tensor:
    """The prototypes the predict pass uses: those of the logits themselves."""
    S, W = fastcal.prototype_stats(logits, backend="torch" if logits.device.type == "cpu" else "auto")
    return fastcal.prototypes_from_stats(S, W)
