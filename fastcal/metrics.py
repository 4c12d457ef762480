"""Segmentation metrics: confusion matrix, per-class IoU, mIoU and pixel accuracy.

Works on any device; pixels whose target is ``ignore_index`` are left out.
"""
from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, *,
                     ignore_index: int = 255) -> torch.Tensor:
    """``M[t, p]`` = number of pixels of true class ``t`` predicted as ``p`` (int64 [C, C]).

    Args:
        pred (torch.Tensor): predicted labels, any integer dtype and shape, in ``[0, C)``.
        target (torch.Tensor): true labels, the same shape and device, in ``[0, C)`` or ``ignore_index``.
        num_classes (int): C.
        ignore_index (int): target label of pixels left out. Default 255.

    Returns:
        torch.Tensor: int64 [C, C] on the labels' device."""
    if pred.shape != target.shape:
        raise ValueError(f"pred, target: shapes differ ({tuple(pred.shape)} and {tuple(target.shape)})")
    if pred.device != target.device:
        raise ValueError(f"pred, target: on different devices ({pred.device} and {target.device})")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    if ((target < 0) | (target >= num_classes)).any():
        raise ValueError(f"target: labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}")
    if ((pred < 0) | (pred >= num_classes)).any():
        raise ValueError(f"pred: labels must lie in [0, {num_classes})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.view(num_classes, num_classes)


def iou_per_class(confusion: torch.Tensor) -> torch.Tensor:
    """``TP / (TP + FP + FN)`` per class, float64 [C]; NaN for a class absent from both.

    Args:
        confusion (torch.Tensor): [C, C] from :func:`confusion_matrix`."""
    confusion = confusion.double()
    tp = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(confusion: torch.Tensor) -> float:
    """Mean of the per-class IoU over the classes present in target or prediction.

    Args:
        confusion (torch.Tensor): [C, C] from :func:`confusion_matrix`."""
    return float(iou_per_class(confusion).nanmean())


def pixel_accuracy(confusion: torch.Tensor) -> float:
    """The share of counted pixels labelled right (NaN when none was counted).

    Args:
        confusion (torch.Tensor): [C, C] from :func:`confusion_matrix`."""
    total = confusion.sum()
    return float(confusion.diagonal().sum().double() / total) if total > 0 else float("nan")
