"""Class names and datasets, never a silent guess: names only from an explicit source or from metadata that
describes the label map, one spec per evaluation dataset, no fallback to the training images for a
missing split, mIoU in percent wherever people read it, and data errors that name dataset, split,
example / file and value.

The datasets are shaped like the Hub's: ADE20K (``image``, ``annotation`` with 0 = "other",
``scene_category`` ClassLabel), a segments.ai-style repo with an ``id2label.json``, image/label folders.
"""

import json
import re

import datasets
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, List
from datasets import Image as ImageFeature
from PIL import Image

from opentrans_hf.cli import main as cli_main
from opentrans_hf.commands import parse_args
from opentrans_hf.data.assembly import load_source, load_split
from opentrans_hf.data.sources import load_segmentation_dataset

SIZE = 30  # the tiny CLIP's image size
SCENES = ["bathroom", "bedroom", "kitchen", "street", "airport_terminal"]


def rgb(seed: int, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def stripes(seed: int, values: int, size: int = SIZE) -> np.ndarray:
    """A (size, size) uint8 label map with vertical stripes of the values 0..values-1 (rolled by seed)."""
    cols = (np.arange(size) * values // size + seed) % values
    return np.repeat(cols[None, :], size, axis=0).astype(np.uint8)


def ade_like(n: int = 4) -> DatasetDict:
    """scene_parse_150's shape: annotation values 0..2 (0 = "other", reduce_labels -> 2 classes) and a
    scene_category ClassLabel with more names than the label map has values."""
    feats = Features({"image": ImageFeature(), "annotation": ImageFeature(), "scene_category": ClassLabel(names=SCENES)})

    def part(offset):
        return Dataset.from_dict({"image": [rgb(offset + i) for i in range(n)],
                                  "annotation": [Image.fromarray(stripes(offset + i, 3)) for i in range(n)],
                                  "scene_category": [i % len(SCENES) for i in range(n)]}, features=feats)

    return DatasetDict({"train": part(0), "validation": part(100)})


def plain(n: int = 4, values: int = 3, offset: int = 0, void: int | None = None) -> Dataset:
    """``image`` + ``label`` (Image) with label values 0..values-1 (and ``void`` in a corner if given)."""
    labels = []
    for i in range(n):
        lab = stripes(offset + i, values)
        if void is not None:
            lab[:4, :4] = void
        labels.append(Image.fromarray(lab))
    return Dataset.from_dict({"image": [rgb(offset + i) for i in range(n)], "label": labels},
                             features=Features({"image": ImageFeature(), "label": ImageFeature()}))


def write_folder(root, n=4, values=3):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        rgb(i).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(stripes(i, values)).save(root / "labels" / f"{i:03d}.png")
    return root


def train_args(tiny_clip_dir, out, *extra):
    return ["train", "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(out), "--batch_size", "2",
            "--max_steps", "1", "--max_eval_examples", "2", "--embedded_size", "8", *extra]


def run_train(tiny_clip_dir, out, *extra):
    from opentrans_hf.commands.train import run

    return run(parse_args("train", train_args(tiny_clip_dir, out, *extra)[1:]))


@pytest.fixture(scope="module")
def ovs_model(tiny_clip_dir, tmp_path_factory):
    """An (untrained) OVS model saved like a training run's model directory."""
    from opentrans_hf.embedded.dataset import CLASS_NAMES, HELD_OUT_CLASSES
    from opentrans_hf.models import CLIPDeepLabV3ForOVS

    path = tmp_path_factory.mktemp("ovs") / "model"
    seen = [c for c in CLASS_NAMES if c not in HELD_OUT_CLASSES]
    CLIPDeepLabV3ForOVS.from_clip(str(tiny_clip_dir), image_size=SIZE, seen_class_names=seen).save_pretrained(path)
    return path


# --- class names --------------------------------------------------------------------------------------


def test_ade20k_shaped_dataset_without_names_is_an_error_not_its_scene_names(tiny_clip_dir, tmp_path, capsys):
    ade_like().save_to_disk(tmp_path / "ade")
    rc = cli_main(train_args(tiny_clip_dir, tmp_path / "run", "--dataset", str(tmp_path / "ade"), "--reduce_labels"))
    err = capsys.readouterr().err
    assert rc == 1, err
    # says why the ClassLabel it saw is not used, and where names can come from
    assert "'scene_category'" in err and "'annotation'" in err
    assert "--id2label" in err and "--class_names" in err and "id2label.json" in err
    assert not (tmp_path / "run" / "model").exists()


def test_id2label_json_in_the_dataset_directory_names_its_label_map(tiny_clip_dir, tmp_path):
    ade_like().save_to_disk(tmp_path / "ade")
    (tmp_path / "ade" / "id2label.json").write_text(json.dumps({"0": "wall", "1": "floor"}))
    metrics = run_train(tiny_clip_dir, tmp_path / "run", "--dataset", str(tmp_path / "ade"), "--reduce_labels")
    assert metrics["train_classes"] == ["wall", "floor"]
    row = metrics["eval"][f"{tmp_path / 'ade'}:validation"]
    assert len(row["per_category_iou"]) == 2
    assert "id2label.json" in row["vocabulary"] and "reduce_labels" in row["vocabulary"]


def test_classlabel_of_the_label_column_itself_not_of_another_column(tmp_path):
    feats = Features({"image": ImageFeature(), "label": List(List(ClassLabel(names=["sky", "road", "car"]))),
                      "scene": ClassLabel(names=SCENES)})
    ds = Dataset.from_dict({"image": [rgb(0), rgb(1)], "label": [stripes(0, 3).tolist(), stripes(1, 3).tolist()],
                            "scene": [0, 3]}, features=feats)
    DatasetDict({"validation": ds}).save_to_disk(tmp_path / "grid")
    source = load_source(str(tmp_path / "grid"), "validation", SIZE)
    assert source["names"] == ["sky", "road", "car"]
    assert "ClassLabel" in source["vocabulary"] and "'label'" in source["vocabulary"]
    _, y = load_split(str(tmp_path / "grid"), "validation", SIZE)[1]
    assert y.shape == (SIZE, SIZE) and set(y.unique().tolist()) == {0, 1, 2}


def test_hub_dataset_takes_the_id2label_json_of_its_repo(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    ds = ade_like(2)["validation"]
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split=None, revision=None, **kw: ds)
    f = tmp_path / "id2label.json"
    f.write_text(json.dumps({"0": "wall", "1": "floor"}))
    calls = []

    def download(repo_id, filename, repo_type=None, revision=None, **kw):
        calls.append((repo_id, filename, repo_type))
        return str(f)

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    source = load_source("someone/ade-mini", "validation", SIZE)
    assert source["names"] == ["wall", "floor"] and calls == [("someone/ade-mini", "id2label.json", "dataset")]

    def missing(*a, **kw):
        raise LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", missing)
    with pytest.raises(ValueError, match=r"(?s)someone/ade-mini.*'scene_category'.*id2label\.json"):
        load_source("someone/ade-mini", "validation", SIZE)


def test_explicit_names_that_contradict_the_datasets_own_are_an_error(tiny_clip_dir, tmp_path, capsys):
    # the embedded dataset has 16 classes of its own; 3 names for it used to be ignored without a word
    rc = cli_main(train_args(tiny_clip_dir, tmp_path / "run", "--class_names", "a", "b", "c"))
    err = capsys.readouterr().err
    assert rc == 1 and "16" in err and "3" in err and "embedded" in err
    with pytest.raises(ValueError, match="either"):
        load_source(str(tmp_path), "train", SIZE, class_names=["a"], id2label={"0": "a"})


# --- one spec per evaluation dataset ------------------------------------------------------------------


def write_specs(tmp_path):
    """Three datasets with three conventions, each described by its own spec file."""
    DatasetDict({"validation": plain(3)}).save_to_disk(tmp_path / "three")
    ade_like(3).save_to_disk(tmp_path / "ade")
    (tmp_path / "ade_names.json").write_text(json.dumps({"0": "wall", "1": "floor"}))
    DatasetDict({"test": plain(3, void=7)}).save_to_disk(tmp_path / "void7")
    specs = {
        "three": {"dataset": "three", "split": "validation", "class_names": ["sky", "grass", "lava"]},
        "ade": {"dataset": "ade", "id2label": "ade_names.json", "reduce_labels": True, "label_column": "annotation"},
        "void7": {"dataset": str(tmp_path / "void7"), "split": "test", "name": "void-seven",
                  "id2label": {"0": "sand", "1": "road", "2": "snow"}, "ignore_index": 7},
    }
    paths = {}
    for key, spec in specs.items():
        paths[key] = tmp_path / f"{key}.json"
        paths[key].write_text(json.dumps(spec))
    return paths


def test_evaluate_gives_each_dataset_its_own_spec(ovs_model, tmp_path, capsys):
    from opentrans_hf.commands import evaluate

    specs = write_specs(tmp_path)
    results = evaluate.run(parse_args("evaluate", [
        "--model", str(ovs_model), "--datasets", "embedded:validation", str(specs["three"]), str(specs["ade"]),
        str(specs["void7"]), "--max_examples", "3", "--out", str(tmp_path / "eval.json")]))
    three, ade = f"{tmp_path / 'three'}:validation", f"{tmp_path / 'ade'}:validation"
    assert list(results) == ["embedded:validation", three, ade, "void-seven"]
    assert [len(results[k]["per_category_iou"]) for k in results] == [16, 3, 2, 3]
    assert "class_names" in results[three]["vocabulary"]
    assert "ade_names.json" in results[ade]["vocabulary"] and "reduce_labels" in results[ade]["vocabulary"]
    assert "ignore 7" in results["void-seven"]["vocabulary"]
    assert "embedded" in results["embedded:validation"]["vocabulary"]
    table = (tmp_path / "eval.md").read_text()
    header, _, *rows = [line for line in table.splitlines() if line.startswith("|")]
    assert "vocabulary" in header and "mIoU (%)" in header
    assert rows[2].startswith(f"| {ade} | ") and "ade_names.json" in rows[2] and "| 2 |" in rows[2]
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["results"][ade]["vocabulary"] == results[ade]["vocabulary"]


def test_spec_conventions_apply_to_their_dataset_only(tmp_path):
    from opentrans_hf.data.assembly import load_spec_split
    from opentrans_hf.data.specs import parse_dataset_spec

    specs = write_specs(tmp_path)
    three = load_spec_split(parse_dataset_spec(str(specs["three"])), SIZE)
    ade = load_spec_split(parse_dataset_spec(str(specs["ade"])), SIZE)
    void7 = load_spec_split(parse_dataset_spec(str(specs["void7"])), SIZE)
    raw_three = np.asarray(plain(3)[0]["label"])
    raw_ade = np.asarray(ade_like(3)["validation"][0]["annotation"])
    assert np.array_equal(three[0][1].numpy(), raw_three)  # no reduction here ...
    assert np.array_equal(ade[0][1].numpy(), np.where(raw_ade == 0, 255, raw_ade.astype(int) - 1))  # ... only here
    assert (void7[0][1][:4, :4] == 255).all() and void7[0][1].max() == 255 and len(void7) == 3
    assert ade.class_names == ["wall", "floor"] and void7.class_names == ["sand", "road", "snow"]
    # NAME[:SPLIT] still works for datasets with names of their own
    spec = parse_dataset_spec(f"{tmp_path / 'ade'}:train")
    assert (spec.dataset, spec.split) == (str(tmp_path / "ade"), "train")
    # a spec file is checked: unknown keys and wrong types are errors that name the file and the key
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dataset": "x", "reduce_label": True}))
    with pytest.raises(ValueError, match=r"bad\.json.*'reduce_label'.*reduce_labels"):
        parse_dataset_spec(str(bad))
    bad.write_text(json.dumps({"dataset": "x", "ignore_index": "255"}))
    with pytest.raises(ValueError, match=r"bad\.json.*ignore_index.*int"):
        parse_dataset_spec(str(bad))
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        parse_dataset_spec(str(tmp_path / "nothere.json"))


def test_named_vocabulary_hook(tmp_path, monkeypatch):
    from opentrans_hf.data import vocabulary
    from opentrans_hf.data.assembly import load_spec_split
    from opentrans_hf.data.specs import parse_dataset_spec

    DatasetDict({"validation": plain(2)}).save_to_disk(tmp_path / "three")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"dataset": "three", "vocabulary": "tiny3"}))
    with pytest.raises(ValueError, match="unknown vocabulary 'tiny3'.*known vocabularies: coco_panoptic133"):
        load_spec_split(parse_dataset_spec(str(spec)), SIZE)
    monkeypatch.setitem(vocabulary.VOCABULARIES, "tiny3", ("sky", "grass", "lava"))
    split = load_spec_split(parse_dataset_spec(str(spec)), SIZE)
    assert split.class_names == ["sky", "grass", "lava"] and "vocabulary 'tiny3'" in split.vocabulary


