"""What fastcal needs from a segmentation model and its data: the logits in a model's output, the
images in a loader's batch, and the output size a ``size="input"`` option means.

Shared by :mod:`fastcal.fit`, :mod:`fastcal.nn` and :mod:`fastcal.export`.
"""
from __future__ import annotations

import torch


def model_logits(output) -> torch.Tensor:
    """The logits in a segmentation model's output: a tensor, torchvision's ``{"out": ...}``, or an
    object with ``.logits`` (HuggingFace transformers)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "out" in output:
        return output["out"]
    logits = getattr(output, "logits", None)
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


def model_device(model):
    """The device of the model's first parameter, or None (leave inputs where they are) when it has
    none: a plain callable, an inference function."""
    parameters = getattr(model, "parameters", None)
    first = next(iter(parameters()), None) if callable(parameters) else None
    return first.device if first is not None else None


def check_valid_source(valid) -> None:
    """``valid`` as :func:`batch_valid` takes it: None, a bool tensor, a field name or a callable."""
    if valid is None or callable(valid) or isinstance(valid, str):
        return
    if not isinstance(valid, torch.Tensor):
        raise TypeError(f"valid: expected None, a bool tensor, a batch field's name or a callable of the batch, "
                        f"got {type(valid).__name__}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid: expected dtype torch.bool, got {valid.dtype}")


def batch_valid(valid, batch, logits: torch.Tensor):
    """The mask of one batch: ``valid`` itself (a tensor; one without the batch dim is broadcast over
    it), the batch's field of that name, or ``valid(batch)``; on the logits' device."""
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
    if isinstance(mask, torch.Tensor) and mask.dim() == logits.dim() - 2:  # one mask for every image
        mask = mask.expand(logits.shape[0], *mask.shape)
    return mask.to(logits.device) if isinstance(mask, torch.Tensor) else mask
