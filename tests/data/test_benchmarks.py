"""The benchmark registry (class lists against the published ones), synonym scoring in the classifier
(FC-CLIP's max over names), prompt-template sets by name, and --benchmark on the jobs."""

import pytest
import torch
import torch.nn.functional as F

from opentrans_hf.data.benchmarks import BENCHMARK_NAMES, get_benchmark, list_benchmarks

# ----- the registry ---------------------------------------------------------------------------------
COUNTS = {"coco_panoptic133": 133, "coco_stuff171": 171, "ade150": 150, "ade847": 847, "pc59": 59, "pc459": 459,
          "voc20": 20, "voc21": 21, "cityscapes19": 19}

# (index, first name, a synonym the field's list has) at known positions of the published lists
SPOT_CHECKS = {
    "ade150": [(0, "wall", "brick wall"), (1, "building", "edifice"), (2, "sky", None), (12, "person", None),
               (20, "car", None), (149, "flag", None)],
    "ade847": [(0, "wall", "stone wall"), (1, "building", "edifice"), (846, "adding machine", "totalizer")],
    "coco_panoptic133": [(0, "person", "child"), (1, "bicycle", "bike"), (79, "toothbrush", None), (132, "rug", None)],
    "coco_stuff171": [(0, "person", "girl"), (79, "toothbrush", None), (170, "wood", None)],
    "pc59": [(0, "aeroplane", "airplane"), (1, "bag", None), (58, "wood piece", None)],
    "pc459": [(0, "accordion", None), (1, "aeroplane", "airplane"), (458, "wool", None)],
    "voc21": [(0, "background", "sky"), (1, "aeroplane", "airplane"), (15, "person", None), (20, "tvmonitor", "tv")],
    "voc20": [(0, "aeroplane", None), (14, "person", None), (19, "tvmonitor", "monitor")],
    "cityscapes19": [(0, "road", None), (10, "sky", None), (11, "person", None), (13, "car", None), (18, "bicycle", "bike")],
}


@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_every_benchmark_has_the_published_number_of_classes_and_names_at_known_indices(name):
    b = get_benchmark(name)
    assert b.num_classes == COUNTS[name] == len(b.class_names) == len(b.raw_ids) == len(b.class_prompts)
    assert len(set(b.class_names)) == b.num_classes, "display names are unique"
    assert len(set(b.raw_ids)) == b.num_classes
    for index, first, synonym in SPOT_CHECKS.get(name, []):
        assert b.synonyms[index][0] == first, (name, index, b.synonyms[index])
        if synonym:
            assert synonym in b.synonyms[index]


def test_label_conventions_and_sources():
    assert get_benchmark("ade150").raw_reduce_labels and get_benchmark("voc20").raw_reduce_labels
    assert not get_benchmark("voc21").raw_reduce_labels
    assert get_benchmark("ade847").label_bits == 16 and get_benchmark("ade847").prepared_ignore_index == 65535
    assert get_benchmark("pc459").label_bits == 16
    assert all(get_benchmark(n).label_bits == 8 for n in ("ade150", "pc59", "voc20", "voc21", "coco_stuff171", "cityscapes19"))
    hub = get_benchmark("ade150").hub
    assert (hub.repo_id, hub.revision, hub.label_column) == ("scene_parse_150", "refs/convert/parquet", "annotation")
    # raw ids: what the official releases store (ADE challenge 1..150, COCO category ids, Cityscapes labelIds)
    assert get_benchmark("ade150").raw_ids == tuple(range(1, 151))
    assert get_benchmark("cityscapes19").raw_ids[:3] == (7, 8, 11) and get_benchmark("cityscapes19").raw_ids[-1] == 33
    assert get_benchmark("coco_panoptic133").raw_ids[:3] == (1, 2, 3) and get_benchmark("coco_panoptic133").raw_ids[-1] == 200
    assert get_benchmark("cityscapes19").shortest_side == 1024
    # ADE20K-847's classes that share a first name get all their names as display name
    names = get_benchmark("ade847").class_names
    assert "pot, flowerpot" in names and "pot" in names
    assert get_benchmark("ADE-150") is get_benchmark("ade150")
    with pytest.raises(ValueError, match="unknown benchmark 'ade999'.*ade150"):
        get_benchmark("ade999")
    assert [b.name for b in list_benchmarks()][0] == "coco_panoptic133"


