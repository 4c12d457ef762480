"""Fitting calibrators from a model and a data loader."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from . import _checks, _upsample
from .adapters import batch_images, batch_valid, check_valid_source, model_device, model_logits, output_size, to_device
from .calibrator import LabelCalibrator

__all__ = ["fit_calibrator", "fit_calibrators"]


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

    Args:
        model (Callable): the segmentation model (an ``nn.Module`` or any callable of the images).
        loader (Iterable): batches as described above; an empty loader raises ``ValueError``.
        num_classes (int): C, the model's class count.
        device (torch.device | str | None): where the images go. Default: the model's parameters' device.
        calibrator (LabelCalibrator | None): accumulate into this one. Default: a new one.
        progress (bool): a progress bar on a terminal. Default True.
        size (tuple[int, ...] | str | None): upsample the logits to this size, or ``"input"``.
        scale_factor (float | tuple[float, ...] | None): or by this factor per side.
        align_corners (bool): as in ``F.interpolate``. Default False.
        valid (torch.Tensor | str | Callable | None): the pixels the statistics may use (see above).
        images (Callable | None): ``images(batch) -> inputs``.
        logits (Callable | None): ``logits(model, batch) -> logits``.
        **calibrator_kwargs: :class:`LabelCalibrator`'s options for a new calibrator.

    Returns:
        LabelCalibrator: the fitted calibrator.
    """
    _check_hooks(size, scale_factor, align_corners, valid, images, logits)
    if calibrator is None:
        calibrator = LabelCalibrator(num_classes, **calibrator_kwargs)
    elif calibrator_kwargs:
        raise TypeError(f"fit_calibrator: {', '.join(sorted(calibrator_kwargs))} configure a new calibrator; "
                        "with calibrator= given they would be ignored (set them when building it)")
    elif num_classes != calibrator.num_classes:
        raise ValueError(f"num_classes: {num_classes!r}, but the calibrator given has {calibrator.num_classes}")
    _fit(model, loader, [calibrator], device=device, progress=progress, size=size, scale_factor=scale_factor,
         align_corners=align_corners, valid=valid, images=images, logits=logits)
    return calibrator


def fit_calibrators(model: Callable, loader: Iterable, num_classes: int, *,
                    temperatures: Sequence = (1.0, 4.0, 16.0, math.inf), device=None, progress: bool = True,
                    size=None, scale_factor=None, align_corners=False, valid=None, images: Callable | None = None,
                    logits: Callable | None = None, **calibrator_kwargs) -> dict:
    """One :class:`LabelCalibrator` per temperature from one pass over ``loader``: ``{T: calibrator}``.

    The model runs once per batch and every calibrator adds that batch's logits, so each one's sums
    equal those :func:`fit_calibrator` gives it alone; the other arguments are
    :func:`fit_calibrator`'s (``calibrator_kwargs`` configure every calibrator: ``momentum``,
    ``empty``, ``confidence_power``...). ``temperatures``: distinct numbers, ``math.inf`` for the
    limit. Pick one by scoring each on a small labelled target sample (see the README's recipe and
    :func:`fastcal.metrics.mean_iou`).

    Args:
        temperatures (Sequence[float]): distinct positive numbers or ``math.inf``. Default
            ``(1, 4, 16, math.inf)``.
        model, loader, num_classes, device, progress, size, scale_factor, align_corners, valid,
            images, logits: as in :func:`fit_calibrator`.
        **calibrator_kwargs: :class:`LabelCalibrator`'s options but ``temperature``, for every calibrator.

    Returns:
        dict[float, LabelCalibrator]: one fitted calibrator per temperature, in the order given."""
    _check_hooks(size, scale_factor, align_corners, valid, images, logits)
    if "temperature" in calibrator_kwargs or "calibrator" in calibrator_kwargs:
        raise TypeError("fit_calibrators: temperatures= sets the calibrators' temperatures; calibrator= and "
                        "temperature= belong to fit_calibrator")
    if isinstance(temperatures, (str, bytes)) or not isinstance(temperatures, Sequence) or not temperatures:
        raise TypeError(f"temperatures: expected a non-empty sequence of numbers, got {temperatures!r}")
    checked = [_checks.check_temperature(t) for t in temperatures]
    if len(set(checked)) != len(checked):
        raise ValueError(f"temperatures: expected distinct values, got {list(temperatures)!r}")
    calibrators = {t: LabelCalibrator(num_classes, temperature=t, **calibrator_kwargs) for t in checked}
    _fit(model, loader, list(calibrators.values()), device=device, progress=progress, size=size,
         scale_factor=scale_factor, align_corners=align_corners, valid=valid, images=images, logits=logits)
    return calibrators


def _check_hooks(size, scale_factor, align_corners, valid, images, logits) -> None:
    _upsample.check_model_arguments(size, scale_factor, align_corners)
    for name, hook in (("images", images), ("logits", logits)):
        if hook is not None and not callable(hook):
            raise TypeError(f"{name}: expected None or a callable, got {type(hook).__name__}")
    check_valid_source(valid)


def _fit(model, loader, calibrators, *, device, progress, size, scale_factor, align_corners, valid, images,
         logits) -> None:
    """Run ``model`` over ``loader`` once in inference mode, adding each batch to every calibrator."""
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
                mask = batch_valid(valid, batch, z)
                for calibrator in calibrators:
                    calibrator.update(z, mask, size=output_size(size, inputs), scale_factor=scale_factor,
                                      align_corners=align_corners)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()


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
