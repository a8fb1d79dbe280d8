"""Mean IoU as a local ``evaluate`` module (the Hub's ``mean_iou`` is unreachable offline).

    import evaluate
    from opentrans_hf.training.metrics import MEAN_IOU_PATH
    metric = evaluate.load(MEAN_IOU_PATH)
    metric.compute(predictions=[...], references=[...], num_labels=59, ignore_index=255)

Same arguments and output keys as the Hub's ``mean_iou`` (``reduce_labels`` included); the numbers
come from :mod:`opentrans_hf.training.metrics`, the confusion-matrix code the trainer uses.
"""

import datasets
import evaluate
import numpy as np
import torch

from opentrans_hf.training.metrics import confusion_matrix, metrics_from_confusion

_DESCRIPTION = "Mean intersection-over-union, mean and overall pixel accuracy from a confusion matrix."
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of (H, W) integer label maps.
    references: list of (H, W) integer label maps (ground truth).
    num_labels: number of classes.
    ignore_index: label value to ignore (e.g. 255).
    reduce_labels: map label 0 to ignore_index and subtract 1 from the others (ADE20K convention).
Returns:
    mean_iou, mean_accuracy, overall_accuracy, per_category_iou, per_category_accuracy.
"""


class MeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
        )

    def _compute(self, predictions, references, num_labels, ignore_index=255, reduce_labels=False):
        total = torch.zeros(num_labels, num_labels, dtype=torch.long)
        for i, (p, r) in enumerate(zip(predictions, references)):
            p = torch.as_tensor(np.asarray(p, dtype=np.int64))
            r = torch.as_tensor(np.asarray(r, dtype=np.int64))
            if reduce_labels:
                r = torch.where(r == 0, ignore_index, r - 1)
                r = torch.where(r == ignore_index - 1, ignore_index, r)
            try:
                total += confusion_matrix(p, r, num_labels, ignore_index)
            except ValueError as err:
                raise ValueError(f"example {i}: {err}") from None
        out = metrics_from_confusion(total)
        out["per_category_iou"] = np.array(out["per_category_iou"])
        out["per_category_accuracy"] = np.array(out["per_category_accuracy"])
        return out
