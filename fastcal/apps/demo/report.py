"""Scores, text tables and figures for the demo and the study.

Figures use matplotlib, an optional extra (``pip install 'fastcal[plots]'``); :func:`pyplot` says
how to install it when it is missing. Differences of mIoU are given in points (``pt``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ... import metrics
from .scenes import CLASSES, PALETTE

INSTALL_HINT = "the figures need matplotlib: pip install 'fastcal[plots]' (or run with --no-figures)"


class FiguresUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to install it."""


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or :class:`FiguresUnavailable`."""
    try:
        import matplotlib
    except ImportError as error:
        raise FiguresUnavailable(INSTALL_HINT) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """mIoU, pixel accuracy and per-class IoU (None for a class absent from both)."""
    confusion = metrics.confusion_matrix(pred, target, len(CLASSES))
    iou = metrics.iou_per_class(confusion)
    return {"miou": metrics.mean_iou(confusion), "pixel_accuracy": metrics.pixel_accuracy(confusion),
            "iou": {name: (None if math.isnan(v) else v) for name, v in zip(CLASSES, iou.tolist())}}


def miou(pred: torch.Tensor, target: torch.Tensor) -> float:
    return metrics.mean_iou(metrics.confusion_matrix(pred, target, len(CLASSES)))


def points(before: float, after: float) -> str:
    """A change of mIoU in points: ``+3.1 pt``."""
    return f"{100 * (after - before):+.1f} pt"


def demo_table(results: dict) -> str:
    lines = ["", f"{'held-out images':40s}{'argmax':>9s}{'T = 1':>9s}{'change':>10s}{'T = inf':>9s}{'change':>10s}"]
    rows = [("target, calibrator fitted on target", "target", "calibrated"),
            ("source, calibrator fitted on source", "source", "calibrated_on_source"),
            ("source, calibrator fitted on target", "source", "calibrated")]
    for label, name, kind in rows:
        if kind not in results[name]:
            continue
        before, after = results[name]["argmax"]["miou"], results[name][kind]["miou"]
        line = f"{label:40s}{before:9.1%}{after:9.1%}{points(before, after):>10s}"
        if f"{kind}_limit" in results[name]:
            limit = results[name][f"{kind}_limit"]["miou"]
            line += f"{limit:9.1%}{points(before, limit):>10s}"
        lines.append(line)
    lines.append("")
    lines.append(f"{'per-class IoU':18s}" + "".join(f"{c[:8]:>9s}" for c in CLASSES))
    for name, kind, label in (("target", "argmax", "target argmax"), ("target", "calibrated", "target calibrated"),
                              ("target", "calibrated_limit", "target T = inf"),
                              ("source", "argmax", "source argmax"),
                              ("source", "calibrated_on_source", "source cal/source"),
                              ("source", "calibrated", "source cal/target")):
        if kind not in results[name]:
            continue
        iou = results[name][kind]["iou"]
        cells = "".join(f"{'-':>9s}" if iou[c] is None else f"{iou[c]:9.1%}" for c in CLASSES)
        lines.append(f"{label:18s}{cells}")
    lines.append("")
    lines.append(f"training: {results['train_seconds']:.1f} s; calibration "
                 f"({results['config']['calib_images']} unlabelled target images): "
                 f"{results['calibrate_seconds']:.2f} s; whole demo: {results['seconds']:.1f} s")
    return "\n".join(lines)


def colorize(labels: torch.Tensor) -> np.ndarray:
    return PALETTE[labels.cpu().numpy()]


def class_legend(figure, columns: int = 8) -> None:
    """The class colours, as a legend along the bottom of ``figure``."""
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=PALETTE[k] / 255.0, edgecolor="black", linewidth=0.5, label=name)
               for k, name in enumerate(CLASSES)]
    figure.legend(handles=handles, loc="lower center", ncol=columns, frameon=False, fontsize=9)


def write_panel(path: str, images, truth, argmax, calibrated) -> None:
    """One row per image: the image, its ground truth, the argmax and the calibrated labels, each
    prediction titled with its mIoU on that image; the class colours below."""
    plt = pyplot()
    rows = len(images)
    height, width = images.shape[-2:]
    figure, axes = plt.subplots(rows, 4, figsize=(4 * 2.6 * width / height / 2, rows * 1.5 + 0.8), squeeze=False)
    for i in range(rows):
        cells = [
            ("target image", images[i].permute(1, 2, 0).cpu().numpy().clip(0, 1)),
            ("ground truth", colorize(truth[i])),
            (f"argmax: mIoU {miou(argmax[i], truth[i]):.1%}", colorize(argmax[i])),
            (f"calibrated: mIoU {miou(calibrated[i], truth[i]):.1%}", colorize(calibrated[i])),
        ]
        for axis, (title, picture) in zip(axes[i], cells):
            axis.imshow(picture, interpolation="nearest")
            axis.set_title(title, fontsize=9)
            axis.set_xticks([])
            axis.set_yticks([])
    class_legend(figure)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
