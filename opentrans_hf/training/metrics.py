"""Semantic-segmentation metrics from a confusion matrix accumulated in torch.

:class:`SegmentationMetric` accumulates ``confusion[label, prediction]`` on the predictions' device,
sums it across processes (``torch.distributed`` / Accelerate), and computes mean IoU, pixel accuracy
and per-class IoU the way the Hub's ``mean_iou`` metric and torchmetrics' ``MulticlassJaccardIndex``
do: a class that appears neither in the labels nor in the predictions has no IoU (NaN) and is left out
of the mean. The same computation is shipped as a local ``evaluate`` module (:data:`MEAN_IOU_PATH`),
since ``evaluate.load("mean_iou")`` needs the Hub.

Units: every value is a fraction of 1 (as the Hub metric returns it), and stays one in JSON files
(``metrics.json``, ``evaluate --out``); what people read shows percent with two decimals
(:func:`opentrans_hf.training.evaluation.percent`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

MEAN_IOU_PATH = str(Path(__file__).parent / "mean_iou" / "mean_iou.py")
"""``evaluate.load(MEAN_IOU_PATH)`` loads the offline mean-IoU metric."""


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int | None = 255) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows = label, columns = prediction; pixels whose
    label is ``ignore_index`` are left out. Values outside ``[0, num_classes)`` are an error."""
    if preds.shape != labels.shape:
        raise ValueError(f"predictions have shape {tuple(preds.shape)} but labels have shape {tuple(labels.shape)}")
    preds = preds.reshape(-1).long()
    labels = labels.reshape(-1).long()
    if ignore_index is not None:
        keep = labels != ignore_index
        preds, labels = preds[keep], labels[keep]
    for what, t in (("label", labels), ("prediction", preds)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            bad = t[(t < 0) | (t >= num_classes)][0].item()
            raise ValueError(f"{what} value {bad} is outside the {num_classes} classes [0, {num_classes - 1}]"
                             + (f" (ignore index {ignore_index})" if ignore_index is not None else ""))
    idx = labels * num_classes + preds
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(confusion: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """mean_iou, mean_accuracy, overall_accuracy (pixel accuracy), per_category_iou/accuracy: fractions of 1."""
    c = confusion.double()
    tp = c.diag()
    label_count = c.sum(1)
    pred_count = c.sum(0)
    union = label_count + pred_count - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    acc = torch.where(label_count > 0, tp / label_count.clamp_min(1), torch.full_like(tp, math.nan))
    total = float(c.sum())
    out = {
        "mean_iou": _nanmean(iou),
        "mean_accuracy": _nanmean(acc),
        "overall_accuracy": float(tp.sum()) / total if total > 0 else math.nan,
        "per_category_iou": iou.tolist(),
        "per_category_accuracy": acc.tolist(),
    }
    if class_names is not None:
        if len(class_names) != confusion.shape[0]:
            raise ValueError(f"{len(class_names)} class names for a {confusion.shape[0]}-class confusion matrix")
        out["per_class_iou"] = dict(zip(class_names, out["per_category_iou"]))
    return out


def _nanmean(t: torch.Tensor) -> float:
    valid = ~torch.isnan(t)
    return float(t[valid].mean()) if bool(valid.any()) else math.nan


class SegmentationMetric:
    """Accumulate predictions and labels batch by batch; ``compute()`` at the end.

    ``update(preds, labels)`` takes ``(B, H, W)`` (or ``(H, W)``) integer tensors, or lists of them.
    Under several processes, call ``compute(accelerator)`` (or with ``torch.distributed`` initialised)
    on every process: the confusion matrices are summed first, so every process gets the same numbers.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, class_names: list[str] | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names
        self.confusion: torch.Tensor | None = None

    def reset(self) -> None:
        self.confusion = None

    def update(self, preds, labels) -> None:
        if isinstance(preds, (list, tuple)):
            if len(preds) != len(labels):
                raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
            for p, l in zip(preds, labels):
                self.update(p, l)
            return
        cm = confusion_matrix(preds, labels.to(preds.device), self.num_classes, self.ignore_index)
        self.confusion = cm if self.confusion is None else self.confusion + cm.to(self.confusion.device)

    def reduced_confusion(self, accelerator=None) -> torch.Tensor:
        """The confusion matrix summed over the processes of ``accelerator`` (a collective: every process
        calls it); without one, this process's own. Never a collective that was not asked for: code that runs
        on one process while a process group exists (the main process building the default CLIP and
        evaluating it) would wait for ever for the others."""
        cm = self.confusion
        if cm is None:
            cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        if accelerator is not None:
            cm = accelerator.reduce(cm.to(accelerator.device), reduction="sum")
        return cm.cpu()

    def compute(self, accelerator=None) -> dict:
        return metrics_from_confusion(self.reduced_confusion(accelerator), self.class_names)
