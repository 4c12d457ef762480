"""Deploying a fitted calibrator where fastcal cannot go: a head of standard operations.

Calibrated prediction folds into operations every runtime has. With ``p = softmax(z / T)``, the
prototypes ``P`` centred on their mean ``c`` (``A[k] = P[k] - c``, ``d = p - c``, as the kernels
do, so float32 keeps its precision)::

    argmin_k ||p - P[k]||^2 = argmax_k  2 d . A[k] - ||A[k]||^2

a 1x1 convolution of ``d`` with weight ``2A`` and bias ``-||A||^2``, then an argmax over the
classes; the scores ``-||p - P[k]||^2`` are that minus ``||d||^2``. :func:`calibration_head` builds
this as a ``torch.nn.Module`` of standard PyTorch operations (division, softmax, subtraction,
``conv2d``, ``argmax``; bilinear ``F.interpolate`` first when asked), which ``torch.onnx.export``
turns into Div, Softmax, Sub, Conv and ArgMax (Resize), and ``torch.export`` into core ATen
operations. :func:`calibrated_model` puts a model in front of it, so one export holds both.
:func:`export_onnx` exports either with dynamic batch, height and width.

The head computes in float32 whatever the logits' dtype (the cast is in the graph). Empty
classes follow the calibrator's ``empty`` policy: one-hot prototypes (``"onehot"``) or a bias of
``-inf`` (``"skip"``: never chosen while another class is left). Ties go to the lowest class
(ONNX ArgMax's default, ``select_last_index=0``). The head holds a copy of the prototypes: later
updates of the calibrator do not change it.

Labels agree with :meth:`fastcal.LabelCalibrator.predict` except at genuine near-ties, pixels
whose two nearest prototypes are closer than float32 can resolve (the bound the float64-oracle
tests use, ``tests/oracle.py``). TensorRT users: keep the head in float32 (its scores are
differences of squared distances), and expect ArgMax to become a TopK layer.
"""
from __future__ import annotations

import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks, _upsample
from ._common import centred_prototypes
from .adapters import model_logits, output_size
from .calibrator import LabelCalibrator

OUTPUTS = ("labels", "scores")
OPSET = 18


class CalibrationHead(nn.Module):
    """``forward(logits [N, C, H, W]) -> labels [N, H', W']`` int64, or scores [N, C, H', W']
    float32 (``output="scores"``). Built by :func:`calibration_head`."""

    def __init__(self, prototypes: torch.Tensor, temperature: float, *, output: str = "labels", size=None,
                 scale_factor=None, align_corners: bool = False, class_names=None):
        super().__init__()
        _checks.check_choice("output", output, OUTPUTS)
        _upsample.check_arguments((1, 1) if size == "input" else size, scale_factor, align_corners)
        # the kernels' centring (skipped classes: a zero row and ||A[k]||^2 = +inf, so bias -inf)
        A, centre, squared_norms = centred_prototypes(prototypes.detach().cpu())
        C = A.shape[0]
        self.register_buffer("centre", centre.view(1, C, 1, 1))
        self.register_buffer("weight", (2.0 * A).view(C, C, 1, 1))
        self.register_buffer("bias", -squared_norms)
        self.temperature = float(temperature)
        self.output = output
        self.size = size
        self.scale_factor = scale_factor
        self.align_corners = bool(align_corners)
        self.class_names = class_names

    @property
    def num_classes(self) -> int:
        return self.bias.shape[0]

    def forward(self, logits: torch.Tensor, size=None) -> torch.Tensor:
        """``size``: the output size when the head was built with ``size="input"`` (the model's
        input height and width; :func:`calibrated_model` passes it)."""
        z = logits.float()
        target = size if self.size == "input" else self.size
        if target is not None or self.scale_factor is not None:
            z = F.interpolate(z, size=target, scale_factor=None if target is not None else self.scale_factor,
                              mode="bilinear", align_corners=self.align_corners)
        # the max first, as the kernels do: (z - max z) / T overflows for no finite z and no T accepted
        z = (z - z.amax(dim=1, keepdim=True)) / self.temperature
        d = torch.softmax(z, dim=1) - self.centre
        scores = F.conv2d(d, self.weight, self.bias)  # 2 d . A[k] - ||A[k]||^2
        if self.output == "labels":
            return scores.argmax(dim=1)
        return scores - (d * d).sum(dim=1, keepdim=True)

    def extra_repr(self) -> str:
        resize = f", size={self.size}" if self.size is not None else (
            f", scale_factor={self.scale_factor}" if self.scale_factor is not None else "")
        return f"num_classes={self.num_classes}, temperature={self.temperature}, output={self.output!r}{resize}"


def calibration_head(calibrator: LabelCalibrator, *, output: str = "labels", size=None, scale_factor=None,
                     align_corners: bool = False) -> CalibrationHead:
    """The calibrator's prediction as a module of standard operations (see the module docstring):
    ``forward(logits)`` gives what ``calibrator.predict(logits, output=output, size=size, ...)``
    gives, for deployment in ONNX Runtime, TensorRT or a ``torch.export`` program.

    ``size``: (H', W'), or ``"input"`` for :func:`calibrated_model` to upsample to the images'
    size; ``scale_factor`` / ``align_corners`` as in :func:`fastcal.predict`. Refuses a
    calibrator with nothing to predict under ``empty="skip"``, as ``predict`` does."""
    if not isinstance(calibrator, LabelCalibrator):
        raise TypeError(f"calibrator: expected a fastcal.LabelCalibrator, got {type(calibrator).__name__}")
    return CalibrationHead(calibrator.prototypes, calibrator.temperature, output=output, size=size,
                           scale_factor=scale_factor, align_corners=align_corners,
                           class_names=calibrator.class_names)


