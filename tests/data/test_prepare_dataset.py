"""``opentrans-hf prepare-dataset``: every benchmark's converter on a tiny fixture in its official raw
layout (labels checked pixel by pixel against hand-computed arrays), the written record, 16-bit labels,
and the unhappy paths (missing folders/files, undecodable labels, atomic writes, exit statuses)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from opentrans_hf.cli import main as cli_main
from opentrans_hf.commands import ArgumentError, prepare_dataset
from opentrans_hf.data.benchmarks.prepare import RawDataError, RawLayoutError, resize_nearest, strip_jpeg_app1
from opentrans_hf.data.benchmarks.registry import PREPARED_RECORD, get_benchmark
from opentrans_hf.data.sources import load_segmentation_dataset
from opentrans_hf.data.transforms import to_label_tensor

W, H = 20, 16  # fixture images: 20 wide, 16 high; labels in 5 column blocks x 2 row halves


def blocks(rows, dtype=np.int64) -> np.ndarray:
    """A (16, 20) map: ``rows[r][c]`` fills row half r (8 rows), column block c (4 columns)."""
    out = np.zeros((H, W), dtype=dtype)
    for r, row in enumerate(rows):
        for c, v in enumerate(row):
            out[r * 8:(r + 1) * 8, c * 4:(c + 1) * 4] = v
    return out


def photo(path: Path, w: int = W, h: int = H, seed: int = 0, colour=None, fmt: str = "JPEG", mode: str = "RGB",
          exif=None) -> np.ndarray:
    """Write an image; returns its RGB pixels as written (before compression)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if colour is not None:
        arr = np.empty((h, w, 3), np.uint8)
        arr[...] = colour
    else:
        arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    kwargs = {"quality": 95} if fmt == "JPEG" else {}
    if exif is not None:
        kwargs["exif"] = exif
    im.save(path, format=fmt, **kwargs)
    return arr


