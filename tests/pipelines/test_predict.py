"""`opentrans-hf predict` and opentrans_hf.pipelines.inference: label maps, overlays with a legend, areas.json,
vocabularies (--classes with synonyms, --benchmark), colliding stems, unreadable images."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from opentrans_hf.cli import main
from opentrans_hf.commands.predict import preprocess_argv
from opentrans_hf.pipelines.inference import (
    check_images,
    class_areas,
    label_image,
    label_palette,
    legend_entries,
    load_image,
    output_stems,
    overlay_with_legend,
    parse_classes,
    predict_images,
)

NAMES = ["sky", "road", "car"]


@pytest.fixture(scope="module")
def model_dir(tiny_clip_dir, tmp_path_factory):
    from opentrans_hf.models import CLIPDeepLabV3ForOVS

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("predict") / "model"
    CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir, aspp_channels=16).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    from opentrans_hf.models import CLIPDeepLabV3ForOVS

    return CLIPDeepLabV3ForOVS.from_pretrained(model_dir).eval()


@pytest.fixture
def images(tmp_path):
    """RGB JPEG, grayscale PNG, opaque RGBA PNG, and two x.jpg in different folders (colliding stems)."""
    rng = np.random.default_rng(0)
    paths = {}

    def save(rel, arr, mode=None):
        p = tmp_path / "in" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr, mode).save(p)
        paths[rel] = p

    save("rgb.jpg", rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    save("gray.png", rng.integers(0, 256, (33, 47), dtype=np.uint8))
    rgba = rng.integers(0, 256, (30, 30, 4), dtype=np.uint8)
    rgba[..., 3] = 255  # opaque: the job's RGB is the file's RGB
    save("rgba.png", rgba)
    save("a/x.jpg", rng.integers(0, 256, (24, 64, 3), dtype=np.uint8))
    save("b/x.jpg", rng.integers(0, 256, (64, 24, 3), dtype=np.uint8))
    return paths


def _non_grey_colours(strip: np.ndarray) -> set:
    px = strip.reshape(-1, 3)
    px = px[~((px[:, 0] == px[:, 1]) & (px[:, 1] == px[:, 2]))]
    return {tuple(int(v) for v in c) for c in np.unique(px, axis=0)}


def test_predict_writes_label_maps_overlays_and_areas(model_dir, model, images, tmp_path, capsys):
    out = tmp_path / "out"
    paths = [str(p) for p in images.values()]
    assert main(["predict", "--model", str(model_dir), "--classes", " sky, road ,car", "--output_dir", str(out),
                 "--batch_size", "2", *paths]) == 0
    assert "5 images segmented into 3 classes" in capsys.readouterr().out
    record = json.loads((out / "areas.json").read_text())
    assert record["model"] == str(model_dir) and record["classes"] == NAMES
    assert list(record["images"]) == paths
    palette = label_palette(3)
    written = set()
    for path in paths:
        entry = record["images"][path]
        with Image.open(path) as im:
            rgb = im.convert("RGB")
        w, h = rgb.size
        assert entry["size"] == [h, w]
        with Image.open(out / entry["labels"]) as lab:
            assert lab.mode == "L" and lab.size == (w, h)
            labels = np.asarray(lab).astype(np.int64)
        expected = model.predict([rgb], NAMES, allow_void=False)[0].numpy()
        np.testing.assert_array_equal(labels, expected)
        # areas: every pixel counted once, matching the label map, largest first, absent classes left out
        counts = np.bincount(labels.ravel(), minlength=3)
        areas = entry["areas"]
        assert sum(a["pixels"] for a in areas.values()) == h * w
        assert {n: a["pixels"] for n, a in areas.items()} == {NAMES[i]: int(c) for i, c in enumerate(counts) if c}
        assert [a["pixels"] for a in areas.values()] == sorted((a["pixels"] for a in areas.values()), reverse=True)
        assert all(a["fraction"] == pytest.approx(a["pixels"] / (h * w)) for a in areas.values())
        # overlay: RGB, the image on top, a legend strip below with exactly the present classes' swatches
        with Image.open(out / entry["overlay"]) as ov:
            assert ov.mode == "RGB" and ov.size[0] >= w and ov.size[1] > h
            strip = np.asarray(ov)[h:]
        present = {tuple(int(v) for v in palette[NAMES.index(n)]) for n in areas}
        assert _non_grey_colours(strip) == present
        written |= {entry["labels"], entry["overlay"]}
    # a/x.jpg and b/x.jpg do not overwrite each other
    assert len(written) == 2 * len(paths)
    assert record["images"][str(images["a/x.jpg"])]["labels"] != record["images"][str(images["b/x.jpg"])]["labels"]
    assert sorted(p.name for p in out.iterdir()) == sorted(written | {"areas.json"})


def test_synonyms_and_benchmark_vocabulary(model_dir, model, images, tmp_path):
    # synonyms: one class scored from several names ('|'), shown under its first name
    rgb_path = images["rgb.jpg"]
    out = tmp_path / "syn"
    assert main(["predict", "--model", str(model_dir), "--classes", "sky|blue sky,road|street|road,car",
                 "--output_dir", str(out), str(rgb_path)]) == 0
    record = json.loads((out / "areas.json").read_text())
    assert record["classes"] == NAMES
    assert record["prompts"] == {"sky": ["sky", "blue sky"], "road": ["road", "street"]}
    rgb = Image.open(rgb_path).convert("RGB")
    expected = model.predict([rgb], [("sky", "blue sky"), ("road", "street"), "car"], allow_void=False)[0].numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(out / "rgb.labels.png")), expected)

    # --benchmark: the benchmark's classes (with its synonyms)
    from opentrans_hf.data.benchmarks import get_benchmark

    voc = get_benchmark("voc21")
    out = tmp_path / "voc"
    assert main(["predict", "--model", str(model_dir), "--benchmark", "voc21", "--output_dir", str(out),
                 str(rgb_path)]) == 0
    record = json.loads((out / "areas.json").read_text())
    assert len(record["classes"]) == 21 and record["classes"] == voc.class_names
    prompts = [p[0] if len(p) == 1 else p for p in voc.class_prompts]
    expected = model.predict([rgb], prompts, allow_void=False)[0].numpy()
    np.testing.assert_array_equal(np.asarray(Image.open(out / "rgb.labels.png")), expected)


def test_unreadable_image_stops_the_job_with_nothing_written(model_dir, images, tmp_path, capsys):
    bad = tmp_path / "in" / "notes.jpg"
    bad.write_text("this is not a JPEG\n")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model_dir), "--classes", "a,b", "--output_dir", str(out),
                 str(images["rgb.jpg"]), str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and str(images["rgb.jpg"]) not in err[0]
    assert not out.exists()

    # a truncated file is named too
    data = images["rgb.jpg"].read_bytes()
    cut = tmp_path / "in" / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert main(["predict", "--model", str(model_dir), "--classes", "a,b", "--output_dir", str(out), str(cut)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(cut) in err[0]
    assert not out.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--classes", "a,b", "MISSING"], "MISSING"),
    (["--classes", "a,b", "--benchmark", "voc21"], "exactly one of --classes"),
    ([], "exactly one of --classes"),
    (["--classes", "a,,b"], "class 2 of 'a,,b' is empty"),
    (["--classes", "a|,b"], "empty synonym"),
    (["--classes", "a,b|a"], "'a' is given to classes 1 and 2"),
    (["--benchmark", "nope"], "unknown benchmark"),
    (["--classes", "a,b", "--alpha", "1.5"], "--alpha"),
    (["--classes", "a,b", "--batch_size", "0"], "--batch_size"),
])
def test_bad_arguments_exit_2(argv, needle, model_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.replace("MISSING", str(tmp_path / "missing.jpg")) for a in argv]
    needle = needle.replace("MISSING", str(tmp_path / "missing.jpg"))
    assert main(["predict", "--model", str(model_dir), "--output_dir", str(out), *argv, str(images["rgb.jpg"])]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_no_images_and_directories_are_bad_arguments(model_dir, images, tmp_path, capsys):
    base = ["predict", "--model", str(model_dir), "--classes", "a,b", "--output_dir", str(tmp_path / "out")]
    assert main(base) == 2 and "no images given" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "in")]) == 2 and "is a directory" in capsys.readouterr().err
    p = str(images["rgb.jpg"])
    assert main([*base, p, p]) == 2 and "given twice" in capsys.readouterr().err


def test_preprocess_argv_turns_bare_arguments_into_images():
    argv = ["--model", "m", "--allow_void", "x.jpg", "--classes", "a,b", "--output_dir", "o", "y.png", "--alpha", "0.3"]
    assert preprocess_argv(argv) == ["--model", "m", "--allow_void", "--classes", "a,b", "--output_dir", "o",
                                     "--alpha", "0.3", "--images", "x.jpg", "y.png"]
    assert preprocess_argv(["--allow_void", "false", "--output-dir=o", "a.jpg"]) == [
        "--allow_void", "false", "--output-dir=o", "--images", "a.jpg"]
    assert preprocess_argv(["--images", "a.jpg", "b.jpg", "--model", "m", "c.jpg", "--", "--odd.jpg"]) == [
        "--model", "m", "--images", "a.jpg", "b.jpg", "c.jpg", "--odd.jpg"]


def test_parse_classes():
    assert parse_classes("sky,road|street,car") == ["sky", ("road", "street"), "car"]
    assert parse_classes(" sky | sky ,  traffic light ") == ["sky", "traffic light"]
    for bad in ("", " ", "a,", ",a", "a,,b", "a||b", "a,b,a"):
        with pytest.raises(ValueError):
            parse_classes(bad)


def test_palette_stems_and_images(tmp_path):
    p = label_palette(300)
    assert p.shape == (300, 3) and p.dtype == np.uint8
    assert len({tuple(c) for c in p}) == 300  # distinct
    assert not ((p[:, 0] == p[:, 1]) & (p[:, 1] == p[:, 2])).any()  # no greys (void swatch, text)
    np.testing.assert_array_equal(label_palette(5), p[:5])  # fixed: a class's colour does not depend on k

    assert output_stems(["a/x.jpg", "b/x.png", "c/y.jpg"]) == ["x.jpg", "x.png", "y"]
    assert output_stems(["a/x.jpg", "b/x.jpg", "c/X.JPG"]) == ["a__x.jpg", "b__x.jpg", "c__X.JPG"]  # case-insensitive
    assert output_stems(["p/a/x.jpg", "q/a/x.jpg"]) == ["p__a__x.jpg", "q__a__x.jpg"]
    assert output_stems([np.zeros((2, 2, 3)), "image0.png"]) == ["image0", "image0.png"]

    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel; the rest transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    rgb = np.asarray(load_image(tmp_path / "t.png"))
    assert rgb.shape == (4, 5, 3) and tuple(rgb[0, 0]) == (200, 0, 0) and tuple(rgb[1, 1]) == (255, 255, 255)
    Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(tmp_path / "g16.png")
    assert tuple(np.asarray(load_image(tmp_path / "g16.png"))[0, 0]) == (255, 255, 255)
    with pytest.raises(ValueError, match="missing.png"):
        check_images([tmp_path / "t.png", tmp_path / "missing.png"])


def test_areas_void_16_bit_labels_and_legend():
    labels = np.array([[0, 0, 2], [2, 2, -1]])
    assert class_areas(labels, ["a", "b", "c"], ignore=-1) == {
        "c": {"pixels": 3, "fraction": 0.5}, "a": {"pixels": 2, "fraction": 2 / 6}}
    with pytest.raises(ValueError, match="outside"):
        class_areas(labels, ["a", "b", "c"])
    assert [r[:3] for r in legend_entries(labels, ["a", "b", "c"], ignore=-1)] == [(2, "c", 3), (0, "a", 2), (None, "void", 1)]

    small = label_image(labels, 3, ignore=-1)
    assert small.mode == "L" and np.asarray(small)[1, 2] == 255
    big = label_image(labels + 297 * (labels == 2), 300, ignore=-1)  # class 299 of 300: 16-bit
    assert big.mode == "I;16"
    arr = np.asarray(big)
    assert arr[0, 2] == 299 and arr[1, 2] == 65535 and arr[0, 0] == 0

    image = Image.fromarray(np.full((2, 3, 3), 100, np.uint8))
    ov = overlay_with_legend(image, labels, ["a", "b", "c"], ignore=-1, alpha=1.0)
    top = np.asarray(ov)[:2, :3]
    pal = label_palette(3)
    assert tuple(top[0, 0]) == tuple(pal[0]) and tuple(top[1, 2]) == (100, 100, 100)  # void keeps the image
    assert _non_grey_colours(np.asarray(ov)[2:]) == {tuple(int(v) for v in pal[0]), tuple(int(v) for v in pal[2])}


def test_predict_images_library_call_with_void(tiny_clip_dir, tmp_path):
    """In-memory images with --allow_void, for a model whose ignore_index (1) is also a class index:
    void pixels are written as 255 and class 1 stays 1."""
    from opentrans_hf.models import CLIPDeepLabV3ForOVS

    torch.manual_seed(0)
    model = CLIPDeepLabV3ForOVS.from_clip(tiny_clip_dir, aspp_channels=16, learn_void_embedding=True, ignore_index=1)
    imgs = [np.random.default_rng(1).integers(0, 256, (20, 26, 3), dtype=np.uint8)]
    record = predict_images(model, imgs, NAMES, tmp_path / "o", allow_void=True)
    assert model.config.ignore_index == 1  # restored
    entry = record["images"]["images[0]"]
    labels = np.asarray(Image.open(tmp_path / "o" / entry["labels"]))
    model.config.ignore_index = 200
    expected = model.predict(imgs, NAMES, allow_void=True)[0].numpy()
    expected[expected == 200] = 255
    np.testing.assert_array_equal(labels, expected)
    assert (labels == 255).any() and (labels == 1).any()  # both void and class 1 present
    assert entry["void"]["pixels"] == int((labels == 255).sum())
    assert sum(a["pixels"] for a in entry["areas"].values()) + entry["void"]["pixels"] == 20 * 26


def test_benchmark_classes_sharing_a_first_name_are_scored_with_all_their_names(model_dir, images):
    """ADE20K-847 has three classes whose first name is "bag": the model gets each class's names as the
    benchmark lists them (classes may share a first name); display names are the benchmark's unique ones."""
    from opentrans_hf.commands.predict import PredictArguments
    from opentrans_hf.data.benchmarks import get_benchmark
    from opentrans_hf.models.classifier import check_class_names

    args = PredictArguments(model=str(model_dir), output_dir="unused", images=[str(images["rgb.jpg"])],
                            benchmark="ade847")
    prompts, bench = args.class_prompts(), get_benchmark("ade847")
    assert len(prompts) == 847 and check_class_names(prompts) == prompts
    for p, original in zip(prompts, bench.class_prompts):
        assert ((p,) if isinstance(p, str) else p) == original
    assert args.class_names() == bench.class_names and len(set(bench.class_names)) == 847
