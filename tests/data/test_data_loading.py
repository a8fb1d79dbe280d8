"""Loading segmentation datasets from disk, image/label folders and the Hub (offline: clear error)."""

import importlib
import json
import sys

import datasets
import numpy as np
import pytest
from PIL import Image

from opentrans_hf.data import sources, vocabulary
from opentrans_hf.data.sources import find_columns, load_segmentation_dataset
from opentrans_hf.data.vocabulary import resolve_class_names


def write_folder(root, n=3, missing_label=False):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), i * 40, dtype=np.uint8)).save(root / "images" / f"{i:03d}.jpg")
        if not (missing_label and i == 1):
            Image.fromarray(np.full((8, 8), i, dtype=np.uint8)).save(root / "labels" / f"{i:03d}.png")


def test_image_label_folder(tmp_path):
    write_folder(tmp_path / "train")
    ds = load_segmentation_dataset(tmp_path, split="train")
    assert len(ds) == 3 and find_columns(ds) == ("image", "label")
    assert np.asarray(ds[2]["label"]).max() == 2
    write_folder(tmp_path / "bad", missing_label=True)
    with pytest.raises(ValueError, match="have no label map.*'001'"):
        load_segmentation_dataset(tmp_path / "bad")


def test_save_to_disk_dataset_dict_and_class_names(tmp_path):
    feats = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(),
                               "classes": datasets.Sequence(datasets.ClassLabel(names=["sky", "road", "car"]))})
    img = Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8))
    lab = Image.fromarray(np.zeros((4, 4), dtype=np.uint8))
    dd = datasets.DatasetDict({"validation": datasets.Dataset.from_dict(
        {"image": [img], "annotation": [lab], "classes": [[0, 2]]}, features=feats)})
    dd.save_to_disk(str(tmp_path / "dd"))
    ds = load_segmentation_dataset(tmp_path / "dd", split="validation")
    assert find_columns(ds) == ("image", "annotation")
    # a ClassLabel of another column (here: the classes present per image) does not name the label map
    with pytest.raises(ValueError, match=r"no class names.*column 'classes' has a ClassLabel"):
        resolve_class_names(ds)
    with pytest.raises(ValueError, match=r"splits \['validation'\]; split 'train'"):
        load_segmentation_dataset(tmp_path / "dd", split="train")
    with pytest.raises(ValueError, match="label column 'seg' is not in the dataset"):
        find_columns(ds, label_column="seg")


def test_class_names_from_list_and_id2label(tmp_path):
    assert resolve_class_names(class_names=["a", " b "]) == ["a", "b"]
    f = tmp_path / "id2label.json"
    f.write_text(json.dumps({"1": "road", "0": "sky"}))
    assert resolve_class_names(id2label=f) == ["sky", "road"]
    f.write_text(json.dumps({"0": "sky", "2": "car"}))
    with pytest.raises(ValueError, match="contiguous"):
        resolve_class_names(id2label=f)
    with pytest.raises(ValueError, match="no class names"):
        resolve_class_names(datasets.Dataset.from_dict({"x": [1]}))


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="'someone/ade-mini'.*not a local directory"):
        load_segmentation_dataset("someone/ade-mini")


def test_the_0_1_loading_module_warns_and_hands_out_the_moved_functions():
    sys.modules.pop("opentrans_hf.data.loading", None)
    with pytest.warns(FutureWarning, match=r"`opentrans_hf.data.loading` moved to `opentrans_hf.data.sources`"):
        loading = importlib.import_module("opentrans_hf.data.loading")
    for name in ("find_columns", "find_prepared_record", "load_segmentation_dataset", "LABEL_COLUMNS"):
        assert getattr(loading, name) is getattr(sources, name)
    for name in ("find_id2label", "resolve_class_names"):
        assert getattr(loading, name) is getattr(vocabulary, name)
