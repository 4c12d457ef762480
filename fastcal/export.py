"""Deploying a fitted calibrator where fastcal cannot go: a head of standard operations.

Calibrated prediction folds into operations every runtime has. With ``p = softmax(z / T)`` and
the prototypes centred on their mean ``c`` (``A[k] = P[k] - c``, as the kernels do, so float32
keeps its precision)::

    argmin_k ||p - P[k]||^2 = argmax_k  2 A[k] . (p - c) - ||A[k]||^2

Two layouts of that math, chosen with ``layout=``:

- ``"channels_last"`` (default; the fastest found for ONNX Runtime's CPU provider, see
  ``docs/benchmarks.md``): the classes are moved to the last axis once, by a matrix product with
  ``I / T`` that also divides by the temperature (ONNX Runtime fuses the transpose into it), then
  ``Softmax`` and ``ArgMax`` run on the last axis, where the runtime has its fast loops, and the
  distances are one ``MatMul`` with weights that absorb the centring and the bias: since the
  ``p`` of a pixel sums to 1, ``2 A[k] . (p - c) - ||A[k]||^2 = p . (2 A[k] - b[k] 1)`` with
  ``b[k] = 2 A[k] . c + ||A[k]||^2``. Works for logits of any rank ([N, C, *spatial]). With an
  upsampling, the classes move and ``T`` divides on the small tensor (interpolation is linear),
  and ``Resize`` runs channels-last.
- ``"nchw"``: softmax over the class axis and a centred 1x1 convolution; for runtimes
  that work NCHW (TensorRT). [N, C, H, W] logits only.

At the limit ``temperature=math.inf`` (:mod:`fastcal._space`) there is no softmax: the labels are
``argmax_k 2 A[k] . z + bias[k]``, one 1x1 product and an ArgMax (the mean of ``z`` drops out, as
each ``A[k]`` sums to 0); ``layout="nchw"`` and the scores centre ``z`` first, so a large common
offset of the logits costs them nothing.

Exactness: labels agree with :meth:`fastcal.LabelCalibrator.predict` except at genuine near-ties,
pixels whose two nearest prototypes are closer than float32 can resolve (the bound the
float64-oracle tests use, ``tests/oracle.py``); the channels-last form rounds the uncentred
products ``p . 2A[k]`` (error about 2^-24 of the prototypes' spread, not of the distances), so at
temperatures where every prototype is within about 1e-6 of uniform the ``"nchw"`` form is the
exact one. Scores (``-||p - P[k]||^2``) agree to 1e-5.

The max logit is subtracted before dividing by a temperature below 1, as the kernels do, so no
finite logit overflows ``z / T``. A logit of ``-inf`` (a class masked out) has probability 0, as
in :func:`fastcal.predict`, in both layouts, while the pixel has a finite logit. The head computes
in float32 whatever the logits' dtype (the cast is in the graph). Empty classes follow the
calibrator's ``empty`` policy: one-hot prototypes (``"onehot"``) or never chosen (``"skip"``:
``-inf`` scores). Ties go to the lowest class (ONNX ArgMax's default, ``select_last_index=0``).
``label_dtype`` (int64, int32 or uint8 when the classes fit) is the labels' type, as in
:func:`fastcal.predict`. The head holds a copy of the prototypes: later updates of the calibrator
do not change it.

:func:`calibration_head` builds the head as a ``torch.nn.Module``; :func:`calibrated_model` puts a
model in front of it, so one export holds both; :func:`export_onnx` exports either with dynamic
batch and spatial sizes. TensorRT users: take ``layout="nchw"``, keep the head in float32 (its
scores are differences of squared distances), and expect ArgMax to become a TopK layer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks, _cli, _space, _statefile, _upsample
from ._operands import centred_prototypes

__all__ = ["CalibrationHead", "CalibratedModel", "calibration_head", "calibrated_model", "export_onnx",
           "opset_range", "dynamic_shapes", "OPSET"]
from .adapters import model_logits, output_size
from .calibrator import LabelCalibrator

OUTPUTS = _checks.OUTPUTS
LAYOUTS = ("channels_last", "nchw")
OPSET = 18
INPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LABEL_DTYPES = {"int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}
# A skipped class's weight column in the channels-last head: its score p . (-M 1) = -M (p sums to
# 1) loses to every kept class (prototypes are at most 2^40: kept scores stay far above -2^100),
# and unlike -inf it never meets a 0 probability (0 * -inf is NaN).
_SKIPPED = -(2.0**100)
_LOWEST = torch.finfo(torch.float32).min


class CalibrationHead(nn.Module):
    """``forward(logits [N, C, *spatial]) -> labels [N, *spatial']`` of ``label_dtype``, or scores
    [N, C, *spatial'] float32 (``output="scores"``). Built by :func:`calibration_head`.

    Args:
        prototypes (torch.Tensor): [C, C], NaN rows for classes never predicted.
        temperature (float): T, or ``math.inf`` for the limit.
        output, size, scale_factor, align_corners, layout, label_dtype: as in :func:`calibration_head`.
        class_names (Sequence[str] | None): written into an exported file's metadata."""

    def __init__(self, prototypes: torch.Tensor, temperature: float, *, output: str = "labels", size=None,
                 scale_factor=None, align_corners: bool = False, class_names=None,
                 layout: str = "channels_last", label_dtype: torch.dtype = torch.int64):
        super().__init__()
        _checks.check_choice("output", output, OUTPUTS)
        _checks.check_choice("layout", layout, LAYOUTS)
        _upsample.check_model_arguments(size, scale_factor, align_corners)
        # the kernels' centring (skipped classes: a zero row and ||A[k]||^2 = +inf)
        A, centre, squared_norms = centred_prototypes(prototypes.detach().cpu())
        C = A.shape[0]
        _checks.check_label_dtype(label_dtype, C)
        skipped = torch.isinf(squared_norms)
        self.limit = _space.is_limit(temperature)
        if self.limit:  # scores 2 A[k] . (v - c) - ||A[k]||^2, v = z - mean z: linear in z (see _limit)
            skipped_score = torch.full_like(squared_norms, _SKIPPED)
            self.register_buffer("centre", centre)
            self.register_buffer("weight", (2.0 * A).view(C, C, 1, 1))
            # the bias of the raw logits z (the centring folded in), and of the centred d = v - c
            self.register_buffer("bias", torch.where(skipped, skipped_score, -(2.0 * A.double() @ centre.double()
                                                                             + (A.double() ** 2).sum(dim=1)).float()))
            self.register_buffer("centred_bias", torch.where(skipped, skipped_score, -squared_norms))
            self.register_buffer("skipped", skipped)
        elif layout == "nchw":
            self.register_buffer("centre", centre.view(1, C, 1, 1))
            self.register_buffer("weight", (2.0 * A).view(C, C, 1, 1))
            self.register_buffer("bias", -squared_norms)
        else:
            A64, c64 = A.double(), centre.double()
            folded = 2.0 * A64.T - (2.0 * A64 @ c64 + (A64 * A64).sum(dim=1))[None, :]  # [C (j), C (k)]
            folded[:, skipped] = _SKIPPED
            self.register_buffer("centre", centre)
            self.register_buffer("weight", folded.float())
            self.register_buffer("skipped", skipped)
            self.register_buffer("scale", torch.eye(C) / float(temperature))
        self.temperature = float(temperature)
        self.output, self.layout, self.label_dtype = output, layout, label_dtype
        self.size = size
        self.scale_factor = scale_factor
        self.align_corners = bool(align_corners)
        self.class_names = class_names

    @property
    def num_classes(self) -> int:
        return self.centre.numel()

    def forward(self, logits: torch.Tensor, size=None) -> torch.Tensor:
        """The labels (or scores) ``calibrator.predict`` gives for ``logits``.

        Args:
            logits (torch.Tensor): [N, C, *spatial] float32, float16 or bfloat16.
            size (tuple[int, int] | None): the output size when the head was built with
                ``size="input"`` (the model's input height and width; :func:`calibrated_model` passes it).

        Returns:
            torch.Tensor: labels [N, *spatial'] of the head's ``label_dtype``, or float32 scores [N, C, *spatial']."""
        z = logits.float()
        target = size if self.size == "input" else self.size
        resize = None
        if target is not None or self.scale_factor is not None:
            if z.dim() != 4:
                raise ValueError(f"logits: upsampling needs [N, C, H, W] logits, got {tuple(z.shape)}")
            resize = {"size": target} if target is not None else {"scale_factor": self.scale_factor}
        if self.limit:
            return self._limit(z, resize)
        if resize is not None and (self.layout == "nchw" or self.temperature < 1.0):
            z, resize = F.interpolate(z, mode="bilinear", align_corners=self.align_corners, **resize), None
        if self.temperature < 1.0:  # (z - max z) / T, as the kernels: no finite logit overflows
            z = z - z.amax(dim=1, keepdim=True)
        if self.layout == "nchw":
            return self._nchw(z)
        # the product with I / T meets every logit with the zeros of I: 0 * -inf would be NaN in every
        # class, so -inf (a masked-out class, or z - max z beyond float32) becomes the lowest float,
        # whose probability is 0 all the same
        return self._channels_last(z.clamp(min=_LOWEST), resize)

    def _channels_last(self, z: torch.Tensor, resize) -> torch.Tensor:
        N, C = z.shape[:2]
        if resize is None:
            spatial = z.shape[2:]
            z = z.flatten(2).transpose(1, 2) @ self.scale  # [N, pixels, C] / T: one fused product
        else:  # T >= 1: classes last and / T on the small tensor (interpolation is linear), then Resize
            h, w = z.shape[2:]
            z = (z.flatten(2).transpose(1, 2) @ self.scale).reshape(N, h, w, C)
            # NCHW for F.interpolate and back: ONNX Runtime cancels the two transposes through the
            # Resize, which then runs channels-last on the small tensor's classes
            z = F.interpolate(z.permute(0, 3, 1, 2), mode="bilinear", align_corners=self.align_corners,
                              **resize).permute(0, 2, 3, 1)
            spatial = z.shape[1:3]
            z = z.flatten(1, 2)
        p = torch.softmax(z, dim=-1)
        scores = p @ self.weight  # 2 A[k] . (p - c) - ||A[k]||^2
        if self.output == "labels":
            return scores.argmax(dim=-1).reshape(N, *spatial).to(self.label_dtype)
        d = p - self.centre
        scores = scores - (d * d).sum(dim=-1, keepdim=True)
        scores = torch.where(self.skipped, torch.full_like(scores, float("-inf")), scores)
        return scores.transpose(1, 2).reshape(N, C, *spatial)

    def _limit(self, z: torch.Tensor, resize) -> torch.Tensor:
        """The limit ``T = inf`` (:mod:`fastcal._space`): labels ``argmax_k 2 A[k] . z + bias[k]`` with
        ``bias[k] = -(2 A[k] . c + ||A[k]||^2)``, one 1x1 product and an ArgMax, exact since each
        ``A[k]`` sums to 0 (the mean of z drops out). The scores are linear in z and the bilinear
        weights sum to 1, so an upsampled head scores the small tensor and resizes the scores.
        ``layout="nchw"`` and the scores centre ``z`` first (``v = z - mean z``), so that a large
        common offset of the logits costs nothing."""
        if self.output == "labels" and self.layout != "nchw":
            if z.dim() != 4:  # any rank (never upsampled): the classes to the last axis, one product
                scores = z.flatten(2).transpose(1, 2) @ self.weight.view(*self.weight.shape[:2]).T + self.bias
                return scores.argmax(dim=-1).reshape(z.shape[0], *z.shape[2:]).to(self.label_dtype)
            scores = F.conv2d(z, self.weight, self.bias)
            if resize is not None:
                scores = F.interpolate(scores, mode="bilinear", align_corners=self.align_corners, **resize)
            return scores.argmax(dim=1).to(self.label_dtype)
        if resize is not None:
            z = F.interpolate(z, mode="bilinear", align_corners=self.align_corners, **resize)
        d = z - z.mean(dim=1, keepdim=True) - self.centre.view(1, -1, *[1] * (z.dim() - 2))
        weight = self.weight.view(*self.weight.shape[:2], *[1] * (z.dim() - 2))
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[z.dim()]
        scores = conv(d, weight, self.centred_bias)
        if self.output == "labels":
            return scores.argmax(dim=1).to(self.label_dtype)
        scores = scores - (d * d).sum(dim=1, keepdim=True)
        return torch.where(self.skipped.view(1, -1, *[1] * (z.dim() - 2)), float("-inf"), scores)

    def _nchw(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4:
            raise ValueError(f"logits: layout='nchw' takes [N, C, H, W] logits, got {tuple(z.shape)}; "
                             "layout='channels_last' takes any rank")
        d = torch.softmax(z / self.temperature, dim=1) - self.centre
        scores = F.conv2d(d, self.weight, self.bias)  # 2 d . A[k] - ||A[k]||^2
        if self.output == "labels":
            return scores.argmax(dim=1).to(self.label_dtype)
        return scores - (d * d).sum(dim=1, keepdim=True)

    def extra_repr(self) -> str:
        resize = f", size={self.size}" if self.size is not None else (
            f", scale_factor={self.scale_factor}" if self.scale_factor is not None else "")
        return (f"num_classes={self.num_classes}, temperature={self.temperature}, output={self.output!r}, "
                f"layout={self.layout!r}{resize}")


def calibration_head(calibrator: LabelCalibrator, *, output: str = "labels", size=None, scale_factor=None,
                     align_corners: bool = False, layout: str = "channels_last",
                     label_dtype: torch.dtype = torch.int64) -> CalibrationHead:
    """The calibrator's prediction as a module of standard operations (see the module docstring):
    ``forward(logits)`` gives what ``calibrator.predict(logits, output=output, size=size, ...,
    label_dtype=label_dtype)`` gives, for deployment in ONNX Runtime, TensorRT or a
    ``torch.export`` program.

    ``size``: (H', W'), or ``"input"`` for :func:`calibrated_model` to upsample to the images'
    size; ``scale_factor`` / ``align_corners`` as in :func:`fastcal.predict`. ``layout``:
    ``"channels_last"`` (default, any rank) or ``"nchw"`` (TensorRT). Refuses a calibrator with
    nothing to predict under ``empty="skip"``, as ``predict`` does.

    Args:
        calibrator (LabelCalibrator): its prototypes, temperature (the limit included) and class names.
        output (str): ``"labels"`` (default) or ``"scores"``.
        size (tuple[int, int] | str | None): the output size, or ``"input"``.
        scale_factor (float | tuple[float, float] | None): or the upsampling factor per side.
        align_corners (bool): as in ``F.interpolate``. Default False.
        layout (str): ``"channels_last"`` (default) or ``"nchw"``.
        label_dtype (torch.dtype): int64 (default), int32, int16 or uint8 (at most 256 classes).

    Returns:
        CalibrationHead: ``forward(logits [N, C, *spatial])`` -> labels [N, *spatial'] or scores."""
    if not isinstance(calibrator, LabelCalibrator):
        raise TypeError(f"calibrator: expected a fastcal.LabelCalibrator, got {type(calibrator).__name__}")
    return CalibrationHead(calibrator.prototypes, calibrator.temperature, output=output, size=size,
                           scale_factor=scale_factor, align_corners=align_corners,
                           class_names=calibrator.class_names, layout=layout, label_dtype=label_dtype)


class CalibratedModel(nn.Module):
    """``forward(images)``: the model's logits (a tensor, ``{"out": ...}`` or ``.logits``) through
    the calibration head. Built by :func:`calibrated_model`.

    Args:
        model (nn.Module): the segmentation model.
        head (CalibrationHead): the calibration head."""

    def __init__(self, model: nn.Module, head: CalibrationHead):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The head's output for the model's logits of ``images``.

        Args:
            images (torch.Tensor): the model's input batch.

        Returns:
            torch.Tensor: the head's output."""
        size = output_size(self.head.size, images) if self.head.size == "input" else None
        return self.head(model_logits(self.model(images)), size)


def calibrated_model(model: nn.Module, calibrator: LabelCalibrator, **head_options) -> CalibratedModel:
    """``model`` followed by :func:`calibration_head` (``head_options``: ``output``, ``size``
    (``"input"`` for the images' size), ``scale_factor``, ``align_corners``, ``layout``,
    ``label_dtype``): one module, so one
    ``torch.onnx.export`` or ``torch.export.export`` call exports model and calibration together.
    Put the model in eval mode first, as for any export.

    Args:
        model (nn.Module): returns logits [N, C, *spatial], ``{"out": ...}`` or an object with ``.logits``.
        calibrator (LabelCalibrator): as in :func:`calibration_head`.
        **head_options: :func:`calibration_head`'s keyword arguments.

    Returns:
        CalibratedModel: ``forward(images)`` -> the head's output."""
    return CalibratedModel(model, calibration_head(calibrator, **head_options))


def dynamic_shapes(module: nn.Module, example: torch.Tensor | None = None):
    """The batch and every spatial size of the first input dynamic (``torch.export`` form), for an
    ``example`` of any rank (default [N, C, H, W]). Sides start at 2 for a head, at 32 for a model
    in front of one (its strided layers need some input).

    Args:
        module (nn.Module): the head or calibrated model to export.
        example (torch.Tensor | None): an input of the rank to export. Default: rank 4."""
    dim = torch.export.Dim
    side = 32 if isinstance(module, CalibratedModel) else 2
    rank = 4 if example is None else example.dim()
    names = ("height", "width") if rank == 4 else tuple(f"side{i}" for i in range(rank - 2))
    return ({0: dim("batch", min=1), **{2 + i: dim(name, min=side) for i, name in enumerate(names)}},)


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | os.PathLike, *, opset: int = OPSET) -> None:
    """Export ``module`` (a head or a calibrated model) to ONNX at ``path``: opset ``opset`` (from
    :data:`OPSET`, where the exporter's own operator implementations begin, to the newest the
    installed ``onnx`` knows), with dynamic batch, height and width, traced with ``example``.
    Input ``"input"``, output ``"output"``; the class names of a head built from a named
    calibrator in the model's metadata (``class_names``, JSON). Needs the ``export`` extra (onnx,
    onnxscript). Trace with a batch of at least 2 images and sides of at least 2: a size of 1 would
    be taken as fixed. The file is written atomically, with the mode the umask gives new files
    (:func:`fastcal._statefile.write_atomically`).

    Args:
        module (nn.Module): a :class:`CalibrationHead` or :class:`CalibratedModel`.
        example (torch.Tensor): an input to trace with, [N >= 2, C, *spatial >= 2] for a head.
        path (str | os.PathLike): the ``.onnx`` file to write.
        opset (int): the ONNX opset, :func:`opset_range`. Default :data:`OPSET`."""
    import onnx  # the export extra: imported where it is needed

    low, high = opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise ValueError(f"opset: expected an int in [{low}, {high}], got {opset!r}")
    module = module.eval()
    with torch.no_grad():
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset,
                                    dynamic_shapes=dynamic_shapes(module, example), input_names=["input"],
                                    output_names=["output"], verbose=False)
    model = program.model_proto
    written = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:  # the exporter falls back to another opset with a warning only
        raise ValueError(f"opset: the exporter wrote opset {written}, not the {opset} asked for")
    head = module.head if isinstance(module, CalibratedModel) else module
    if getattr(head, "class_names", None) is not None:
        onnx.helper.set_model_props(model, {"class_names": json.dumps(list(head.class_names))})
    _statefile.write_atomically(path, lambda f: f.write(model.SerializeToString()))


def opset_range() -> tuple[int, int]:
    """The ONNX opsets :func:`export_onnx` honours: 18 (the exporter's own implementations; older
    ones go through a converter that may fall back) to the newest the installed ``onnx`` knows."""
    import onnx  # the export extra: imported where it is needed

    return OPSET, onnx.defs.onnx_opset_version()


# ----- the command: fastcal export STATE.pt --out head.onnx -----------------------------------
def _opset(text: str) -> int:
    value = _cli.positive_int(text)
    low, high = opset_range()
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected an opset in [{low}, {high}], got {text!r}")
    return value


def add_arguments(parser) -> None:
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
    parser.add_argument("--input-dtype", choices=tuple(INPUT_DTYPES), default="float32",
                        help="the logits' type as the deployed model emits them (cast to float32 in the graph)")
    parser.add_argument("--label-dtype", choices=tuple(LABEL_DTYPES), default="int64",
                        help="the labels' type (uint8 up to 256 classes: an 8x smaller output than int64)")
    parser.add_argument("--layout", choices=LAYOUTS, default="channels_last",
                        help="channels_last (default: fastest in ONNX Runtime, any rank) or nchw (TensorRT)")
    parser.add_argument("--rank", type=int, choices=(3, 4, 5), default=4,
                        help="the logits' rank: 4 for [N, C, H, W] (default), 5 for volumes [N, C, D, H, W]")


def main(args) -> int:
    def refuse(message: str) -> int:
        print(f"fastcal export: {message}", file=sys.stderr)
        return 2

    if os.path.exists(args.out) and os.path.exists(args.state) and os.path.samefile(args.out, args.state):
        return refuse(f"--out {args.out!r} is the state file itself; name another file")
    if args.size and args.rank != 4:
        return refuse("--size: upsampling needs [N, C, H, W] logits (--rank 4)")
    if args.layout == "nchw" and args.rank != 4:
        return refuse("--layout nchw takes [N, C, H, W] logits (--rank 4); channels_last takes any rank")
    try:
        calibrator = LabelCalibrator.from_file(args.state, empty=args.empty)
    except FileNotFoundError:
        return refuse(f"{args.state}: no such file")
    except ValueError as error:  # a torn, altered or foreign file (from_file says which, and why)
        return refuse(str(error))
    size = tuple(args.size) if args.size else None
    try:
        head = calibration_head(calibrator, output=args.output, size=size, align_corners=args.align_corners,
                                layout=args.layout, label_dtype=LABEL_DTYPES[args.label_dtype])
    except ValueError as error:  # an option the state cannot take, or nothing to predict
        if str(error).startswith("label_dtype"):
            return refuse(f"--label-dtype {args.label_dtype}: {error} (use int32)")
        return refuse(f"{args.state}: {error}")
    C = calibrator.num_classes
    spatial = {3: "L", 4: "H, W", 5: "D, H, W"}[args.rank]
    example = torch.zeros(2, C, *[16] * (args.rank - 2), dtype=INPUT_DTYPES[args.input_dtype])
    export_onnx(head, example, args.out, opset=args.opset)
    kind = f"[N, {spatial}] {args.label_dtype} labels" if args.output == "labels" else \
        f"[N, {C}, {spatial}] float32 scores"
    print(f"wrote {args.out}: {C} classes, input 'input' [N, {C}, {spatial}] {args.input_dtype}, output "
          f"'output' {kind}{f' at {size[0]} x {size[1]}' if size else ''}, empty={calibrator.empty!r}, "
          f"layout={args.layout}")
    return 0
