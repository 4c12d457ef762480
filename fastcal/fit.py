"""Fitting a calibrator from a model and a data loader."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from . import _upsample
from .calibrator import LabelCalibrator
from .adapters import batch_images, model_logits, output_size


def fit_calibrator(model: Callable, loader: Iterable, num_classes: int, *, device=None,
                   calibrator: LabelCalibrator | None = None, progress: bool = True, size=None,
                   scale_factor=None, align_corners=False, **calibrator_kwargs):
    """Run ``model`` over ``loader`` in inference mode and accumulate a :class:`LabelCalibrator`.

    ``loader`` yields image tensors, ``(images, ...)`` tuples or dicts with ``"pixel_values"``,
    ``"image"`` or ``"images"``; ``model`` returns logits ``[N, C, H, W]``, a dict with ``"out"``
    (torchvision) or an object with ``.logits`` (HuggingFace). Labels in the loader, if any, are
    never looked at. ``size`` / ``scale_factor`` / ``align_corners`` upsample the model's logits on
    the fly (see :func:`fastcal.prototype_stats`), for models whose output is smaller than their
    input; ``size="input"`` means each batch's image height and width. A progress bar (tqdm) goes
    to stderr with ``progress``. The model is put in eval mode
    for the pass and back in training mode afterwards if it was.

    With ``calibrator=`` the batches are added to that calibrator; ``num_classes`` must then be its
    own, and the keyword arguments that configure a new one (``temperature``, ``momentum``...) are
    refused rather than ignored.
    """
    _upsample.check_arguments((1, 1) if size == "input" else size, scale_factor, align_corners)
    if calibrator is None:
        calibrator = LabelCalibrator(num_classes, **calibrator_kwargs)
    elif calibrator_kwargs:
        raise TypeError(f"fit_calibrator: {', '.join(sorted(calibrator_kwargs))} configure a new calibrator; "
                        "with calibrator= given they would be ignored (set them when building it)")
    elif num_classes != calibrator.num_classes:
        raise ValueError(f"num_classes: {num_classes!r}, but the calibrator given has {calibrator.num_classes}")
    if device is None:
        parameters = getattr(model, "parameters", None)
        first = next(iter(parameters()), None) if parameters else None
        device = first.device if first is not None else torch.device("cpu")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="calibrating", unit="batch", disable=not progress, leave=False):
                images = batch_images(batch).to(device)
                calibrator.update(model_logits(model(images)), size=output_size(size, images),
                                  scale_factor=scale_factor, align_corners=align_corners)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return calibrator
