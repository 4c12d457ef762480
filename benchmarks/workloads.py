"""Benchmark workloads, providers and the bytes model of docs/design.md, section 5."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastcal
from fastcal import reference


@dataclass(frozen=True)
class Workload:
    name: str
    shape: tuple[int, ...]           # the logits the model outputs
    upsample_to: tuple[int, int] | None = None  # labels' (H, W) when the logits are upsampled on the fly
    align_corners: bool = False

    @property
    def num_classes(self) -> int:
        return self.shape[1]

    @property
    def input_pixels(self) -> int:
        return self.shape[0] * math.prod(self.shape[2:])

    @property
    def pixels(self) -> int:
        """Pixels labelled: those of the logits, or of the upsampled output."""
        return self.shape[0] * math.prod(self.upsample_to) if self.upsample_to else self.input_pixels

    @property
    def resize(self) -> dict:
        """The keyword arguments that upsample on the fly (none for a plain workload)."""
        return {"size": self.upsample_to, "align_corners": self.align_corners} if self.upsample_to else {}


WORKLOADS = {
    "cityscapes-n1": Workload("cityscapes-n1", (1, 19, 1024, 2048)),
    "cityscapes-n4": Workload("cityscapes-n4", (4, 19, 1024, 2048)),
    "ade20k": Workload("ade20k", (1, 150, 512, 512)),
    "imagenet-cls": Workload("imagenet-cls", (65536, 1000)),
    # model outputs at 1/4 (SegFormer) and 1/8 (DeepLab) of a Cityscapes frame, labelled at full size
    "segformer-up4": Workload("segformer-up4", (1, 19, 256, 512), (1024, 2048), align_corners=False),
    "deeplab-up8": Workload("deeplab-up8", (1, 19, 128, 256), (1024, 2048), align_corners=True),
}
# providers that first write the upsampled logits with F.interpolate, then run the backend on them
MATERIALISED = {"interpolate+torch": "torch", "interpolate+torch-ops": "torch-ops",
                "interpolate+triton": "triton"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PASSES = ("stats", "predict", "calibrate")
LABEL_BYTES = 8  # int64 labels


def bytes_moved(workload: Workload, dtype: torch.dtype, pass_name: str) -> int:
    """The bytes model (docs/design.md): stats reads the logits once; predict reads them and writes a label;
    calibrate does both; ``copy`` reads and writes the logits once. With on-the-fly upsampling these
    are the bytes the task requires: the model's (small) logits read once per pass and the labels
    written, whoever materialises more. ``exp`` reads and writes logits of the labels' size: one
    exp per class and labelled pixel, the floor of the softmax."""
    logits = workload.input_pixels * workload.num_classes * dtype.itemsize
    return {"stats": logits, "predict": logits + workload.pixels * LABEL_BYTES,
            "calibrate": 2 * logits + workload.pixels * LABEL_BYTES, "copy": 2 * logits,
            "exp": 2 * workload.pixels * workload.num_classes * dtype.itemsize}[pass_name]


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


def pass_function(provider: str, pass_name: str, logits: torch.Tensor, prototypes: torch.Tensor,
                  resize: dict | None = None):
    """A zero-argument callable running ``pass_name`` with ``provider`` on ``logits`` (upsampled
    as ``resize`` says: on the fly, or written first by the ``interpolate+`` providers)."""
    resize = resize or {}
    if provider.endswith(LIMIT_SUFFIX):  # the same provider at the limit temperature=math.inf
        return _limit_pass(provider[:-len(LIMIT_SUFFIX)], pass_name, logits, resize)
    if provider == "copy":
        out = torch.empty_like(logits)
        return lambda: out.copy_(logits)
    if provider == "exp":  # into a preallocated tensor: a fresh output would time page faults
        source = F.interpolate(logits, mode="bilinear", **resize) if resize else logits
        out = torch.empty_like(source)
        return lambda: torch.exp(source, out=out)
    if provider in ("onnx", "onnx-argmax"):
        return _onnx_predict(logits, prototypes, resize, argmax_only=provider == "onnx-argmax")
    if provider in MATERIALISED:
        backend = MATERIALISED[provider]

        def materialised():
            upsampled = F.interpolate(logits, mode="bilinear", **resize)
            return pass_function(backend, pass_name, upsampled, prototypes)()

        return materialised
    if provider == "compile":
        stats = lambda: _compiled_stats(logits, 1.0, None)  # noqa: E731
        predict = lambda: _compiled_predict(logits, prototypes, 1.0)  # noqa: E731

        def calibrate():
            S, W, *_ = _compiled_stats(logits, 1.0, None)  # the reference also returns counts
            return _compiled_predict(logits, reference.prototypes_from_stats(S, W, "onehot"), 1.0)

        return {"stats": stats, "predict": predict, "calibrate": calibrate}[pass_name]
    backend = provider
    return {
        "stats": lambda: fastcal.prototype_stats(logits, backend=backend, **resize),
        "predict": lambda: fastcal.predict(logits, prototypes, backend=backend, **resize),
        "calibrate": lambda: fastcal.calibrate(logits, backend=backend, **resize),
    }[pass_name]


LIMIT_SUFFIX = "@inf"


def _limit_pass(provider: str, pass_name: str, logits: torch.Tensor, resize: dict):
    """:func:`pass_function` of ``provider`` at ``temperature=math.inf``, with the limit's own
    prototypes (built here, outside the timed call)."""
    prototypes = prototypes_for(logits, resize, math.inf)
    if provider == "onnx":
        return _onnx_predict(logits, prototypes, resize, temperature=math.inf)
    options = {"backend": provider, "temperature": math.inf, **resize}
    return {
        "stats": lambda: fastcal.prototype_stats(logits, **options),
        "predict": lambda: fastcal.predict(logits, prototypes, **options),
        "calibrate": lambda: fastcal.calibrate(logits, **options),
    }[pass_name]


def cases(device: str):
    """``(workload, dtype, provider, pass)`` rows for ``device``, and ``(row, reason)`` left out.

    On CPU the suite must finish in minutes on 2 cores, so the slow providers run on
    the Cityscapes N=1 image only: the eager reference (its predict takes 3 s there and
    about 15 s on ADE20K) and torch.compile (30 s of compilation per graph). On CUDA
    torch.compile runs on that image only too (see the reason in ``left_out``).
    """
    rows, left_out = [], []
    upsampled = [w for w in WORKLOADS if WORKLOADS[w].upsample_to]
    plain = [w for w in WORKLOADS if w not in upsampled]
    if device == "cuda":
        for w, d in _product(upsampled, ("float32", "float16")):
            rows += [(w, d, "copy", "copy"), (w, d, "exp", "exp")]
            rows += [(w, d, p, s) for p in ("triton", "interpolate+triton") for s in PASSES]
            rows += [(w, d, "reference", "calibrate")]
        for w, d, p in _product(plain, DTYPES, ("copy", "triton", "torch", "reference", "compile")):
            if p == "compile" and w != "cityscapes-n1":
                continue
            rows += [(w, d, p, s) for s in ((p,) if p == "copy" else PASSES)]
        rows += [(w, d, "triton@inf", s) for w, d in _product(plain, ("float32", "float16")) for s in PASSES]
        left_out.append(("compile on workloads other than cityscapes-n1",
                         "the reference's predict loops over pixel blocks, which torch.compile unrolls: "
                         "thousands of blocks for the classification workload"))
        return rows, left_out
    for w, d in _product(upsampled, ("float32", "float16")):
        rows += [(w, d, "copy", "copy"), (w, d, "exp", "exp")]
        rows += [(w, d, p, s) for p in ("torch", "interpolate+torch") for s in PASSES]
        if d == "float32":
            rows += [(w, d, p, "calibrate") for p in ("torch-ops", "interpolate+torch-ops", "reference")]
            if w == "segformer-up4":
                rows += [(w, d, p, "predict") for p in ("onnx", "onnx-argmax", "onnx@inf")]
                rows += [(w, d, "torch@inf", s) for s in PASSES]
        else:
            left_out.append((f"{w} {d} torch-ops, reference", "float32 shows them; the CPU suite stays short"))
    for w, d in _product(plain, ("float32", "float16")):
        rows += [(w, d, "copy", "copy"), (w, d, "exp", "exp")]
        rows += [(w, d, "torch", s) for s in PASSES]
        if w == "cityscapes-n1":
            rows += [(w, d, "reference", s) for s in PASSES]
            if d == "float32":
                rows += [(w, d, p, s) for p in ("torch-ops", "compile") for s in PASSES]
                rows += [(w, d, p, "predict") for p in ("onnx", "onnx-argmax", "onnx@inf")]
                rows += [(w, d, "torch@inf", s) for s in PASSES]
            else:
                left_out.append((f"{w} {d} compile", "one compiled graph (float32) keeps the CPU suite short"))
        else:
            left_out.append((f"{w} {d} reference, compile", "too slow for the 5-minute CPU suite"))
    return rows, left_out


class ArgmaxHead(torch.nn.Module):
    """What a deployment without calibration runs: the argmax of the (upsampled) logits, the head
    mmdeploy's ``with_argmax`` or PaddleSeg's ``--output_op argmax`` export."""

    def __init__(self, resize: dict):
        super().__init__()
        self.resize = resize

    def forward(self, logits):
        z = logits.float()
        if self.resize:
            z = F.interpolate(z, mode="bilinear", **self.resize)
        return z.argmax(dim=1)


def onnx_session(module: torch.nn.Module, example: torch.Tensor, *, threads: int = 0, level: str = "all",
                 spinning: bool = False):
    """An ONNX Runtime CPU session of ``module`` exported by :func:`fastcal.export.export_onnx`:
    ``threads`` intra-op threads (0: ONNX Runtime's default, one per physical core), graph
    optimisation ``level`` ("disable", "basic", "extended", "all"), worker threads that spin
    between runs or not (off by default here: a spinning pool slows whatever runs next)."""
    import os
    import tempfile

    import onnxruntime

    from fastcal.export import export_onnx

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = {
        "disable": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "head.onnx")
        export_onnx(module, example, path)
        return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _onnx_predict(logits: torch.Tensor, prototypes: torch.Tensor, resize: dict, argmax_only: bool = False,
                  temperature: float = 1.0):
    """The exported calibration head (``fastcal.export``, its default layout) in ONNX Runtime's CPU
    execution provider, on the same logits and prototypes: what a deployment runs instead of
    ``fastcal.predict``; or, ``argmax_only``, the argmax head it replaces."""
    from fastcal.export import CalibrationHead

    module = ArgmaxHead(resize) if argmax_only else CalibrationHead(prototypes, temperature, **resize)
    session = onnx_session(module, torch.zeros(2, logits.shape[1], 16, 16, dtype=logits.dtype))
    feed = {session.get_inputs()[0].name: logits.numpy()}
    return lambda: session.run(None, feed)[0]


def _product(*iterables):
    import itertools

    return itertools.product(*iterables)


def prototypes_for(logits: torch.Tensor, resize: dict | None = None, temperature: float = 1.0) -> torch.Tensor:
    """The prototypes the predict pass uses: those of the (upsampled) logits themselves."""
    S, W = fastcal.prototype_stats(logits, backend="torch" if logits.device.type == "cpu" else "auto",
                                   temperature=temperature, **(resize or {}))
    return fastcal.prototypes_from_stats(S, W, temperature=temperature)
