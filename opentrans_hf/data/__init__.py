"""Datasets: loading HF segmentation datasets, torch transforms, the embedded synthetic dataset."""

from opentrans_hf.data.sources import find_columns, load_segmentation_dataset, resolve_class_names
from opentrans_hf.data.transforms import CLIP_MEAN, CLIP_STD, SegmentationTransform, collate_segmentation
from opentrans_hf.embedded.dataset import (
    CLASS_NAMES,
    HELD_OUT_CLASSES,
    embedded_dataset,
    make_synthetic_segmentation_dataset,
)

__all__ = [
    "CLASS_NAMES",
    "CLIP_MEAN",
    "CLIP_STD",
    "HELD_OUT_CLASSES",
    "SegmentationTransform",
    "collate_segmentation",
    "embedded_dataset",
    "find_columns",
    "load_segmentation_dataset",
    "make_synthetic_segmentation_dataset",
    "resolve_class_names",
]