def test_hub_dataset_without_the_split_says_so(monkeypatch):
    def load_dataset(name, split=None, revision=None, **kw):
        raise ValueError(f'Unknown split "{split}". Should be one of [\'train\'].')

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(ValueError, match=r"(?s)'someone/sidewalk'.*no split 'validation'.*validation_split_percentage"):
        load_segmentation_dataset("someone/sidewalk", "validation")


def test_one_global_vocabulary_for_several_datasets_is_an_argument_error(ovs_model, tmp_path, capsys):
    specs = write_specs(tmp_path)
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"0": "sky", "1": "grass", "2": "lava"}))
    base = ["evaluate", "--model", str(ovs_model), "--max_examples", "2"]
    for extra in (["--datasets", "embedded:validation", f"{tmp_path / 'three'}", "--id2label", str(names)],
                  ["--datasets", "embedded:validation", str(specs["ade"]), "--reduce_labels"],
                  ["--datasets", str(specs["three"]), "--class_names", "a", "b", "c"]):
        rc = cli_main(base + extra)
        err = capsys.readouterr().err
        assert rc == 2, (extra, err)
        assert "spec" in err and ".json" in err, err
    # the same row twice would overwrite itself
    rc = cli_main(base + ["--datasets", "embedded:validation", "embedded:validation"])
    assert rc == 2 and "twice" in capsys.readouterr().err
    # one NAME[:SPLIT] dataset and the global flags: they are its spec
    rc = cli_main(base + ["--datasets", f"{tmp_path / 'three'}:validation", "--id2label", str(names)])
    assert rc == 0, capsys.readouterr().err


