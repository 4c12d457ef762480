"""fastcal.metrics against an independent NumPy computation."""
import numpy as np
import pytest
import torch

from fastcal import metrics


def numpy_scores(pred, target, C, ignore=255):
    pred, target = pred.numpy().ravel(), target.numpy().ravel()
    keep = target != ignore
    pred, target = pred[keep], target[keep]
    confusion = np.zeros((C, C), np.int64)
    for t, p in zip(target, pred):
        confusion[t, p] += 1
    iou = []
    for k in range(C):
        tp = confusion[k, k]
        union = confusion[k].sum() + confusion[:, k].sum() - tp
        iou.append(tp / union if union else np.nan)
    return confusion, np.array(iou), np.nanmean(iou), np.trace(confusion) / confusion.sum()


@pytest.mark.parametrize("C", [2, 5, 19])
def test_scores_match_numpy(C):
    target = torch.randint(0, C, (3, 17, 13))
    target[0, :4] = 255
    pred = torch.where(torch.rand(3, 17, 13) < 0.7, target.clamp(max=C - 1), torch.randint(0, C, (3, 17, 13)))
    confusion = metrics.confusion_matrix(pred, target, C)
    ref_conf, ref_iou, ref_miou, ref_acc = numpy_scores(pred, target, C)
    assert np.array_equal(confusion.numpy(), ref_conf)
    np.testing.assert_allclose(metrics.iou_per_class(confusion).numpy(), ref_iou, equal_nan=True)
    assert metrics.mean_iou(confusion) == pytest.approx(ref_miou)
    assert metrics.pixel_accuracy(confusion) == pytest.approx(ref_acc)


def test_absent_classes_are_nan_and_left_out_of_the_mean():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 0])
    confusion = metrics.confusion_matrix(pred, target, 4)
    iou = metrics.iou_per_class(confusion)
    assert torch.isnan(iou[2:]).all()
    assert metrics.mean_iou(confusion) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_ignore_index_and_bad_labels():
    target = torch.tensor([0, 7, 1])
    pred = torch.tensor([0, 1, 1])
    confusion = metrics.confusion_matrix(pred, target, 2, ignore_index=7)
    assert confusion.sum() == 2
    with pytest.raises(ValueError, match="target: labels must lie in"):
        metrics.confusion_matrix(pred, target, 2)
    with pytest.raises(ValueError, match="pred: labels must lie in"):
        metrics.confusion_matrix(torch.tensor([0, 5, 1]), torch.tensor([0, 1, 1]), 2)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.confusion_matrix(pred[:2], target, 2)
