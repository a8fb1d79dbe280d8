"""Deprecated alias of 0.1's ``opentrans_hf.data.loading`` (removed in 0.3), which 0.2 split along the data
path: loading a dataset and finding its columns moved to :mod:`opentrans_hf.data.sources`, its class names
(:func:`resolve_class_names`, :func:`find_id2label`) to :mod:`opentrans_hf.data.vocabulary`. The names here
are those modules' own objects."""

from opentrans_hf.data.sources import (
    IMAGE_COLUMNS,
    IMAGE_SUFFIXES,
    LABEL_COLUMNS,
    SPLIT_HINT,
    find_columns,
    find_prepared_record,
    load_segmentation_dataset,
)
from opentrans_hf.data.vocabulary import find_id2label, resolve_class_names
from opentrans_hf.utils.deprecation import warn_moved

__all__ = ["IMAGE_COLUMNS", "IMAGE_SUFFIXES", "LABEL_COLUMNS", "SPLIT_HINT", "find_columns", "find_id2label",
           "find_prepared_record", "load_segmentation_dataset", "resolve_class_names"]

warn_moved(__name__, "opentrans_hf.data.sources", "opentrans_hf.data.vocabulary", stacklevel=3)