def test_train_eval_datasets_take_spec_files(tiny_clip_dir, tmp_path):
    specs = write_specs(tmp_path)
    metrics = run_train(tiny_clip_dir, tmp_path / "run", "--eval_datasets", str(specs["ade"]), str(specs["void7"]))
    ade = f"{tmp_path / 'ade'}:validation"
    assert list(metrics["eval"]) == ["embedded:validation", ade, "void-seven"]
    assert len(metrics["eval"][ade]["per_category_iou"]) == 2 and "reduce_labels" in metrics["eval"][ade]["vocabulary"]
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "ade_names.json" in card and "void-seven" in card


# --- splits -------------------------------------------------------------------------------------------


def test_a_missing_split_is_an_error_never_another_split(tmp_path):
    flat = write_folder(tmp_path / "flat")
    assert len(load_segmentation_dataset(flat, "train")) == 4  # a folder without splits is 'train', as imagefolder
    with pytest.raises(ValueError, match=r"(?s)flat.*'validation'.*validation_split_percentage"):
        load_segmentation_dataset(flat, "validation")
    write_folder(tmp_path / "split" / "train")
    with pytest.raises(ValueError, match=r"(?s)split 'validation'.*\['train'\]"):
        load_segmentation_dataset(tmp_path / "split", "validation")
    plain(2).save_to_disk(tmp_path / "unsplit")  # a Dataset saved without a split name
    assert len(load_segmentation_dataset(tmp_path / "unsplit", "train")) == 2
    with pytest.raises(ValueError, match=r"(?s)unsplit.*'validation'"):
        load_segmentation_dataset(tmp_path / "unsplit", "validation")
    Dataset.from_dict(plain(2).to_dict(), features=plain(2).features, split="test").save_to_disk(tmp_path / "test")
    assert len(load_segmentation_dataset(tmp_path / "test", "test")) == 2
    with pytest.raises(ValueError, match=r"(?s)'test'.*'train'"):
        load_segmentation_dataset(tmp_path / "test", "train")


