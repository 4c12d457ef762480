"""What fastcal needs from a segmentation model and its data: the logits in a model's output, the
images in a loader's batch, a mask in any of the forms users hold one, and the output size a
``size="input"`` option means.

Every entry point that takes logits or a mask goes through these (the functional API, the
calibrator, :mod:`fastcal.fit`, :mod:`fastcal.nn` and :mod:`fastcal.export`), so they all take the
same forms.
"""
from __future__ import annotations

import torch


def logits_of(output):
    """The logits in a segmentation model's output: a tensor, torchvision's ``{"out": ...}``, or an
    object with ``.logits`` (HuggingFace transformers); anything else is returned as it is, for the
    caller's check to refuse with the argument's name."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "out" in output:
        return output["out"]
    logits = getattr(output, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else output


def model_logits(output) -> torch.Tensor:
    """:func:`logits_of` a model's output, which must hold logits (``TypeError`` otherwise)."""
    logits = logits_of(output)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"model output: expected a logits tensor, a dict with 'out' (torchvision) or an object with "
        f".logits (transformers), got {type(output).__name__}"
    )


def output_size(size, images: torch.Tensor | None):
    """``size`` as the ops take it: ``"input"`` means the images' height and width."""
    if size != "input":
        return size
    if not isinstance(images, torch.Tensor):
        raise ValueError("size='input': the images' size is unknown (give the images= hook)")
    return tuple(images.shape[-2:])


def batch_images(batch):
    """The model input in a batch from a data loader: the batch itself (a tensor), its first item
    (``(images, labels)``), or ``batch["pixel_values"]`` / ``batch["image"]`` / ``batch["images"]``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("pixel_values", "image", "images"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    if isinstance(batch, dict) and "inputs" in batch and "data_samples" in batch:
        raise TypeError("loader: an mmsegmentation batch ({'inputs', 'data_samples'}) needs the model's data "
                        "preprocessor: pass logits=lambda model, batch: ... (see the README's mmsegmentation recipe)")
    raise TypeError(
        "loader: expected batches that are image tensors, (images, ...) tuples or dicts with "
        f"'pixel_values', 'image' or 'images', got {type(batch).__name__}"
    )


def to_device(inputs, device):
    """``inputs`` on ``device`` (None: where they are): a tensor, or the tensors inside lists, tuples
    and dicts (models that take several images, or a dict of them); anything else passes as it is."""
    if device is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, (list, tuple)):
        moved = [to_device(item, device) for item in inputs]
        return type(inputs)(*moved) if hasattr(inputs, "_fields") else type(inputs)(moved)
    if isinstance(inputs, dict):
        return type(inputs)((key, to_device(value, device)) for key, value in inputs.items())
    return inputs


def model_device(model):
    """The device of the model's first parameter, or None (leave inputs where they are) when it has
    none: a plain callable, an inference function."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else None


MASK_FORMS = ("a mask tensor: bool, or integer or floating 0/1 (nonzero is valid), shaped [N, *spatial], "
              "[*spatial] (one mask for every image) or [N, 1, *spatial] (MONAI's channel dim)")


def mask_of(valid, logits: torch.Tensor):
    """``valid`` in the one form the ops take, a bool ``[N, *spatial]`` tensor, from any of
    :data:`MASK_FORMS`: a bool, integer or floating mask (nonzero is valid; the conversion reads no
    value back), ``[*spatial]`` broadcast over the batch, or ``[N, 1, *spatial]`` with the channel
    dim MONAI's masks carry. The forms are told apart by rank alone, so none is ambiguous. Anything
    else is returned as it is for the plan's check to refuse with the accepted forms."""
    if not isinstance(valid, torch.Tensor) or not isinstance(logits, torch.Tensor) or logits.dim() < 2:
        return valid
    if valid.layout != torch.strided or valid.is_nested or valid.dtype.is_complex:
        return valid
    if valid.dtype != torch.bool:
        valid = valid != 0
    if valid.dim() == logits.dim() and valid.shape[1] == 1:  # [N, 1, *spatial]
        valid = valid.squeeze(1)
    elif valid.dim() == logits.dim() - 2:  # [*spatial]: one mask for every image
        valid = valid.expand(logits.shape[0], *valid.shape)
    return valid


def check_valid_source(valid) -> None:
    """``valid`` as :func:`batch_valid` takes it: None, a mask tensor, a field name or a callable."""
    if valid is None or callable(valid) or isinstance(valid, str) or isinstance(valid, torch.Tensor):
        return
    raise TypeError(f"valid: expected None, {MASK_FORMS}, a batch field's name or a callable of the batch, "
                    f"got {type(valid).__name__}")


def batch_valid(valid, batch, logits: torch.Tensor):
    """The mask of one batch: ``valid`` itself (a tensor), the batch's field of that name, or
    ``valid(batch)``, in any of the forms :func:`mask_of` takes; on the logits' device."""
    if valid is None:
        return None
    if callable(valid) and not isinstance(valid, torch.Tensor):
        mask = valid(batch)
    elif isinstance(valid, str):
        mask = batch.get(valid) if isinstance(batch, dict) else getattr(batch, valid, None)
        if mask is None:
            raise ValueError(f"valid: the batch has no field {valid!r}")
    else:
        mask = valid
    mask = mask_of(mask, logits)
    return mask.to(logits.device) if isinstance(mask, torch.Tensor) else mask