# ----- synonyms in the classifier -------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_and_tokenizer(tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    return CLIPModel.from_pretrained(tiny_clip_dir).eval(), AutoTokenizer.from_pretrained(tiny_clip_dir)


def _name_embedding(clip, tok, name, templates):
    """The reference: one name's embedding as FC-CLIP computes it (normalised features of every template,
    averaged, normalised), computed here prompt by prompt."""
    feats = []
    for t in templates:
        ids = tok([t.format(name)], return_tensors="pt")
        f = clip.get_text_features(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
        feats.append(F.normalize(getattr(f, "pooler_output", f).float(), dim=-1)[0])
    return F.normalize(torch.stack(feats).mean(0), dim=-1)


@torch.no_grad()
def test_a_class_scores_the_maximum_over_its_names(clip_and_tokenizer):
    from opentrans_hf.models import OpenVocabClassifier
    from opentrans_hf.models.configuration_ovs import FCCLIP_TEMPLATES

    clip, tok = clip_and_tokenizer
    clf = OpenVocabClassifier(FCCLIP_TEMPLATES, clip.config.projection_dim)
    classes = ["sky", ("road", "street", "lane"), ("car", "automobile")]
    text = clf.class_embeddings(clip, tok, classes)
    assert text.shape == (3, 3, clip.config.projection_dim)
    x = torch.randn(5, 7, clip.config.projection_dim)
    logits = clf(x, text)  # (5, 7, 3)
    ref = {n: _name_embedding(clip, tok, n, FCCLIP_TEMPLATES) for n in ("sky", "road", "street", "lane", "car", "automobile")}
    xn = F.normalize(x, dim=-1)
    scale = clf.logit_scale.exp()
    expected = torch.stack([
        scale * xn @ ref["sky"],
        scale * torch.stack([xn @ ref[n] for n in ("road", "street", "lane")]).amax(0),
        scale * torch.stack([xn @ ref[n] for n in ("car", "automobile")]).amax(0)], -1)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # one name per class: (K, D), as before
    assert clf.class_embeddings(clip, tok, ["sky", "road"]).shape == (2, clip.config.projection_dim)
    # "mean" and "first"
    mean = OpenVocabClassifier(FCCLIP_TEMPLATES, clip.config.projection_dim, name_aggregation="mean")
    emb = mean.class_embeddings(clip, tok, classes)
    torch.testing.assert_close(emb[2], F.normalize((ref["car"] + ref["automobile"]) / 2, dim=0), atol=1e-5, rtol=1e-5)
    first = OpenVocabClassifier(FCCLIP_TEMPLATES, clip.config.projection_dim, name_aggregation="first")
    torch.testing.assert_close(first.class_embeddings(clip, tok, classes)[1], ref["road"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="name_aggregation"):
        OpenVocabClassifier(FCCLIP_TEMPLATES, 8, name_aggregation="sum")


def test_class_name_checks_accept_synonyms_and_refuse_bad_entries():
    from opentrans_hf.models.classifier import check_class_names

    assert check_class_names(["a", ("b", "c"), ["d"], ("e", "e", "f")]) == ["a", ("b", "c"), "d", ("e", "f")]
    with pytest.raises(ValueError, match=r"class_names\[1\]"):
        check_class_names(["a", ()])
    with pytest.raises(ValueError, match=r"class_names\[1\]"):
        check_class_names(["a", ("b", "")])
    with pytest.raises(ValueError, match="duplicates: \\['a'\\]"):
        check_class_names(["a", "b", "a"])
    with pytest.raises(ValueError, match="duplicates: \\['a, b'\\]"):
        check_class_names([("a", "b"), ("a", "b", "a")])
    # classes may share a first name when their other names differ (ADE20K-847's "bag"s)
    assert check_class_names(["pot", ("pot", "flowerpot")]) == ["pot", ("pot", "flowerpot")]


@torch.no_grad()
def test_frameworks_predict_with_synonyms_and_switch_templates(tiny_clip_dir, tmp_path):
    from opentrans_hf.models import CLIPDeepLabV3ForOVS, CLIPFCCLIPForOVS
    from opentrans_hf.models.configuration_ovs import FCCLIP_TEMPLATES

    x = torch.randn(2, 3, 32, 32)
    for cls in (CLIPDeepLabV3ForOVS, CLIPFCCLIPForOVS):
        model = cls.from_clip(tiny_clip_dir, image_size=32, seen_class_names=["sky"]).eval()
        # a class given with one extra name that repeats its own name scores exactly as the plain name
        plain = model(pixel_values=x, class_names=["sky", "road"]).logits
        same = model(pixel_values=x, class_names=["sky", ("road", "road")]).logits
        torch.testing.assert_close(plain, same)
        syn = model(pixel_values=x, class_names=["sky", ("road", "street")]).logits
        assert syn.shape == plain.shape and not torch.allclose(syn, plain)
        assert model.predict(x, ["sky", ("road", "street")])[0].shape == (32, 32)
        model.set_prompt_templates("fcclip")
        assert model.classifier.templates == FCCLIP_TEMPLATES == model.config.prompt_templates
        assert not torch.allclose(model(pixel_values=x, class_names=["sky", "road"]).logits, plain)
        model.save_pretrained(tmp_path / cls.__name__)
        again = cls.from_pretrained(tmp_path / cls.__name__)
        assert again.classifier.templates == FCCLIP_TEMPLATES and again.config.class_name_aggregation == "max"
    with pytest.raises(ValueError, match="unknown prompt template set 'clipx'"):
        CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir, prompt_templates="clipx")


# ----- benchmarks as data: the Hub copy, prepared directories, --benchmark on the jobs ------------------
import json  # noqa: E402

import numpy as np  # noqa: E402
from datasets import Dataset, DatasetDict, Features  # noqa: E402
from datasets import Image as ImageFeature  # noqa: E402
from PIL import Image  # noqa: E402

SIZE = 30  # the tiny CLIP's image size


def _rgb(seed, h=SIZE, w=SIZE):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _ade_raw(n=3):
    """scene_parse_150's parquet form: image, annotation (0 = other, 1..150), scene_category."""
    labels = []
    for i in range(n):
        lab = np.zeros((SIZE, SIZE), np.uint8)
        lab[:, 10:20] = 1 + i      # wall, building, sky
        lab[:, 20:] = 150          # flag
        labels.append(Image.fromarray(lab))
    return Dataset.from_dict({"image": [_rgb(i) for i in range(n)], "annotation": labels, "scene_category": [0] * n},
                             features=Features({"image": ImageFeature(), "annotation": ImageFeature(),
                                                "scene_category": datasets_classlabel()}))


def datasets_classlabel():
    from datasets import ClassLabel

    return ClassLabel(names=["bathroom", "street"])


@pytest.fixture
def fake_hub(monkeypatch):
    """``datasets.load_dataset`` answering for scene_parse_150 only, recording how it was called."""
    import datasets

    calls = []

    def load_dataset(path, split=None, revision=None, **kwargs):
        calls.append(dict(path=path, split=split, revision=revision, **kwargs))
        if path != "scene_parse_150":
            raise FileNotFoundError(f"Dataset {path} not found")
        return _ade_raw()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_a_benchmark_name_loads_its_hub_copy_with_its_names_synonyms_and_conventions(fake_hub):
    from opentrans_hf.data.assembly import load_source, make_split

    source = load_source("ade150", "validation", SIZE)
    assert fake_hub == [dict(path="scene_parse_150", split="validation", revision="refs/convert/parquet",
                             data_dir="scene_parsing")]
    assert source["names"][:3] == ["wall", "building", "sky"] and len(source["names"]) == 150
    assert source["prompts"][1] == ("building", "buildings", "edifice", "edifices")
    assert source["label_column"] == "annotation" and source["benchmark"] == "ade150"
    split = make_split(source, SIZE)
    _, y = split[0]
    # reduce_labels: 0 (other) ignored, 1 -> 0 (wall), 150 -> 149 (flag)
    assert y[0, 0] == 255 and y[0, 10] == 0 and y[0, 25] == 149
    assert "benchmark ade150" in split.vocabulary and "reduce_labels" in split.vocabulary
    assert split.class_prompts[1] == ("building", "buildings", "edifice", "edifices")
    # a benchmark without a Hub copy says how to prepare it
    with pytest.raises(ValueError, match="prepare-dataset pc59 --raw_dir"):
        load_source("pc59", "validation", SIZE)


def test_the_hub_id_of_a_benchmarks_copy_is_that_benchmark(fake_hub):
    """``scene_parse_150`` given as a Hub id loads as ``ade150`` does: its parquet revision and configuration,
    its names and conventions (its loading script does not run with today's datasets)."""
    from opentrans_hf.data.assembly import load_source
    from opentrans_hf.data.specs import parse_dataset_spec

    source = load_source("scene_parse_150", "validation", SIZE)
    assert fake_hub == [{"path": "scene_parse_150", "split": "validation", "revision": "refs/convert/parquet",
                         "data_dir": "scene_parsing"}]
    assert source["benchmark"] == "ade150" and source["reduce_labels"] and source["label_column"] == "annotation"
    assert parse_dataset_spec("scene_parse_150:validation").benchmark == "ade150"


def _prepared(tmp_path, name, ignore, values, bits=8):
    """A directory as prepare-dataset writes it: DatasetDict + id2label.json + benchmark.json."""
    from opentrans_hf.data.benchmarks import get_benchmark

    b = get_benchmark(name)
    labels = []
    for i in range(2):
        lab = np.full((SIZE, SIZE), ignore, np.uint16 if bits == 16 else np.uint8)
        for j, v in enumerate(values):
            lab[:, 5 * j : 5 * j + 5] = v
        labels.append(Image.fromarray(lab))
    ds = Dataset.from_dict({"image": [_rgb(i) for i in range(2)], "label": labels},
                           features=Features({"image": ImageFeature(), "label": ImageFeature()}))
    out = tmp_path / name
    DatasetDict({"validation": ds, "train": ds}).save_to_disk(out)
    (out / "id2label.json").write_text(json.dumps({str(i): n for i, n in enumerate(b.class_names)}))
    (out / "benchmark.json").write_text(json.dumps({"benchmark": name, "title": b.title, "num_classes": len(b),
                                                    "ignore_index": ignore, "label_bits": bits,
                                                    "splits": ["validation", "train"], "format_version": 1}))
    return out


def test_a_prepared_directory_brings_its_benchmark_without_flags(tmp_path):
    from opentrans_hf.data.assembly import load_split

    out = _prepared(tmp_path, "pc459", 65535, [0, 300, 458], bits=16)
    split = load_split(str(out), "validation", SIZE)
    assert len(split.class_names) == 459 and split.class_prompts[1] == ("aeroplane", "aeroplanes", "airplanes", "airplane")
    _, y = split[0]
    assert set(y.unique().tolist()) == {0, 300, 458, 255}  # 65535 is the prepared ignore value
    assert "prepared" in split.vocabulary and "ignore 65535" in split.vocabulary
    with pytest.raises(ValueError, match="prepared as benchmark 'pc459'"):
        from opentrans_hf.data.assembly import load_source

        load_source(str(out), "validation", SIZE, benchmark="voc21")


def test_evaluate_and_train_with_benchmark(tiny_clip_dir, tmp_path, fake_hub, capsys):
    from opentrans_hf.cli import main as cli_main
    from opentrans_hf.models import CLIPDeepLabV3ForOVS

    model_dir = tmp_path / "model"
    # trained on "edifice": ADE20K's "building" (building, buildings, edifice, edifices) counts as seen
    CLIPDeepLabV3ForOVS.from_clip(str(tiny_clip_dir), image_size=SIZE, seen_class_names=["edifice"]).save_pretrained(model_dir)
    voc = _prepared(tmp_path, "voc21", 255, [0, 15, 20])
    out = tmp_path / "eval.json"
    rc = cli_main(["evaluate", "--model", str(model_dir), "--benchmark", "ADE20K-150", "--datasets", str(voc),
                   "--out", str(out), "--batch_size", "2", "--shortest_side", "40", "--max_size", "60"])
    assert rc == 0, capsys.readouterr().err
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"ade150:validation", f"{voc}:validation"}
    assert len(results["ade150:validation"]["per_category_iou"]) == 150
    assert len(results[f"{voc}:validation"]["per_category_iou"]) == 21
    assert "benchmark ade150" in results["ade150:validation"]["vocabulary"]
    ade = results["ade150:validation"]
    assert ade["mean_iou_seen"] == pytest.approx(ade["per_category_iou"][1])

    # train on a prepared benchmark: every class seen, synonyms recorded as seen names
    from opentrans_hf.commands import parse_args
    from opentrans_hf.commands.train import run

    metrics = run(parse_args("train", ["--model_name_or_path", str(tiny_clip_dir), "--benchmark", "voc21",
                                       "--dataset", str(voc), "--output_dir", str(tmp_path / "run"), "--batch_size", "2",
                                       "--max_steps", "1", "--max_eval_examples", "2"]))
    assert len(metrics["train_classes"]) == 21 and metrics["holdout_classes"] == []
    seen = CLIPDeepLabV3ForOVS.from_pretrained(tmp_path / "run" / "model").config.seen_class_names
    assert seen[:21] == metrics["train_classes"] and "tv" in seen and "airplane" in seen

    # bad input: unknown benchmark, names given beside a benchmark, a benchmark without a Hub copy
    assert cli_main(["evaluate", "--model", str(model_dir), "--benchmark", "ade999"]) == 2
    assert "unknown benchmark 'ade999'" in capsys.readouterr().err
    assert cli_main(["train", "--benchmark", "voc21", "--class_names", "a", "b"]) == 2
    assert "brings its class names" in capsys.readouterr().err
    assert cli_main(["evaluate", "--model", str(model_dir), "--datasets", "pc59"]) == 1
    assert "prepare-dataset pc59" in capsys.readouterr().err


def test_benchmark_flag_on_demo_and_train_selects_the_data(tmp_path):
    from opentrans_hf.commands import ArgumentError, parse_args

    demo = parse_args("demo", ["--benchmark", "Pascal VOC-21", "--output_dir", str(tmp_path / "d")])
    assert (demo.benchmark, demo.dataset) == ("voc21", "voc21")  # the Hub copy / benchmark name, prune included
    train = parse_args("train", ["--benchmark", "ade150", "--dataset", str(tmp_path)])
    assert (train.benchmark, train.dataset) == ("ade150", str(tmp_path))  # the data given, the benchmark's names
    with pytest.raises(ArgumentError, match="unknown benchmark"):
        parse_args("demo", ["--benchmark", "nope"])


def test_benchmarks_command_lists_every_benchmark(capsys):
    from opentrans_hf.cli import main as cli_main

    assert cli_main(["benchmarks"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == list(BENCHMARK_NAMES)
    assert cli_main(["benchmarks", "--names", "voc20", "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    assert record["num_classes"] == 20 and record["raw"] == {"reduce_labels": True, "ignore_index": 255}
    assert record["synonyms"][19] == ["tvmonitor", "monitor", "tv"]