def test_training_without_an_evaluation_split_fails_instead_of_scoring_the_training_images(tiny_clip_dir, tmp_path,
                                                                                          capsys):
    flat = write_folder(tmp_path / "flat")
    rc = cli_main(train_args(tiny_clip_dir, tmp_path / "run", "--dataset", str(flat), "--class_names", "a", "b", "c"))
    err = capsys.readouterr().err
    assert rc == 1 and "'validation'" in err and "--validation_split_percentage" in err
    assert not (tmp_path / "run" / "model").exists()


def test_validation_split_percentage_holds_out_a_fixed_disjoint_part(tiny_clip_dir, tmp_path):
    from opentrans_hf.data.assembly import load_training_data

    flat = write_folder(tmp_path / "flat", n=8)

    def files(split):
        return sorted(x["path"] for x in split.ds.cast_column("image", ImageFeature(decode=False))["image"])

    def assemble(*extra):
        args = parse_args("train", ["--dataset", str(flat), "--class_names", "a", "b", "c",
                                    "--validation_split_percentage", "25", *extra])
        train, evals, _ = load_training_data(args, SIZE)
        (name, held_out), = evals.items()
        return name, files(train), files(held_out)

    name, train, held_out = assemble()
    assert name == f"{flat}:train[25% held out]"
    assert len(held_out) == 2 and len(train) == 6 and not set(train) & set(held_out)
    assert assemble() == (name, train, held_out)  # deterministic (seeded by --seed)
    assert assemble("--seed", "1")[2] != held_out or assemble("--seed", "2")[2] != held_out
    with pytest.raises(ValueError, match="--eval_split"):
        parse_args("train", ["--dataset", str(flat), "--validation_split_percentage", "25", "--eval_split", "test"])
    with pytest.raises(ValueError, match="validation_split_percentage"):
        parse_args("train", ["--dataset", str(flat), "--validation_split_percentage", "100"])
    with pytest.raises(ValueError, match=r"1 example.*25%"):
        write_folder(tmp_path / "one", n=1)
        load_training_data(parse_args("train", ["--dataset", str(tmp_path / "one"), "--class_names", "a", "b", "c",
                                                "--validation_split_percentage", "25"]), SIZE)


