"""Training and evaluation: the Accelerate loop, losses, the mIoU metric."""

from .metrics import MEAN_IOU_PATH, SegmentationMetric, confusion_matrix, metrics_from_confusion

__all__ = ["MEAN_IOU_PATH", "SegmentationMetric", "confusion_matrix", "metrics_from_confusion"]
