"""Fitting a calibrator from a model and a data loader."""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from . import _upsample
from .adapters import batch_images, batch_valid, check_valid_source, model_device, model_logits, output_size, to_device
from .calibrator import LabelCalibrator


def fit_calibrator(model: Callable, loader: Iterable, num_classes: int, *, device=None,
                   calibrator: LabelCalibrator | None = None, progress: bool = True, size=None,
                   scale_factor=None, align_corners=False, valid=None, images: Callable | None = None,
                   logits: Callable | None = None, **calibrator_kwargs):
    """Run ``model`` over ``loader`` in inference mode and accumulate a :class:`LabelCalibrator`.

    ``loader`` yields image tensors, ``(images, ...)`` tuples or dicts with ``"pixel_values"``,
    ``"image"`` or ``"images"``; ``model`` returns logits ``[N, C, *spatial]``, a dict with ``"out"``
    (torchvision) or an object with ``.logits`` (HuggingFace). Labels in the loader, if any, are
    never looked at. ``size`` / ``scale_factor`` / ``align_corners`` upsample the model's logits on
    the fly (see :func:`fastcal.prototype_stats`), for models whose output is smaller than their
    input; ``size="input"`` means each batch's image height and width. A progress bar (tqdm) goes
    to stderr with ``progress`` when stderr is a terminal. The model is put in eval mode for the
    pass and back in training mode afterwards if it was.

    Hooks for other batch layouts and inference calls (mmsegmentation, MONAI; see the README):

    - ``images(batch) -> inputs``: the model input in a batch (default: as described above): a
      tensor, or tensors in lists, tuples or dicts (each moved to ``device``; other items pass as
      they are);
    - ``logits(model, batch) -> logits``: the whole inference step (a data preprocessor, sliding-
      window inference...), in place of ``model(images(batch))``; its result may be any of the
      output forms above. ``size="input"`` then needs ``images`` to know the images' size.

    ``valid`` masks pixels out of the statistics (padding, outside a field of view, ignore
    regions), as :meth:`LabelCalibrator.update` defines it (a bool [N, *spatial] at the logits'
    resolution, or at the output size with ``size`` / ``scale_factor``): a tensor (the same mask for
    every batch; [*spatial] is broadcast over the batch), the name of a field of each batch (a
    dict key or an attribute), or ``valid(batch) -> tensor``.

    ``device``: where the images go; by default the device of the model's parameters, and where
    the model has none (a plain callable, an inference function), the images stay where they are.

    With ``calibrator=`` the batches are added to that calibrator; ``num_classes`` must then be its
    own, and the keyword arguments that configure a new one (``temperature``, ``momentum``...) are
    refused rather than ignored.
    """
    _upsample.check_model_arguments(size, scale_factor, align_corners)
    for name, hook in (("images", images), ("logits", logits)):
        if hook is not None and not callable(hook):
            raise TypeError(f"{name}: expected None or a callable, got {type(hook).__name__}")
    check_valid_source(valid)
    if calibrator is None:
        calibrator = LabelCalibrator(num_classes, **calibrator_kwargs)
    elif calibrator_kwargs:
        raise TypeError(f"fit_calibrator: {', '.join(sorted(calibrator_kwargs))} configure a new calibrator; "
                        "with calibrator= given they would be ignored (set them when building it)")
    elif num_classes != calibrator.num_classes:
        raise ValueError(f"num_classes: {num_classes!r}, but the calibrator given has {calibrator.num_classes}")
    if device is None:
        device = model_device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(loader, desc="calibrating", unit="batch", disable=not progress or None,
                              leave=False):
                if logits is None:
                    inputs = to_device((images or batch_images)(batch), device)
                    output = model(inputs)
                else:
                    inputs = _input_images(batch, images) if size == "input" else None
                    output = logits(model, batch)
                z = model_logits(output)
                calibrator.update(z, batch_valid(valid, batch, z), size=output_size(size, inputs),
                                  scale_factor=scale_factor, align_corners=align_corners)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return calibrator


def _input_images(batch, images):
    """The images whose size ``size="input"`` means, beside a ``logits=`` hook."""
    if images is not None:
        return images(batch)
    try:
        return batch_images(batch)
    except TypeError:
        raise ValueError("size='input' with a logits= hook: the output size is the images' size, and this "
                         f"batch ({type(batch).__name__}) holds no image tensor where fastcal looks; give "
                         "images=lambda batch: ... returning the images the logits hook feeds the model") from None