class CalibratedModel(nn.Module):
    """``forward(images)``: the model's logits (a tensor, ``{"out": ...}`` or ``.logits``) through
    the calibration head. Built by :func:`calibrated_model`."""

    def __init__(self, model: nn.Module, head: CalibrationHead):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = output_size(self.head.size, images) if self.head.size == "input" else None
        return self.head(model_logits(self.model(images)), size)


def calibrated_model(model: nn.Module, calibrator: LabelCalibrator, **head_options) -> CalibratedModel:
    """``model`` followed by :func:`calibration_head` (``head_options``: ``output``, ``size``
    (``"input"`` for the images' size), ``scale_factor``, ``align_corners``): one module, so one
    ``torch.onnx.export`` or ``torch.export.export`` call exports model and calibration together.
    Put the model in eval mode first, as for any export."""
    return CalibratedModel(model, calibration_head(calibrator, **head_options))


def dynamic_shapes(module: nn.Module):
    """Batch, height and width of the first input dynamic (``torch.export`` form). Sides start at
    2 for a head, at 32 for a model in front of one (its strided layers need some input)."""
    dim = torch.export.Dim
    side = 32 if isinstance(module, CalibratedModel) else 2
    return ({0: dim("batch", min=1), 2: dim("height", min=side), 3: dim("width", min=side)},)


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | os.PathLike, *, opset: int = OPSET) -> None:
    """Export ``module`` (a head or a calibrated model) to ONNX at ``path``: opset ``opset`` (from
    :data:`OPSET`, where the exporter's own operator implementations begin, to the newest the
    installed ``onnx`` knows), with dynamic batch, height and width, traced with ``example``.
    Input ``"input"``, output ``"output"``; the class names of a head built from a named
    calibrator in the model's metadata (``class_names``, JSON). Needs the ``export`` extra (onnx,
    onnxscript). Trace with a batch of at least 2 images and sides of at least 2: a size of 1 would
    be taken as fixed. The file is written atomically (a temporary file renamed over ``path``)."""
    import json

    import onnx

    low, high = opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise ValueError(f"opset: expected an int in [{low}, {high}], got {opset!r}")
    module = module.eval()
    with torch.no_grad():
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                    dynamic_shapes=dynamic_shapes(module), input_names=["input"],
                                    output_names=["output"], verbose=False)
    model = program.model_proto
    written = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:  # the exporter falls back to another opset with a warning only
        raise ValueError(f"opset: the exporter wrote opset {written}, not the {opset} asked for")
    head = module.head if isinstance(module, CalibratedModel) else module
    if getattr(head, "class_names", None) is not None:
        onnx.helper.set_model_props(model, {"class_names": json.dumps(list(head.class_names))})
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fastcal-", suffix=".onnx")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def opset_range() -> tuple[int, int]:
    """The ONNX opsets :func:`export_onnx` honours: 18 (the exporter's own implementations; older
    ones go through a converter that may fall back) to the newest the installed ``onnx`` knows."""
    import onnx

    return OPSET, onnx.defs.onnx_opset_version()


# ----- the command: fastcal export STATE.pt --out head.onnx -----------------------------------
def _opset(text: str) -> int:
    import argparse

    from . import _cli

    value = _cli.positive_int(text)
    low, high = opset_range()
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected an opset in [{low}, {high}], got {text!r}")
    return value


def add_arguments(parser) -> None:
    from . import _cli

    parser.add_argument("state", help="a calibrator's state file (LabelCalibrator.save)")
    parser.add_argument("--out", required=True, type=_cli.output_file, help="the ONNX file to write")
    parser.add_argument("--output", choices=OUTPUTS, default="labels",
                        help="int64 labels [N, H, W] (default) or float32 scores [N, C, H, W]")
    parser.add_argument("--size", nargs=2, type=_cli.positive_int, metavar=("H", "W"),
                        help="upsample the logits bilinearly to H x W first")
    parser.add_argument("--align-corners", action="store_true", help="as F.interpolate's align_corners")
    parser.add_argument("--empty", choices=_checks.EMPTY_POLICIES, default=None,
                        help="classes no pixel was assigned to: one-hot prototypes or never chosen "
                             "(default: the policy saved in the state; onehot for states before version 3)")
    parser.add_argument("--opset", type=_opset, default=OPSET, help=f"ONNX opset (default {OPSET})")


def main(args) -> int:
    import sys

    def refuse(message: str) -> int:
        print(f"fastcal export: {message}", file=sys.stderr)
        return 2

    if os.path.exists(args.out) and os.path.exists(args.state) and os.path.samefile(args.out, args.state):
        return refuse(f"--out {args.out!r} is the state file itself; name another file")
    try:
        calibrator = LabelCalibrator.from_file(args.state, empty=args.empty)
        size = tuple(args.size) if args.size else None
        head = calibration_head(calibrator, output=args.output, size=size, align_corners=args.align_corners)
    except FileNotFoundError:
        return refuse(f"{args.state}: no such file")
    except ValueError as error:  # a torn, altered or foreign file, or nothing to predict
        message = str(error)
        if "not a readable fastcal state file" not in message:
            message = f"not a usable fastcal state file ({message})"
        return refuse(f"{args.state}: {message}")
    C = calibrator.num_classes
    export_onnx(head, torch.zeros(2, C, 16, 16), args.out, opset=args.opset)
    print(f"wrote {args.out}: {C} classes, input 'input' [N, {C}, H, W] float32, output 'output' "
          f"{'[N, H, W] int64 labels' if args.output == 'labels' else f'[N, {C}, H, W] float32 scores'}"
          f"{f' at {size[0]} x {size[1]}' if size else ''}, empty={calibrator.empty!r}")
    return 0
