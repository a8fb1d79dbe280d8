"""Local copies of Hub dataset repos: scene_parse_150's parquet conversion (``scene_parsing/`` and
``instance_segmentation/`` configuration folders, ``<split>/0000.parquet``), a ``data/<split>-*.parquet``
repo, configurations declared in a dataset card, an image folder with a ``metadata.jsonl``; each split
as written, the benchmark's conventions for a copy of its repo, and the unhappy paths. Also
``prepare-dataset ade150`` from such a copy, pixel by pixel."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

from opentrans_hf.cli import main as cli_main
from opentrans_hf.commands import prepare_dataset
from opentrans_hf.data.assembly import load_source, make_split
from opentrans_hf.data.benchmarks.prepare import RawLayoutError
from opentrans_hf.data.sources import identify_source, load_segmentation_dataset

SIZE = 30
SPLITS = {"train": 3, "validation": 2}


def ade_rows(split: str, n: int, seed: int = 0):
    """``n`` images (RGB, random) and annotations (0 = other, 1..150: columns of several classes)."""
    rng = np.random.default_rng([seed, len(split)])
    images = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(n)]
    labels = []
    for i in range(n):
        lab = np.zeros((SIZE, SIZE), np.uint8)              # other
        lab[:, 5:12] = 1 + i                                # wall, building, sky, ...
        lab[:, 12:20] = 3                                   # sky
        lab[10:, 20:] = 150                                 # flag
        lab[:10, 20:] = rng.integers(0, 151, (10, SIZE - 20))
        labels.append(lab)
    return images, labels


def write_parquet(path: Path, images, labels, label_column="annotation"):
    """One parquet shard as the Hub stores an image dataset (images embedded as PNG bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset.from_dict({"image": [Image.fromarray(a) for a in images],
                            label_column: [Image.fromarray(a) for a in labels]},
                           features=Features({"image": ImageFeature(), label_column: ImageFeature()}))
    ds.to_parquet(str(path))


def scene_parse_150_copy(root: Path, configs=("scene_parsing", "instance_segmentation"), splits=SPLITS) -> dict:
    """A local copy of scene_parse_150's ``refs/convert/parquet``: ``<config>/<split>/0000.parquet`` and
    the ``.gitattributes`` a snapshot carries; returns ``{split: (images, annotations)}`` of scene_parsing."""
    written = {}
    for config in configs:
        for split, n in splits.items():
            images, labels = ade_rows(split, n, seed=0 if config == "scene_parsing" else 1)
            write_parquet(root / config / split / "0000.parquet", images, labels)
            if config == "scene_parsing":
                written[split] = (images, labels)
    (root / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
    return written


@pytest.fixture
def ade_copy(tmp_path):
    root = tmp_path / "scene_parse_150"
    return root, scene_parse_150_copy(root)


def rows_of(ds, label_column="annotation"):
    return [np.asarray(r["image"]) for r in ds], [np.asarray(r[label_column]) for r in ds]


# -- loading -----------------------------------------------------------------------------------------------
def test_each_split_of_a_scene_parse_150_copy_loads_from_the_root_or_its_configuration_folder(ade_copy):
    root, written = ade_copy
    for where in (root, root / "scene_parsing"):
        for split, (images, labels) in written.items():
            ds = load_segmentation_dataset(where, split)
            assert ds.column_names == ["image", "annotation"] and len(ds) == SPLITS[split]
            got_images, got_labels = rows_of(ds)
            for a, b in zip(got_images, images):
                np.testing.assert_array_equal(a, b)
            for a, b in zip(got_labels, labels):
                np.testing.assert_array_equal(a, b)
    # the other configuration's folder is other data, loaded as given
    other = load_segmentation_dataset(root / "instance_segmentation", "validation")
    assert not np.array_equal(np.asarray(other[0]["image"]), written["validation"][0][0])


def test_a_copy_of_scene_parse_150_is_ade150s_hub_copy_with_its_conventions(ade_copy):
    root, written = ade_copy
    for where in (root, root / "scene_parsing"):
        found = identify_source(str(where), "validation")
        assert (found.benchmark, found.hub_copy) == ("ade150", True) and "scene_parse_150" in found.how
        source = load_source(str(where), "validation", SIZE)
        assert source["benchmark"] == "ade150" and (source["image_column"], source["label_column"]) == ("image", "annotation")
        assert (source["reduce_labels"], source["ignore_index"]) == (True, 255)
        assert len(source["names"]) == 150 and source["prompts"][1] == ("building", "buildings", "edifice", "edifices")
        split = make_split(source, SIZE)
        for i, (_, label) in enumerate(zip(*written["validation"])):
            _, y = split[i]
            expected = np.where(label == 0, 255, label.astype(np.int64) - 1)  # reduce_labels: 0 = other
            np.testing.assert_array_equal(y.numpy(), expected)
    assert identify_source(str(root / "instance_segmentation"), "validation").benchmark is None
    # the data is ade150's: another benchmark for it is an error naming both
    with pytest.raises(ValueError, match="scene_parse_150.*benchmark 'ade150', not 'voc21'"):
        load_source(str(root), "validation", SIZE, benchmark="voc21")
    # a benchmark brings its own names: explicit ones are refused, as for the Hub id
    with pytest.raises(ValueError, match="brings its own class names"):
        load_source(str(root), "validation", SIZE, class_names=["a"])


def test_a_data_folder_repo_loads_with_the_names_beside_it(tmp_path):
    """A repo's main branch: ``data/<split>-00000-of-00001.parquet`` + an ``id2label.json``, not a benchmark."""
    root = tmp_path / "my-ade"
    for split, n in SPLITS.items():
        images, labels = ade_rows(split, n)
        labels = [np.minimum(lab, 2) for lab in labels]
        write_parquet(root / "data" / f"{split}-00000-of-00001.parquet", images, labels, label_column="label")
    (root / "id2label.json").write_text(json.dumps({"0": "floor", "1": "wall", "2": "sky"}))
    ds = load_segmentation_dataset(root, "train")
    assert len(ds) == 3 and ds.column_names == ["image", "label"]
    source = load_source(str(root), "validation", SIZE)
    assert source["benchmark"] is None and source["names"] == ["floor", "wall", "sky"]
    assert "reduce_labels" not in source and f"id2label.json in {root}" in source["vocabulary"]
    np.testing.assert_array_equal(np.asarray(source["ds"][1]["label"]), np.minimum(ade_rows("validation", 2)[1][1], 2))


def test_configurations_declared_in_the_dataset_card(tmp_path):
    """A README whose ``configs`` name scene_parse_150's configuration: it is picked by name."""
    root = tmp_path / "card"
    written = {}
    for config, folder in (("scene_parsing", "sp"), ("instance_segmentation", "inst")):
        for split, n in SPLITS.items():
            images, labels = ade_rows(split, n, seed=0 if folder == "sp" else 1)
            write_parquet(root / folder / f"{split}-00000-of-00001.parquet", images, labels)
            written[config, split] = labels
    card = ["---", "configs:"]
    for config, folder in (("scene_parsing", "sp"), ("instance_segmentation", "inst")):
        card += [f"- config_name: {config}", "  data_files:"]
        card += [f"  - split: {s}\n    path: {folder}/{s}-*" for s in SPLITS]
    (root / "README.md").write_text("\n".join([*card, "---", "# A copy", ""]))
    ds = load_segmentation_dataset(root, "validation")
    for a, b in zip(rows_of(ds)[1], written["scene_parsing", "validation"]):
        np.testing.assert_array_equal(a, b)
    assert identify_source(str(root), "validation").benchmark == "ade150"


def test_an_image_folder_with_metadata_loads_its_columns(tmp_path):
    root = tmp_path / "imagefolder"
    (root / "validation").mkdir(parents=True)
    lines = []
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "validation" / f"{i}.png")
        Image.fromarray(np.full((8, 8), i + 1, np.uint8)).save(root / "validation" / f"{i}_seg.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "annotation_file_name": f"{i}_seg.png"}))
    (root / "validation" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    ds = load_segmentation_dataset(root, "validation")
    assert ds.column_names == ["image", "annotation"]
    assert [int(np.asarray(r["annotation"]).max()) for r in ds] == [1, 2]


def test_unhappy_paths_name_the_folder_and_what_is_there(ade_copy, tmp_path):
    root, _ = ade_copy
    with pytest.raises(ValueError, match=r"configuration 'scene_parsing'\) has splits \['train', 'validation'\]; "
                                         r"split 'test' is not one of them"):
        load_segmentation_dataset(root, "test")
    with pytest.raises(ValueError, match=r"has splits \['train', 'validation'\]; split 'test'"):
        load_segmentation_dataset(root / "scene_parsing", "test")
    # several configurations, none of them known: listed, with how to pick one
    two = tmp_path / "two"
    for config in ("coarse", "fine"):
        images, labels = ade_rows("validation", 1)
        write_parquet(two / config / "validation" / "0000.parquet", images, labels)
    with pytest.raises(ValueError, match=rf"several configurations \['coarse', 'fine'\].*give the folder of the one to "
                                         rf"load as the dataset, e.g. {two / 'coarse'}"):
        load_segmentation_dataset(two, "validation")
    assert len(load_segmentation_dataset(two / "fine", "validation")) == 1
    # a folder with neither layout says what it expected, the Hub layout included
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"nor a copy of a Hub dataset repo .*CONFIG/validation/\*.parquet"):
        load_segmentation_dataset(tmp_path / "empty", "validation")
    # an empty split is an error
    write_parquet(tmp_path / "hollow" / "validation" / "0000.parquet", [], [])
    with pytest.raises(ValueError, match="split 'validation' has no examples"):
        load_segmentation_dataset(tmp_path / "hollow", "validation")


# -- prepare-dataset ade150 from a copy ----------------------------------------------------------------------
def prepare(raw_dir, out, **kwargs):
    return prepare_dataset.run(prepare_dataset.ARGUMENTS(benchmark="ade150", raw_dir=str(raw_dir), output_dir=str(out),
                                                         no_progress=True, **kwargs))


def test_prepare_ade150_from_a_hub_copy_pixel_by_pixel(ade_copy, tmp_path):
    root, written = ade_copy
    for where in (root, root / "scene_parsing"):
        out = tmp_path / f"prepared-{where.name}"
        record = prepare(where, out, splits=["validation", "train"])
        assert record["num_examples"] == {"validation": 2, "train": 3}
        assert record["raw_form"] == "local copy of scene_parse_150" + (
            ", configuration 'scene_parsing'" if where == root else "")
        assert json.loads((out / "benchmark.json").read_text())["benchmark"] == "ade150"
        assert json.loads((out / "id2label.json").read_text())["149"] == "flag"
        for split, (images, labels) in written.items():
            ds = load_segmentation_dataset(out, split)
            assert ds.column_names == ["image", "label"] and len(ds) == SPLITS[split]
            for row, image, label in zip(ds, images, labels):
                expected = np.full((SIZE, SIZE), 255, np.uint8)   # 0 = other -> ignored
                for raw in range(1, 151):                          # ADE's 1..150 -> class 0..149
                    expected[label == raw] = raw - 1
                assert row["label"].mode == "L"
                np.testing.assert_array_equal(np.asarray(row["label"]), expected)
                np.testing.assert_array_equal(np.asarray(row["image"]), image)   # PNG bytes kept as stored
    record = prepare(root, tmp_path / "one", max_examples=1)
    assert record["num_examples"] == {"validation": 1}


def test_prepare_from_a_copy_without_the_configuration_or_split_names_the_folder(tmp_path, capsys):
    inst = tmp_path / "inst"
    scene_parse_150_copy(inst, configs=("instance_segmentation", "other"))
    with pytest.raises(RawLayoutError, match=rf"folder {inst / 'scene_parsing'} does not exist: .*configurations "
                                             r"\['instance_segmentation', 'other'\].*ade150 is configuration "
                                             r"'scene_parsing' of scene_parse_150"):
        prepare(inst, tmp_path / "out")
    train_only = tmp_path / "train_only"
    scene_parse_150_copy(train_only, configs=("scene_parsing",), splits={"train": 1})
    with pytest.raises(RawLayoutError, match=rf"split folder {train_only / 'scene_parsing' / 'validation'} does not "
                                             r"exist: .* has the splits \['train'\]"):
        prepare(train_only, tmp_path / "out")
    capsys.readouterr()
    rc = cli_main(["prepare-dataset", "ade150", "--raw_dir", str(train_only), "--output_dir", str(tmp_path / "out")])
    stderr = capsys.readouterr().err
    assert rc == 1 and len(stderr.strip().splitlines()) == 1 and "split folder" in stderr
    assert not (tmp_path / "out").exists()
    # no release and no copy: the error names both layouts
    (tmp_path / "nothing").mkdir()
    with pytest.raises(RawLayoutError, match=r"ADEChallengeData2016.*or a local copy of its Hub dataset scene_parse_150: "
                                             r"scene_parsing/\{train,validation\}/\*.parquet"):
        prepare(tmp_path / "nothing", tmp_path / "out")


def test_a_hub_cache_snapshot_with_its_files_linked_to_blobs(tmp_path):
    """``hf download``'s cache: ``datasets--scene_parse_150/snapshots/<commit>/`` whose files link to blobs."""
    repo = tmp_path / "hub" / "datasets--scene_parse_150"
    images, labels = ade_rows("validation", 2)
    write_parquet(repo / "blobs" / "5e1f0c", images, labels)
    snapshot = repo / "snapshots" / "0123abcd"
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "data" / "validation-00000-of-00001.parquet").symlink_to(Path("../../../blobs/5e1f0c"))
    found = identify_source(str(snapshot), "validation")
    assert (found.benchmark, found.hub_copy, found.how) == ("ade150", True, "a Hub-cache snapshot of scene_parse_150")
    source = load_source(str(snapshot), "validation", SIZE)
    assert source["reduce_labels"] and source["label_column"] == "annotation"
    np.testing.assert_array_equal(np.asarray(source["ds"][1]["annotation"]), labels[1])