@pytest.mark.slow
def test_demo_with_a_held_out_percentage_and_an_eval_spec(tiny_clip_dir, tmp_path):
    specs = write_specs(tmp_path)
    rc = cli_main(["demo", "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(tmp_path / "demo"),
                   "--target_sparsity", "0.2", "--prune_rate", "0.2", "--prune_steps_per_round", "1",
                   "--max_steps", "1", "--embedded_size", "8", "--max_eval_examples", "2", "--batch_size", "2",
                   "--validation_split_percentage", "25", "--eval_datasets", str(specs["ade"])])
    assert rc == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert list(summary["eval"]) == ["embedded:train[25% held out]", f"{tmp_path / 'ade'}:validation"]


# --- one unit for mIoU --------------------------------------------------------------------------------


def test_miou_is_percent_with_two_decimals_in_logs_table_and_card(tiny_clip_dir, tmp_path, capsys, info_logs):
    import yaml

    from opentrans_hf.training.evaluation import results_table

    metrics = run_train(tiny_clip_dir, tmp_path / "run")
    res = metrics["eval"]["embedded:validation"]
    assert 0.0 <= res["mean_iou"] <= 1.0  # JSON keeps the Hub metric's fractions
    pct = f"{100 * res['mean_iou']:.2f}"
    log = capsys.readouterr().err  # the library's log (INFO)
    assert re.search(rf"\[embedded:validation\] mIoU {re.escape(pct)}%", log), log
    assert f"| {pct} |" in results_table(metrics["eval"])
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert f"| {pct} |" in card and f"{res['mean_iou']:.4f}" not in card
    meta = yaml.safe_load(card.split("---")[1])
    (entry,) = meta["model-index"][0]["results"]
    miou = next(m for m in entry["metrics"] if m["type"] == "mean_iou")
    assert miou["value"] == round(100 * res["mean_iou"], 2) and "%" in miou["name"]


# --- data errors --------------------------------------------------------------------------------------


def test_empty_dataset_or_split_is_an_error(tmp_path):
    full = plain(2)
    DatasetDict({"train": full, "validation": full.select([])}).save_to_disk(tmp_path / "dd")
    with pytest.raises(ValueError, match=r"(?s)dd.*'validation'.*no examples"):
        load_split(str(tmp_path / "dd"), "validation", SIZE, class_names=["a", "b", "c"])
    full.select([]).save_to_disk(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"(?s)empty.*no examples"):
        load_split(str(tmp_path / "empty"), "train", SIZE, class_names=["a", "b", "c"])


def test_truncated_image_or_label_names_the_file(tmp_path):
    root = write_folder(tmp_path / "data" / "validation")
    for sub, i in (("images", 1), ("labels", 2)):
        f = root / sub / f"{i:03d}.png"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    split = load_split(str(tmp_path / "data"), "validation", SIZE, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"(?s)'validation'.*example 1.*images/001\.png.*truncated"):
        split[1]
    with pytest.raises(ValueError, match=r"(?s)example 2.*labels/002\.png"):
        split[2]


