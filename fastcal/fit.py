"""Fitting a calibrator from a model and a data loader."""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable

import torch

from .calibrator import LabelCalibrator


class Progress:
    """A one-line progress report on stderr, updated at most every 0.2 s."""

    def __init__(self, label: str, total: int | None = None, enabled: bool = True, stream=None):
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream or sys.stderr
        self.count, self.start, self._last = 0, time.perf_counter(), 0.0

    def update(self, n: int = 1, note: str = "") -> None:
        self.count += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.count == self.total):
            self._last = now
            of = f"/{self.total}" if self.total else ""
            self.stream.write(f"\r{self.label}: {self.count}{of} {note}  ")
            self.stream.flush()

    def close(self) -> float:
        elapsed = time.perf_counter() - self.start
        if self.enabled:
            self.stream.write(f"\r{self.label}: {self.count} done in {elapsed:.1f} s\n")
            self.stream.flush()
        return elapsed


def _images(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)):
        return batch[0]
    if isinstance(batch, dict):
        return batch["image"]
    raise TypeError(f"loader: batches must be tensors, (image, ...) tuples or dicts with 'image', got {type(batch).__name__}")


def _logits(output):
    if isinstance(output, dict):  # torchvision segmentation models return {"out": logits, ...}
        return output["out"]
    return getattr(output, "logits", output)  # HuggingFace models return an output object with .logits


def fit_calibrator(model: Callable, loader: Iterable, num_classes: int, *, device=None,
                   calibrator: LabelCalibrator | None = None, progress: bool = True, size=None,
                   scale_factor=None, align_corners=False, **calibrator_kwargs):
    """Run ``model`` over ``loader`` in inference mode and accumulate a :class:`LabelCalibrator`.

    ``loader`` yields image tensors, ``(images, ...)`` tuples or dicts with ``"image"``;
    ``model`` returns logits ``[N, C, H, W]``, a dict with ``"out"`` (torchvision) or an object
    with ``.logits`` (HuggingFace).
    Labels in the loader, if any, are never looked at. ``size`` / ``scale_factor`` /
    ``align_corners`` upsample the model's logits on the fly (see :func:`fastcal.prototype_stats`),
    for models whose output is smaller than their input.
    """
    calibrator = calibrator or LabelCalibrator(num_classes, **calibrator_kwargs)
    if device is None:
        parameters = getattr(model, "parameters", None)
        first = next(iter(parameters()), None) if parameters else None
        device = first.device if first is not None else torch.device("cpu")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    total = len(loader) if hasattr(loader, "__len__") else None
    bar = Progress("calibrating", total, enabled=progress)
    try:
        with torch.inference_mode():
            for batch in loader:
                calibrator.update(_logits(model(_images(batch).to(device))), size=size,
                                  scale_factor=scale_factor, align_corners=align_corners)
                bar.update()
    finally:
        bar.close()
        if was_training and hasattr(model, "train"):
            model.train()
    return calibrator
