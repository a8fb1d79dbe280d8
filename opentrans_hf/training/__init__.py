"""Training and evaluation: the Accelerate loop, losses, the mIoU metric."""

from opentrans_hf.training.metrics import MEAN_IOU_PATH, SegmentationMetric, confusion_matrix, metrics_from_confusion

__all__ = ["MEAN_IOU_PATH", "SegmentationMetric", "confusion_matrix", "metrics_from_confusion"]