def test_rgb_label_map_with_differing_channels_is_an_error(tmp_path):
    from opentrans_hf.data.transforms import to_label_tensor

    same = np.repeat(stripes(0, 3)[..., None], 3, axis=-1)
    assert to_label_tensor(Image.fromarray(same)).max() == 2  # grey RGB: fine
    coloured = same.copy()
    coloured[5, 7] = (2, 0, 1)
    with pytest.raises(ValueError, match=r"(?s)channels.*\(5, 7\).*\(2, 0, 1\)"):
        to_label_tensor(Image.fromarray(coloured))
    root = write_folder(tmp_path / "data" / "train")
    Image.fromarray(coloured).save(root / "labels" / "003.png")
    split = load_split(str(tmp_path / "data"), "train", SIZE, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"(?s)'train'.*example 3.*labels/003\.png.*channels"):
        split[3]


def test_a_label_map_of_the_wrong_size_names_dataset_and_file(tmp_path):
    root = write_folder(tmp_path / "data" / "train")
    Image.fromarray(stripes(0, 3, size=12)).save(root / "labels" / "002.png")
    split = load_split(str(tmp_path / "data"), "train", SIZE, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"(?s)'train'.*example 2.*labels/002\.png.*\(30, 30\).*\(12, 12\)"):
        split[2]


def test_all_labels_ignored_is_an_error_before_training(tiny_clip_dir, tmp_path, capsys, ovs_model):
    void = plain(3, values=1, void=None)  # every pixel 0: with reduce_labels, every pixel is ignored
    DatasetDict({"train": void, "validation": void}).save_to_disk(tmp_path / "void")
    rc = cli_main(train_args(tiny_clip_dir, tmp_path / "run", "--dataset", str(tmp_path / "void"), "--reduce_labels",
                             "--class_names", "wall"))
    err = capsys.readouterr().err
    assert rc == 1 and "'train'" in err and "ignore" in err and "3 examples" in err, err
    assert not (tmp_path / "run" / "model").exists()
    # evaluation: the same dataset evaluated with reduce_labels has nothing to score
    spec = tmp_path / "void.json"
    spec.write_text(json.dumps({"dataset": str(tmp_path / "void"), "class_names": ["wall"], "reduce_labels": True}))
    rc = cli_main(["evaluate", "--model", str(ovs_model), "--datasets", str(spec)])
    err = capsys.readouterr().err
    assert rc == 1 and "'validation'" in err and "ignore" in err, err


@pytest.mark.slow
def test_pruning_leaves_the_held_out_percentage_out_too(tiny_clip_dir, tmp_path):
    """With --validation_split_percentage, the demo's pruning distils only on the part training uses: no
    evaluation image is seen before evaluation."""
    from opentrans_hf.data.assembly import distillation_split, hold_out, load_source

    source = load_source("embedded", "train", 30, embedded_size=12, seed=3)
    train_part, held = hold_out(source, 25, seed=3)
    distil = distillation_split("embedded", "train", 30, embedded_size=12, seed=3, validation_split_percentage=25)
    key = lambda ds: sorted(np.asarray(im).tobytes() for im in ds["image"])  # noqa: E731
    assert key(distil.ds) == key(train_part["ds"]) and len(distil) == 9
    assert not set(key(distil.ds)) & set(key(held["ds"]))
    # the demo passes it on; a finished demo's directory is its own: a re-run with other pruning settings there
    # is refused at the arguments (exit 2) unless --overwrite_output_dir removes the earlier run first
    common = ["demo", "--model_name_or_path", str(tiny_clip_dir), "--output_dir", str(tmp_path / "demo"),
              "--prune_steps_per_round", "1", "--max_steps", "1", "--embedded_size", "8", "--max_eval_examples", "2",
              "--batch_size", "2", "--validation_split_percentage", "25"]
    assert cli_main([*common, "--target_sparsity", "0.2", "--prune_rate", "0.2"]) == 0
    state = json.loads((tmp_path / "demo" / "prune" / "state.json").read_text())
    assert "validation_split_percentage" in json.dumps(state)
    assert cli_main([*common, "--target_sparsity", "0.3", "--prune_rate", "0.3"]) == 2
    assert cli_main([*common, "--target_sparsity", "0.3", "--prune_rate", "0.3", "--overwrite_output_dir"]) == 0
    state = json.loads((tmp_path / "demo" / "prune" / "state.json").read_text())
    assert "validation_split_percentage" in json.dumps(state) and "0.3" in json.dumps(state)
