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


def output_size(size, images: torch.Tensor):
    """``size`` as the ops take it: ``"input"`` means the images' height and width."""
    return tuple(images.shape[-2:]) if size == "input" else size


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
    raise TypeError(
        "loader: expected batches that are image tensors, (images, ...) tuples or dicts with "
        f"'pixel_values', 'image' or 'images', got {type(batch).__name__}"
    )
