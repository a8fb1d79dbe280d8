"""mIoU from our confusion matrix vs torchmetrics' MulticlassJaccardIndex, and the evaluate module."""

import math

import numpy as np
import pytest
import torch

from opentrans_hf.training.metrics import MEAN_IOU_PATH, SegmentationMetric, confusion_matrix

torchmetrics = pytest.importorskip("torchmetrics")


def random_batch(seed, num_classes=6, shape=(3, 17, 23)):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.1] = 255
    preds = torch.where(torch.rand(shape, generator=g) < 0.6, labels.clamp(max=num_classes - 1),
                        torch.randint(0, num_classes, shape, generator=g))
    return preds, labels


def test_matches_torchmetrics_over_batches():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    ours = SegmentationMetric(6, ignore_index=255)
    jac = MulticlassJaccardIndex(num_classes=6, ignore_index=255, average="macro")
    per = MulticlassJaccardIndex(num_classes=6, ignore_index=255, average="none")
    acc = MulticlassAccuracy(num_classes=6, ignore_index=255, average="micro")
    for seed in range(4):
        p, l = random_batch(seed)
        ours.update(p, l)
        jac.update(p, l), per.update(p, l), acc.update(p, l)
    res = ours.compute()
    assert res["mean_iou"] == pytest.approx(float(jac.compute()), abs=1e-6)
    np.testing.assert_allclose(res["per_category_iou"], per.compute().numpy(), atol=1e-6)
    assert res["overall_accuracy"] == pytest.approx(float(acc.compute()), abs=1e-6)


def test_absent_class_is_left_out_like_torchmetrics():
    from torchmetrics.classification import MulticlassJaccardIndex

    p, l = random_batch(7, num_classes=4)  # classes 4 and 5 of 6 never appear
    ours = SegmentationMetric(6)
    ours.update(p, l)
    res = ours.compute()
    assert math.isnan(res["per_category_iou"][5])
    jac = MulticlassJaccardIndex(num_classes=6, ignore_index=255, average="macro")
    assert res["mean_iou"] == pytest.approx(float(jac(p, l)), abs=1e-6)


def test_label_outside_classes_is_a_clear_error():
    with pytest.raises(ValueError, match=r"label value 9 is outside the 6 classes \[0, 5\]"):
        confusion_matrix(torch.tensor([[1, 2]]), torch.tensor([[9, 2]]), 6)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 6)


def test_local_evaluate_module_matches():
    import evaluate

    metric = evaluate.load(MEAN_IOU_PATH)
    preds, refs, ours = [], [], SegmentationMetric(6)
    for seed in range(3):
        p, l = random_batch(seed, shape=(9, 11))
        preds.append(p.numpy()), refs.append(l.numpy()), ours.update(p, l)
    res = metric.compute(predictions=preds, references=refs, num_labels=6, ignore_index=255)
    expected = ours.compute()
    assert res["mean_iou"] == pytest.approx(expected["mean_iou"])
    assert res["overall_accuracy"] == pytest.approx(expected["overall_accuracy"])
    with pytest.raises(ValueError, match="example 1: label value 7"):
        bad = [refs[0], np.full((9, 11), 7)]
        metric.compute(predictions=preds[:2], references=bad, num_labels=6, ignore_index=255)
