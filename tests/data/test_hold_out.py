"""``--validation_split_percentage`` (:func:`~opentrans_hf.data.splits.hold_out`) on every kind of dataset a job
loads: a ``Dataset.save_to_disk`` directory, a ``DatasetDict`` saved with only ``train``, a Hub-shaped parquet
copy (``data/train-*.parquet`` + ``id2label.json``) and the embedded default; through the data API and through
the train job. ``datasets``' own ``train_test_split`` fails on the first three (they are backed by files:
"Please use either keep_in_memory or indices_cache_file_name but not both") and would write index caches
beside the data."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image

from opentrans_hf.cli import main as cli_main
from opentrans_hf.data.assembly import distillation_split, load_source
from opentrans_hf.data.splits import hold_out

SIZE = 30  # the tiny CLIP's image size
N = 6  # 34% of 6 -> 2 held out, 4 for training
NAMES = ["floor", "wall", "sky"]


def examples(n: int = N):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(n)]
    labels = []
    for i in range(n):
        lab = np.zeros((SIZE, SIZE), np.uint8)
        lab[:, 10:20] = 1
        lab[:, 20:] = 2
        lab[0, 0] = i % 3  # one pixel tells the examples apart
        labels.append(Image.fromarray(lab))
    return Dataset.from_dict({"image": images, "label": labels},
                             features=Features({"image": ImageFeature(), "label": ImageFeature()}))


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def datasets_on_disk(tmp_path_factory):
    """``{kind: (path, class-name flags of the train job, the same for load_source)}`` for the file-backed
    layouts, each with only a train split."""
    root = tmp_path_factory.mktemp("hold_out")
    examples().save_to_disk(root / "flat")
    DatasetDict({"train": examples()}).save_to_disk(root / "train_only")
    DatasetDict({"train": examples()}).save_to_disk(root / "parent")
    (root / "names.json").write_text(json.dumps(dict(enumerate(NAMES))))
    hub = root / "hub_copy"
    (hub / "data").mkdir(parents=True)
    examples().to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    (hub / "id2label.json").write_text(json.dumps(dict(enumerate(NAMES))))
    names = (["--class_names", *NAMES], {"class_names": NAMES})
    return {"save_to_disk Dataset": (root / "flat", *names),
            "DatasetDict with only train": (root / "train_only", *names),
            "split directory of a DatasetDict": (root / "parent" / "train", ["--id2label", str(root / "names.json")],
                                                 {"id2label": str(root / "names.json")}),
            "Hub-shaped parquet copy": (hub, [], {})}


KINDS = ["save_to_disk Dataset", "DatasetDict with only train", "split directory of a DatasetDict",
         "Hub-shaped parquet copy"]


def label_pixels(ds) -> list:
    """Something that identifies each example (its first label pixel and a hash of its image)."""
    return [(int(np.asarray(ex["label"])[0, 0]), hash(np.asarray(ex["image"]).tobytes())) for ex in ds]


@pytest.mark.parametrize("kind", KINDS)
def test_hold_out_of_a_file_backed_dataset(datasets_on_disk, kind):
    path, _, names = datasets_on_disk[kind]
    before = files_under(path)
    source = load_source(str(path), "train", SIZE, **names)
    assert source["names"] == NAMES
    train, held = hold_out(source, 34, seed=0)
    assert (len(train["ds"]), len(held["ds"])) == (4, 2)
    assert held["split"] == "train[34% held out]" and train["split"] == "train"
    # the same choice as datasets' train_test_split(test_size=2, shuffle=True, seed=0) makes in memory
    reference = Dataset.from_dict(source["ds"].to_dict(), features=source["ds"].features).train_test_split(
        test_size=2, shuffle=True, seed=0)
    assert label_pixels(held["ds"]) == label_pixels(reference["test"])
    assert label_pixels(train["ds"]) == label_pixels(reference["train"])
    assert sorted(label_pixels(train["ds"]) + label_pixels(held["ds"])) == sorted(label_pixels(source["ds"]))
    assert files_under(path) == before, "nothing is written beside the data"
    # fixed by the seed
    assert label_pixels(hold_out(source, 34, seed=0)[1]["ds"]) == label_pixels(held["ds"])


def test_hold_out_of_a_read_only_save_to_disk_directory(tmp_path):
    examples().save_to_disk(tmp_path / "ro")
    paths = [tmp_path / "ro", *(tmp_path / "ro").iterdir()]
    for p in paths:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        if os.access(tmp_path / "ro", os.W_OK):
            pytest.skip("running as a user who can write to read-only directories")
        train, held = hold_out(load_source(str(tmp_path / "ro"), "train", SIZE, class_names=NAMES), 34)
        assert (len(train["ds"]), len(held["ds"])) == (4, 2)
    finally:
        for p in paths:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_hold_out_of_the_embedded_default_keeps_its_split():
    """The embedded dataset (in memory) gets the split it always got (train_test_split's permutation)."""
    source = load_source("embedded", "train", SIZE, embedded_size=12, seed=3)
    train, held = hold_out(source, 25, seed=3)
    reference = source["ds"].train_test_split(test_size=3, shuffle=True, seed=3, keep_in_memory=True)
    assert label_pixels(held["ds"]) == label_pixels(reference["test"])
    assert label_pixels(train["ds"]) == label_pixels(reference["train"])


@pytest.mark.parametrize("percentage", [0, 100, -5, float("nan"), "34", True])
def test_hold_out_refuses_a_percentage_outside_0_100(percentage):
    source = load_source("embedded", "train", SIZE, embedded_size=12)
    with pytest.raises(ValueError, match=r"'embedded' split 'train'.*held-out percentage"):
        hold_out(source, percentage)


def test_distillation_leaves_out_the_held_out_part_of_a_file_backed_dataset(datasets_on_disk):
    path, _, _ = datasets_on_disk["DatasetDict with only train"]
    distil = distillation_split(str(path), "train", SIZE, validation_split_percentage=34)
    _, held = hold_out(load_source(str(path), "train", SIZE, class_names=NAMES), 34)
    assert len(distil) == 4
    assert not set(label_pixels(distil.ds)) & set(label_pixels(held["ds"]))


def train_job(tiny_clip_dir, out, dataset, *extra):
    return cli_main(["train", "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out),
                     "--dataset", str(dataset), "--validation_split_percentage", "34", "--batch_size", "2",
                     "--max_steps", "1", "--embedded_size", "8", "--holdout_classes", "none", *extra])


@pytest.mark.parametrize("kind", KINDS)
def test_train_job_with_a_held_out_percentage(tiny_clip_dir, datasets_on_disk, tmp_path, kind):
    path, flags, _ = datasets_on_disk[kind]
    before = files_under(path)
    assert train_job(tiny_clip_dir, tmp_path / "run", path, *flags) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics["eval"]) == [f"{path}:train[34% held out]"]
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert files_under(path) == before


def test_train_job_with_a_held_out_percentage_of_the_embedded_default(tiny_clip_dir, tmp_path):
    assert train_job(tiny_clip_dir, tmp_path / "run", "embedded") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics["eval"]) == ["embedded:train[34% held out]"]
