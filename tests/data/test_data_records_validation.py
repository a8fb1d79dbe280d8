"""Reports that accept anything (issue 24, class 6), on the data side: every JSON file the data path reads back
(a dataset spec, an id2label file, a prepared benchmark's ``benchmark.json``, ``datasets``' own
``dataset_dict.json`` / ``state.json``) is checked field by field; an error names the file and the value. An
ignore value is a label value (>= 0) wherever it comes from."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image

from opentrans_hf.data.assembly import load_source, load_spec_split, load_split
from opentrans_hf.data.specs import read_spec_file
from opentrans_hf.data.vocabulary import read_id2label

SIZE = 30


def examples(n: int = 3) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset.from_dict(
        {"image": [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)],
         "label": [Image.fromarray((np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 3).astype(np.uint8))
                   for _ in range(n)]},
        features=Features({"image": ImageFeature(), "label": ImageFeature()}))


@pytest.fixture
def saved(tmp_path):
    DatasetDict({"validation": examples()}).save_to_disk(tmp_path / "ds")
    return tmp_path / "ds"


def spec_file(tmp_path, **spec):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize(("spec", "message"), [
    ({"dataset": "ds", "ignore_index": -1}, r"'ignore_index' must be a label value \(an integer >= 0\), got -1"),
    ({"dataset": "ds", "ignore_index": 2.5}, r"'ignore_index' must be a int, got 2\.5"),
    ({"dataset": "ds", "split": ""}, r"'split' is an empty string"),
    ({"dataset": "ds", "name": "  "}, r"'name' is an empty string"),
    ({"dataset": ""}, r"'dataset' is an empty string"),
])
def test_a_dataset_spec_is_checked(tmp_path, spec, message):
    path = spec_file(tmp_path, **spec)
    with pytest.raises(ValueError, match=message) as err:
        read_spec_file(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(("id2label", "message"), [
    ({"0": "floor", "1": 5, "2": "sky"}, r"class 1 has the name 5; class names are strings"),
    ({"0": "floor", "1": None}, r"class 1 has the name None"),
    ({"0": ["floor", "ground"]}, r"class 0 has the name \['floor', 'ground'\]"),
])
def test_id2label_names_are_strings(tmp_path, id2label, message):
    path = tmp_path / "id2label.json"
    path.write_text(json.dumps(id2label))
    with pytest.raises(ValueError, match=message) as err:
        read_id2label(str(path))
    assert str(path) in str(err.value)


def test_class_names_from_a_spec_are_strings(tmp_path, saved):
    path = spec_file(tmp_path, dataset="ds", id2label={"0": "floor", "1": 1, "2": "sky"})
    with pytest.raises(ValueError, match=r"class 1 has the name 1; class names are strings"):
        load_spec_split(read_spec_file(path), SIZE)


@pytest.mark.parametrize(("record", "message"), [
    ({"benchmark": "ade150", "ignore_index": "255"},
     r"'ignore_index' must be a label value \(an integer >= 0\), got '255'"),
    ({"benchmark": "ade150", "ignore_index": -1}, r"got -1"),
    ({"benchmark": ["ade150"]}, r"naming a known benchmark"),
])
def test_a_prepared_benchmark_record_is_checked(saved, record, message):
    (saved / "benchmark.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=message) as err:
        load_source(str(saved), "validation", SIZE)
    assert str(saved / "benchmark.json") in str(err.value)


def test_datasets_own_records_are_checked(saved):
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": "validation"}))
    with pytest.raises(ValueError, match=r"dataset_dict.json is not a DatasetDict.save_to_disk record: expected "
                                         r"\{\"splits\": \[names\]\}, got \{'splits': 'validation'\}"):
        load_source(str(saved), "validation", SIZE, class_names=["a", "b", "c"])
    (saved / "dataset_dict.json").write_text(json.dumps(["validation"]))
    with pytest.raises(ValueError, match=r"dataset_dict.json is not a DatasetDict.save_to_disk record"):
        load_source(str(saved), "validation", SIZE, class_names=["a", "b", "c"])
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["validation"]}))
    (saved / "validation" / "state.json").write_text("[]")
    with pytest.raises(ValueError, match=r"validation/state.json is not a Dataset.save_to_disk state"):
        load_source(str(saved), "validation", SIZE, class_names=["a", "b", "c"])


@pytest.mark.parametrize("ignore_index", [-1, True, 2.0])
def test_an_ignore_value_is_a_label_value(saved, ignore_index):
    with pytest.raises(ValueError, match=rf"ignore_index {ignore_index!r} is no label value \(an integer >= 0\)"):
        load_split(str(saved), "validation", SIZE, class_names=["a", "b", "c"], ignore_index=ignore_index)
    assert len(load_split(str(saved), "validation", SIZE, class_names=["a", "b", "c"], ignore_index=2)) == 3
