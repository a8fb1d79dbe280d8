"""Datasets, one way through: :mod:`~opentrans_hf.data.sources` (the raw dataset) ->
:mod:`~opentrans_hf.data.vocabulary` (its class names) -> :mod:`~opentrans_hf.data.splits` (held-out classes,
validation part) -> :mod:`~opentrans_hf.data.transforms` (torch tensors), composed by
:mod:`~opentrans_hf.data.assembly`; :mod:`~opentrans_hf.data.specs` parses evaluation dataset specs and
:mod:`~opentrans_hf.data.benchmarks` knows the field's benchmarks. The embedded synthetic dataset's names are
re-exported here."""

from opentrans_hf.data.sources import find_columns, load_segmentation_dataset
from opentrans_hf.data.transforms import CLIP_MEAN, CLIP_STD, SegmentationTransform, collate_segmentation
from opentrans_hf.data.vocabulary import resolve_class_names
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