def gray_png(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def palette_png(path: Path, arr: np.ndarray):
    """A VOC-style palette PNG: the indices are the labels, the palette colours something else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.astype(np.uint8).tobytes())
    im.putpalette([(i * 37) % 256 for i in range(768)])
    im.save(path)


def rgb_png(path: Path, rgb: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(path)


# -- the fixtures: raw layout under root, and the expected prepared labels per split ------------------------
def make_ade150(root: Path):
    base = root / "ADEChallengeData2016"
    raw1 = blocks([[0, 1, 150, 151, 37], [2, 2, 2, 2, 255]])
    exp1 = blocks([[255, 0, 149, 255, 36], [1, 1, 1, 1, 255]])
    raw2 = blocks([[5, 5, 5, 5, 5], [0, 0, 0, 0, 0]])
    exp2 = blocks([[4, 4, 4, 4, 4], [255, 255, 255, 255, 255]])
    expected = {}
    for split, official, prefix in (("validation", "validation", "ADE_val"), ("train", "training", "ADE_train")):
        for i, raw in enumerate((raw1, raw2), 1):
            photo(base / "images" / official / f"{prefix}_{i:08d}.jpg", seed=i)
            gray_png(base / "annotations" / official / f"{prefix}_{i:08d}.png", raw)
        expected[split] = [exp1, exp2]
    return expected


def ade_seg(class_ids: np.ndarray) -> np.ndarray:
    """ADE20K full ``*_seg.png`` RGB: R = class // 256 * 10 + (a digit the decoding floors away), G = class % 256,
    B = an instance id (unused)."""
    rgb = np.zeros(class_ids.shape + (3,), np.int64)
    rgb[..., 0] = class_ids // 256 * 10 + (class_ids % 7)
    rgb[..., 1] = class_ids % 256
    rgb[..., 2] = 3
    return rgb


def make_ade847(root: Path):
    base = root / "ADE20K_2021_17_01" / "images" / "ADE"
    # 2978 = wall (class 0, R 110-119, G 162), 3148 = the last class (846, R 120-129, G 76), 312 = building (1),
    # 0 = nothing, 5 = a full-ADE id that is none of the 847
    raw1 = blocks([[2978, 3148, 312, 0, 5], [3148, 3148, 2978, 2978, 2978]])
    exp1 = blocks([[0, 846, 1, 65535, 65535], [846, 846, 0, 0, 0]])
    # 600 x 520 -> 590 x 512: columns < 301 are wall; to the right, rows < 261 the last class, below building.
    # OpenCV-nearest source index floor(x * 600 / 590): columns 0..295 -> source < 301; rows floor(y * 520 / 512):
    # rows 0..256 -> source < 261
    big = np.full((520, 600), 2978, np.int64)
    big[:261, 301:] = 3148
    big[261:, 301:] = 312
    exp_big = np.zeros((512, 590), np.int64)
    exp_big[:257, 296:] = 846
    exp_big[257:, 296:] = 1
    for split, official, prefix in (("validation", "validation", "ADE_val"), ("train", "training", "ADE_train")):
        photo(base / official / "a" / "abbey" / f"{prefix}_00000001.jpg", seed=1)
        rgb_png(base / official / "a" / "abbey" / f"{prefix}_00000001_seg.png", ade_seg(raw1))
        photo(base / official / "b" / "beach" / f"{prefix}_00000002.jpg", w=600, h=520, colour=(100, 150, 200))
        rgb_png(base / official / "b" / "beach" / f"{prefix}_00000002_seg.png", ade_seg(big))
    return {"validation": [exp1, exp_big], "train": [exp1, exp_big]}


PC_RAW = (blocks([[0, 1, 2, 458, 459], [300, 460, 18, 9, 2]]), blocks([[2, 2, 2, 2, 2], [0, 0, 0, 0, 0]]))


def make_pascal_context(root: Path, labels_under_voc: bool = False):
    import scipy.io

    base = root / "VOCdevkit" / "VOC2010"
    labels = base / "trainval" if labels_under_voc else root / "trainval"
    labels.mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    stems = {"train": ["2008_000002", "2008_000003"], "validation": ["2008_000008", "2008_000009"]}
    for split, names in stems.items():
        official = "train" if split == "train" else "val"
        (base / "ImageSets" / "Main" / f"{official}.txt").write_text("\n".join(names) + "\n")
        for stem, raw in zip(names, PC_RAW):
            photo(base / "JPEGImages" / f"{stem}.jpg", seed=len(stem))
            scipy.io.savemat(labels / f"{stem}.mat", {"LabelMap": raw.astype(np.uint16)})


def make_pc59(root: Path):
    make_pascal_context(root)
    # 2 = aeroplane (0), 458 = wood (58), 18 = bed (2), 9 = bag (1); 0, 1 (accordion), 300, 459, 460: none of the 59
    exp1 = blocks([[255, 255, 0, 58, 255], [255, 255, 2, 1, 0]])
    exp2 = blocks([[0, 0, 0, 0, 0], [255, 255, 255, 255, 255]])
    return {"validation": [exp1, exp2], "train": [exp1, exp2]}


def make_pc459(root: Path):
    make_pascal_context(root, labels_under_voc=True)
    exp1 = blocks([[65535, 0, 1, 457, 458], [299, 65535, 17, 8, 1]])
    exp2 = blocks([[1, 1, 1, 1, 1], [65535] * 5])
    return {"validation": [exp1, exp2], "train": [exp1, exp2]}


VOC_RAW = (blocks([[0, 1, 20, 255, 21], [15, 15, 15, 15, 15]]), blocks([[0, 0, 0, 0, 0], [7, 7, 7, 7, 7]]))


def make_voc(root: Path):
    base = root / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    stems = {"train": ["2007_000032", "2007_000039"], "validation": ["2007_000033", "2007_000042"]}
    for split, names in stems.items():
        official = "train" if split == "train" else "val"
        (base / "ImageSets" / "Segmentation" / f"{official}.txt").write_text("\n".join(names) + "\n")
        for stem, raw in zip(names, VOC_RAW):
            photo(base / "JPEGImages" / f"{stem}.jpg", seed=int(stem[-2:]))
            palette_png(base / "SegmentationClass" / f"{stem}.png", raw)


def make_voc21(root: Path):
    make_voc(root)
    exp1 = blocks([[0, 1, 20, 255, 255], [15, 15, 15, 15, 15]])
    exp2 = blocks([[0, 0, 0, 0, 0], [7, 7, 7, 7, 7]])
    return {"validation": [exp1, exp2], "train": [exp1, exp2]}


def make_voc20(root: Path):
    make_voc(root)
    exp1 = blocks([[255, 0, 19, 255, 255], [14, 14, 14, 14, 14]])
    exp2 = blocks([[255] * 5, [6, 6, 6, 6, 6]])
    return {"validation": [exp1, exp2], "train": [exp1, exp2]}


def make_coco_stuff171(root: Path):
    base = root / "coco"
    # value = category id - 1: 0 -> person (0), 181 -> 182 wood (170), 11 -> 12 (no COCO category), 255 unlabelled,
    # 91 -> 92 banner (80, the first stuff class)
    raw1 = blocks([[0, 181, 11, 255, 91], [89, 89, 90, 90, 90]])
    exp1 = blocks([[0, 170, 255, 255, 80], [79, 79, 255, 255, 255]])  # 89 -> 90 toothbrush (79); 90 -> 91: none
    raw2 = blocks([[2, 2, 255, 255, 255], [1, 1, 1, 1, 1]])
    exp2 = blocks([[2, 2, 255, 255, 255], [1, 1, 1, 1, 1]])
    for split, official in (("validation", "val2017"), ("train", "train2017")):
        for i, raw in enumerate((raw1, raw2), 139 if split == "validation" else 9):
            photo(base / official / f"{i:012d}.jpg", seed=i)
            gray_png(base / "stuffthingmaps_trainval2017" / official / f"{i:012d}.png", raw)
    return {"validation": [exp1, exp2], "train": [exp1, exp2]}


def make_coco_panoptic133(root: Path):
    base = root / "coco"
    a = 1 + 256 * 2 + 65536 * 3  # channels (1, 2, 3): category 1, person (0)
    b, c, d, e = 5, 300, 77, 65536  # 200 -> rug (132); 300 -> category 12 (none); 77: no segment; 65536 -> 92 banner (80)
    ids1 = blocks([[a, b, c, d, 0], [e, e, a, a, b]])
    exp1 = blocks([[0, 132, 255, 255, 255], [80, 80, 0, 0, 132]])
    segments1 = [{"id": a, "category_id": 1}, {"id": b, "category_id": 200}, {"id": c, "category_id": 12},
                 {"id": e, "category_id": 92}]
    ids2 = blocks([[b, b, b, b, b], [0, 0, 0, 0, 0]])
    exp2 = blocks([[2, 2, 2, 2, 2], [255] * 5])
    segments2 = [{"id": b, "category_id": 3}]
    expected = {}
    for split, official in (("validation", "val2017"), ("train", "train2017")):
        annotations = []
        for i, (ids, segs) in enumerate(((ids1, segments1), (ids2, segments2)), 285 if split == "validation" else 25):
            name = f"{i:012d}"
            photo(base / official / f"{name}.jpg", seed=i)
            rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1)
            rgb_png(base / f"panoptic_{official}" / f"{name}.png", rgb)
            annotations.append({"image_id": i, "file_name": f"{name}.png", "segments_info": segs})
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"panoptic_{official}.json").write_text(json.dumps({"annotations": annotations}))
        expected[split] = [exp1, exp2]
    return expected


def make_cityscapes19(root: Path):
    # labelIds: 7 road (0), 33 bicycle (18), 26 car (13), 8 sidewalk (1); 0 unlabeled, 6 ground: ignored
    raw1 = blocks([[7, 33, 0, 6, 26], [8, 8, 8, 8, 8]])
    exp1 = blocks([[0, 18, 255, 255, 13], [1, 1, 1, 1, 1]])
    raw2 = blocks([[11, 11, 11, 11, 11], [255] * 5])
    exp2 = blocks([[2, 2, 2, 2, 2], [255] * 5])
    for split, official in (("validation", "val"), ("train", "train")):
        for city, stem, raw in (("frankfurt", "frankfurt_000000_000294", raw1), ("lindau", "lindau_000000_000019", raw2)):
            photo(root / "leftImg8bit" / official / city / f"{stem}_leftImg8bit.png", seed=len(city), fmt="PNG")
            gray_png(root / "gtFine" / official / city / f"{stem}_gtFine_labelIds.png", raw)
    return {"validation": [exp1, exp2], "train": [exp1, exp2]}


FIXTURES = {"ade150": make_ade150, "ade847": make_ade847, "pc59": make_pc59, "pc459": make_pc459,
            "voc20": make_voc20, "voc21": make_voc21, "coco_stuff171": make_coco_stuff171,
            "coco_panoptic133": make_coco_panoptic133, "cityscapes19": make_cityscapes19}


def prepare(name, raw_dir, out, **kwargs):
    return prepare_dataset.run(prepare_dataset.ARGUMENTS(benchmark=name, raw_dir=str(raw_dir), output_dir=str(out),
                                                         no_progress=True, **kwargs))


def check_split(out: Path, split: str, expected: list[np.ndarray], bits: int):
    ds = load_segmentation_dataset(out, split)
    assert ds.column_names == ["image", "label"] and len(ds) == len(expected)
    for row, exp in zip(ds, expected):
        image, label = row["image"], row["label"]
        assert image.mode == "RGB" and image.size == label.size == (exp.shape[1], exp.shape[0])
        assert label.mode == ("I;16" if bits == 16 else "L")
        got = to_label_tensor(label).numpy()
        np.testing.assert_array_equal(got, exp)


# -- every benchmark ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FIXTURES))
def test_every_benchmark_converts_to_the_prepared_convention(name, tmp_path):
    raw = tmp_path / "raw"
    expected = FIXTURES[name](raw)
    out = tmp_path / "out"
    b = get_benchmark(name)
    record = prepare(name, raw, out)
    check_split(out, "validation", expected["validation"], b.label_bits)
    with pytest.raises(ValueError, match="split 'train' is not one of them"):
        load_segmentation_dataset(out, "train")  # only what was asked for
    on_disk = json.loads((out / PREPARED_RECORD).read_text())
    assert on_disk == record
    assert {k: on_disk[k] for k in ("benchmark", "title", "num_classes", "ignore_index", "label_bits", "splits",
                                    "raw_dir", "format_version")} == {
        "benchmark": name, "title": b.title, "num_classes": b.num_classes, "ignore_index": b.prepared_ignore_index,
        "label_bits": b.label_bits, "splits": ["validation"], "raw_dir": str(raw.resolve()), "format_version": 1}
    assert on_disk["num_examples"] == {"validation": 2} and on_disk["max_examples"] is None
    id2label = json.loads((out / "id2label.json").read_text())
    assert id2label == {str(i): n for i, n in enumerate(b.class_names)} and len(id2label) == b.num_classes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]  # no temporary directory left
    assert not list(out.glob(".*")), "no build cache or lock file left in the output"


def test_16_bit_labels_keep_values_over_255(tmp_path):
    make_pc459(tmp_path / "raw")
    out = tmp_path / "out"
    prepare("pc459", tmp_path / "raw" / "VOCdevkit", out, max_examples=1)  # --raw_dir at the top folder itself
    label = load_segmentation_dataset(out, "validation")[0]["label"]
    assert label.mode == "I;16" and label.format == "PNG"
    t = to_label_tensor(label)
    assert {457, 458, 299, 65535} <= set(t.unique().tolist())
    assert t[0, 12].item() == 457 and t[0, 19].item() == 458 and t[8, 0].item() == 299


def test_ade847_resizes_a_shorter_side_over_512(tmp_path):
    make_ade847(tmp_path / "raw")
    out = tmp_path / "out"
    prepare("ade847", tmp_path / "raw" / "ADE20K_2021_17_01", out)  # --raw_dir at the top folder itself
    row = load_segmentation_dataset(out, "validation")[1]
    assert row["image"].size == row["label"].size == (590, 512)
    pixels = np.asarray(row["image"]).astype(int)
    assert np.abs(pixels - np.array([100, 150, 200])).max() <= 3  # a uniform colour stays one (JPEG q95)
    t = to_label_tensor(row["label"])
    assert t[0, 295].item() == 0 and t[0, 296].item() == 846 and t[256, 300].item() == 846 and t[257, 300].item() == 1
    # OpenCV's INTER_NEAREST picks source floor(x * src / dst): first and last pixels map to first and last
    src = np.arange(6 * 7).reshape(6, 7)
    np.testing.assert_array_equal(resize_nearest(src, (3, 2)), [[0, 2, 4], [21, 23, 25]])


def test_train_split_through_the_cli(tmp_path, capsys):
    expected = make_voc21(tmp_path / "raw")
    out = tmp_path / "voc21"
    rc = cli_main(["prepare-dataset", "voc21", "--raw_dir", str(tmp_path / "raw"), "--output_dir", str(out),
                   "--splits", "validation", "train", "--no_progress"])
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "validation 2, train 2 examples" in printed and f"--datasets {out}:validation" in printed
    for split in ("validation", "train"):
        check_split(out, split, expected[split], 8)
    assert json.loads((out / PREPARED_RECORD).read_text())["splits"] == ["validation", "train"]


def test_max_examples_takes_the_first_in_file_order(tmp_path):
    expected = make_cityscapes19(tmp_path / "raw")
    out = tmp_path / "out"
    record = prepare("cityscapes19", tmp_path / "raw", out, splits=["train"], max_examples=1)
    check_split(out, "train", expected["train"][:1], 8)
    assert record["num_examples"] == {"train": 1} and record["max_examples"] == 1


def test_exif_orientation_is_dropped_and_grayscale_becomes_rgb(tmp_path):
    """Labels are on the stored pixel grid; ``datasets`` rotates an image with an EXIF orientation on
    decoding, so the tag is dropped (losslessly for a JPEG). A grayscale JPEG is stored as RGB."""
    base = tmp_path / "raw" / "coco"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    photo(base / "val2017" / "000000000001.jpg", seed=1, exif=exif.tobytes())
    gray_png(base / "stuffthingmaps_trainval2017" / "val2017" / "000000000001.png", np.zeros((H, W)))
    photo(base / "val2017" / "000000000002.jpg", seed=2, mode="L")
    gray_png(base / "stuffthingmaps_trainval2017" / "val2017" / "000000000002.png", np.zeros((H, W)))
    raw_bytes = (base / "val2017" / "000000000001.jpg").read_bytes()
    assert Image.open(io.BytesIO(raw_bytes)).getexif().get(0x0112) == 6
    out = tmp_path / "out"
    prepare("coco_stuff171", base, out)  # --raw_dir at the top folder itself
    ds = load_segmentation_dataset(out, "validation")
    first, second = ds[0], ds[1]
    assert first["image"].size == first["label"].size == (W, H)
    np.testing.assert_array_equal(np.asarray(first["image"]), np.asarray(Image.open(base / "val2017" / "000000000001.jpg")))
    stored = ds.with_format("arrow")[0]["image"][0]["bytes"].as_py()
    assert stored == strip_jpeg_app1(raw_bytes) and len(stored) < len(raw_bytes)  # the JPEG data itself untouched
    assert second["image"].mode == "RGB" and second["image"].size == (W, H)
    gray = np.asarray(Image.open(base / "val2017" / "000000000002.jpg"))
    np.testing.assert_array_equal(np.asarray(second["image"]), np.stack([gray] * 3, axis=-1))


# -- unhappy paths -----------------------------------------------------------------------------------------
def test_missing_top_folder_names_the_path_and_layout(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    out = tmp_path / "out"
    with pytest.raises(RawLayoutError) as err:
        prepare("ade150", tmp_path / "raw", out)
    text = str(err.value)
    assert str(tmp_path / "raw" / "ADEChallengeData2016") in text and get_benchmark("ade150").raw_layout in text
    assert not out.exists()
    rc = cli_main(["prepare-dataset", "cityscapes19", "--raw_dir", str(tmp_path / "raw"), "--output_dir", str(out)])
    stderr = capsys.readouterr().err
    assert rc == 1 and len(stderr.strip().splitlines()) == 1 and str(tmp_path / "raw" / "leftImg8bit") in stderr
    make_pascal_context(tmp_path / "pc")
    (tmp_path / "pc" / "trainval").rename(tmp_path / "pc" / "elsewhere")
    with pytest.raises(RawLayoutError, match=str(tmp_path / "pc" / "trainval")):
        prepare("pc59", tmp_path / "pc", out)


def test_image_without_label_and_list_naming_a_missing_image(tmp_path):
    make_ade150(tmp_path / "ade")
    label = tmp_path / "ade" / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000002.png"
    label.unlink()
    with pytest.raises(RawLayoutError) as err:
        prepare("ade150", tmp_path / "ade", tmp_path / "out")
    image = tmp_path / "ade" / "ADEChallengeData2016" / "images" / "validation" / "ADE_val_00000002.jpg"
    assert str(image) in str(err.value) and str(label) in str(err.value)
    make_voc(tmp_path / "voc")
    missing = tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000042.jpg"
    missing.unlink()
    with pytest.raises(RawLayoutError, match="names '2007_000042'") as err:
        prepare("voc20", tmp_path / "voc", tmp_path / "out")
    assert str(missing) in str(err.value)
    make_coco_panoptic133(tmp_path / "pan")
    photo(tmp_path / "pan" / "coco" / "val2017" / "000000000999.jpg")
    with pytest.raises(RawLayoutError, match="000000000999.png"):
        prepare("coco_panoptic133", tmp_path / "pan", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_undecodable_labels_name_the_file(tmp_path):
    make_voc(tmp_path / "voc")
    label = tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "2007_000033.png"
    Image.open(label).convert("RGB").save(label)  # the colours instead of the indices
    with pytest.raises(RawDataError, match="mode RGB") as err:
        prepare("voc21", tmp_path / "voc", tmp_path / "out")
    assert str(label) in str(err.value)
    make_cityscapes19(tmp_path / "cs")
    label = tmp_path / "cs" / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png"
    gray_png(label, np.zeros((H + 1, W)))
    with pytest.raises(RawDataError, match=f"{label} is 20x17 pixels but its image .*lindau_000000_000019_leftImg8bit"):
        prepare("cityscapes19", tmp_path / "cs", tmp_path / "out")


def test_a_failure_mid_way_leaves_no_output(tmp_path):
    """A corrupt label in the second image: the first was converted already, yet nothing is left under the
    output name or beside it; an existing dataset given with --overwrite stays as it was."""
    make_ade150(tmp_path / "raw")
    label = tmp_path / "raw" / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_val_00000002.png"
    good = label.read_bytes()
    label.write_bytes(good[:40])  # truncated
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    with pytest.raises(RawDataError, match=str(label)):
        prepare("ade150", tmp_path / "raw", out)
    assert list(work.iterdir()) == []  # no output, no temporary directory, no lock
    label.write_bytes(good)
    prepare("ade150", tmp_path / "raw", out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    label.write_bytes(good[:40])
    rc = cli_main(["prepare-dataset", "ade150", "--raw_dir", str(tmp_path / "raw"), "--output_dir", str(out),
                   "--overwrite", "--no_progress"])
    assert rc == 1
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in work.iterdir()] == ["out"]


def test_existing_output_needs_overwrite(tmp_path, capsys):
    expected = make_voc20(tmp_path / "raw")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["prepare-dataset", "voc20", "--raw_dir", str(tmp_path / "raw"), "--output_dir", str(out), "--no_progress"]
    assert cli_main(argv) == 2
    stderr = capsys.readouterr().err
    assert len(stderr.strip().splitlines()) == 1 and str(out) in stderr and "--overwrite" in stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert cli_main(argv + ["--overwrite"]) == 0
    assert not (out / "notes.txt").exists()
    check_split(out, "validation", expected["validation"], 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare("voc20", tmp_path / "raw", empty, max_examples=1)  # an empty directory is no existing output
    with pytest.raises(ArgumentError, match="raw data"):
        prepare("voc20", tmp_path / "raw", tmp_path, overwrite=True)


def test_bad_arguments_exit_2(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    for argv, words in (
        (["prepare-dataset", "ade999", "--raw_dir", str(tmp_path / "raw"), "--output_dir", str(tmp_path / "o")],
         "unknown benchmark 'ade999'"),
        (["prepare-dataset", "ade150", "--raw_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")],
         "no such directory"),
        (["prepare-dataset", "ade150", "--raw_dir", str(tmp_path / "raw"), "--output_dir", str(tmp_path / "o"),
          "--splits", "test"], "--splits must be among"),
        (["prepare-dataset", "ade150", "--raw_dir", str(tmp_path / "raw"), "--output_dir", str(tmp_path / "o"),
          "--max_examples", "0"], "--max_examples must be >= 1"),
    ):
        assert cli_main(argv) == 2, argv
        stderr = capsys.readouterr().err
        assert words in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    args = prepare_dataset.ARGUMENTS(benchmark="ADE-150", raw_dir=str(tmp_path / "raw"), output_dir=str(tmp_path / "o"))
    assert args.benchmark == "ade150" and args.splits == ["validation"]


# -- prepared, then evaluated with no flags ------------------------------------------------------------------
def test_a_prepared_benchmark_evaluates_without_flags(tmp_path, tiny_clip_dir, capsys):
    """prepare-dataset pc459 -> evaluate OUT:validation: the 459 names with synonyms and the 16-bit ignore
    value come from the record; the field's protocol (shortest side, sliding windows) applies; scores agree
    with the model's own sliding-window predictions at the labels' size; --prompt_templates fcclip."""
    from opentrans_hf.models import CLIPDeepLabV3ForOVS

    make_pc459(tmp_path / "raw")
    prepare("pc459", tmp_path / "raw", tmp_path / "pc459")
    model_dir = tmp_path / "model"
    CLIPDeepLabV3ForOVS.from_clip(str(tiny_clip_dir), image_size=30).save_pretrained(model_dir)
    out = tmp_path / "eval.json"
    rc = cli_main(["evaluate", "--model", str(model_dir), "--datasets", f"{tmp_path / 'pc459'}:validation",
                   "--shortest_side", "40", "--max_size", "60", "--prompt_templates", "fcclip", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    row = next(iter(json.loads(out.read_text())["results"].values()))
    assert len(row["per_category_iou"]) == 459
    assert "benchmark pc459" in row["vocabulary"] and "prepared" in row["vocabulary"] and "ignore 65535" in row["vocabulary"]
    assert "shortest side 40" in row["protocol"]
    # the reference: the model's own sliding-window predictions on the prepared images, scored here
    import torch

    from opentrans_hf.data.benchmarks import get_benchmark
    from opentrans_hf.data.transforms import SegmentationTransform

    model = CLIPDeepLabV3ForOVS.from_pretrained(model_dir).eval()
    model.set_prompt_templates("fcclip")
    prompts = get_benchmark("pc459").class_prompts
    prompts = [p[0] if len(p) == 1 else p for p in prompts]
    confusion = torch.zeros(459, 459, dtype=torch.long)
    tf = SegmentationTransform(40, resize="shortest_side", max_size=60)
    for example in load_segmentation_dataset(tmp_path / "pc459", "validation"):
        x, _ = tf(example["image"])
        pred = model.predict_sliding(x, prompts)
        label = to_label_tensor(example["label"])
        pred = torch.nn.functional.interpolate(pred[None, None].float(), size=label.shape, mode="nearest")[0, 0].long()
        keep = label != 65535
        confusion += torch.bincount(label[keep] * 459 + pred[keep], minlength=459 * 459).view(459, 459)
    inter = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - inter
    present = union > 0
    assert row["mean_iou"] == pytest.approx(float((inter[present] / union[present]).mean()), abs=1e-9)
    assert row["overall_accuracy"] == pytest.approx(float(inter.sum() / confusion.sum()), abs=1e-9)
