"""Dataset specs: which split of which dataset, and how to read its label maps (class names, label
reduction, void value, columns). Each evaluation dataset has its own. This module only parses them;
:func:`~opentrans_hf.data.assembly.load_spec_split` loads one along the data path.

A spec on the command line (``evaluate --datasets``, ``train`` / ``demo --eval_datasets``) is either

* ``NAME[:SPLIT]``: a dataset that carries its own class names (``embedded``, a benchmark name such as
  ``ade150`` (its Hub copy, names and label conventions; see ``opentrans-hf benchmarks``), a directory
  written by ``opentrans-hf prepare-dataset``, a directory or Hub repo with an ``id2label.json``, a
  label column with a ``ClassLabel`` feature); SPLIT defaults to ``validation``; or
* the path of a ``.json`` file with one object::

      {"dataset": "ade20k_dir",             # Hub name or a local copy of its repo, save_to_disk dir,
                                            # image/label folder, "embedded"
       "benchmark": "ade150",               # the data is this benchmark in its raw form: its names (with
                                            # synonyms), reduce_labels, ignore value; alone: its Hub copy
       "split": "validation",               # default "validation"
       "name": "ade150",                    # row name in the results; default "DATASET:SPLIT"
       "id2label": {"0": "wall", ...},      # or the path of an id2label JSON file ...
       "class_names": ["wall", ...],        # ... or a list ...
       "vocabulary": "ade150",              # ... or a named vocabulary (at most one of the three)
       "reduce_labels": true,               # label 0 -> ignored, the others -1 (ADE20K); default false
       "ignore_index": 255,                 # the dataset's label value for unlabelled pixels; default 255
       "image_column": "image", "label_column": "annotation"}   # default: detected

  ``dataset`` or ``benchmark`` is required.

  Relative paths in it (``dataset``, an ``id2label`` file) are relative to the spec file's directory
  (a ``dataset`` that is no path there is taken as given: a Hub name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from opentrans_hf.data.benchmarks import get_benchmark
from opentrans_hf.data.sources import benchmark_name
from opentrans_hf.utils.io import read_json

DEFAULT_SPLIT = "validation"
DEFAULT_IGNORE_INDEX = 255


@dataclass
class DatasetSpec:
    """One split of one dataset, with its class names source and label conventions."""

    dataset: str
    split: str = DEFAULT_SPLIT
    name: str | None = None
    id2label: str | dict | None = None
    class_names: list[str] | None = None
    vocabulary: str | None = None
    reduce_labels: bool = False
    ignore_index: int | None = None
    """None: 255, or what the benchmark / prepared record says."""
    image_column: str | None = None
    label_column: str | None = None
    benchmark: str | None = None
    """The benchmark the data is (:mod:`opentrans_hf.data.benchmarks`): names with synonyms, label conventions
    and, in ``evaluate``, the field's evaluation protocol."""
    origin: str | None = field(default=None, compare=False)
    """The spec file it was read from (None for ``NAME[:SPLIT]``)."""

    @property
    def row_name(self) -> str:
        """The key of its results (``DATASET:SPLIT`` unless the spec names it)."""
        return self.name or f"{self.dataset}:{self.split}"

    @property
    def label_options(self) -> dict:
        """The keyword arguments of :func:`~opentrans_hf.data.assembly.load_source` this spec sets."""
        return dict(class_names=self.class_names, id2label=self.id2label, vocabulary=self.vocabulary,
                    image_column=self.image_column, label_column=self.label_column, benchmark=self.benchmark)

    @property
    def is_file(self) -> bool:
        return self.origin is not None


SPEC_KEYS = tuple(f.name for f in fields(DatasetSpec) if f.name != "origin")
_TYPES = {"dataset": str, "split": str, "name": str, "id2label": (str, dict), "class_names": list,
          "vocabulary": str, "reduce_labels": bool, "ignore_index": int, "image_column": str, "label_column": str,
          "benchmark": str}


def is_spec_file(spec: str) -> bool:
    return str(spec).lower().endswith(".json")


def parse_dataset_spec(spec: str, default_split: str = DEFAULT_SPLIT) -> DatasetSpec:
    """A :class:`DatasetSpec` from ``NAME[:SPLIT]`` or from a ``.json`` spec file (see the module
    docstring). A local path may contain ':' only if it exists as given."""
    if is_spec_file(spec):
        return read_spec_file(spec, default_split)
    if Path(spec).exists() or ":" not in spec:
        name, split = spec, default_split
    else:
        name, _, split = spec.rpartition(":")
        split = split or default_split
    return DatasetSpec(dataset=name, split=split, benchmark=benchmark_name(name))


def read_spec_file(path: str | Path, default_split: str = DEFAULT_SPLIT) -> DatasetSpec:
    """A spec file, checked: unknown keys, wrong types and a missing ``dataset`` are errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset spec file {path} does not exist")
    raw = read_json(path, "dataset spec")
    where = f"dataset spec {path}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object {{\"dataset\": ..., \"split\": ...}}, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; the keys are {list(SPEC_KEYS)}")
    for key, value in raw.items():
        kinds = _TYPES[key]
        bad_bool = isinstance(value, bool) and kinds is int  # JSON true is not an ignore index
        if value is not None and (not isinstance(value, kinds) or bad_bool):
            expected = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
            raise ValueError(f"{where}: {key!r} must be a {expected}, got {json.dumps(value)}")
    if raw.get("ignore_index") is not None and raw["ignore_index"] < 0:
        raise ValueError(f"{where}: 'ignore_index' must be a label value (an integer >= 0), got {raw['ignore_index']}")
    for key in ("dataset", "split", "name", "benchmark", "vocabulary", "image_column", "label_column"):
        if isinstance(raw.get(key), str) and not raw[key].strip():
            raise ValueError(f"{where}: {key!r} is an empty string; leave it out for the default")
    if raw.get("benchmark"):
        try:
            raw["benchmark"] = get_benchmark(raw["benchmark"]).name
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        raw.setdefault("dataset", raw["benchmark"])
    if not raw.get("dataset"):
        raise ValueError(f"{where}: 'dataset' or 'benchmark' is required (a Hub name, a save_to_disk directory, an "
                         "image/label folder or 'embedded'; a benchmark name)")
    values = {k: v for k, v in raw.items() if v is not None}
    values.setdefault("split", default_split)
    here = path.parent
    near = here / values["dataset"]
    if not Path(values["dataset"]).is_absolute() and near.exists():
        values["dataset"] = str(near)
    if isinstance(values.get("id2label"), str) and not Path(values["id2label"]).is_absolute():
        values["id2label"] = str(here / values["id2label"])
    if "class_names" in values and not all(isinstance(c, str) for c in values["class_names"]):
        raise ValueError(f"{where}: 'class_names' must be a list of strings")
    if "benchmark" not in values:
        values["benchmark"] = benchmark_name(values["dataset"])
    return DatasetSpec(**values, origin=str(path))
