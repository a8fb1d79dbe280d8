"""Converters from the official releases of the standard benchmarks (or a local copy of a benchmark's Hub
dataset repo) to prepared datasets (``opentrans-hf prepare-dataset``).

A prepared benchmark is a ``DatasetDict`` saved with ``save_to_disk``: one split per requested split
(``train`` / ``validation``), columns ``image`` (an RGB image) and ``label`` (a PNG: mode ``L`` for the
8-bit benchmarks, 16-bit grayscale for ADE20K-847 and Pascal Context-459), with labels in the
*prepared* convention of :mod:`~opentrans_hf.data.benchmarks.registry`: label ``i`` is class ``i`` of
``get_benchmark(name).class_names``, every other pixel the benchmark's ``prepared_ignore_index``.
Beside it: ``id2label.json`` (the class names) and ``benchmark.json`` (:data:`PREPARED_RECORD`).

Every converter reads, per pixel, the value the class has in the official release (the benchmark's
``raw_ids``) and maps it to its class index; values of no class are ignored:

* ``ade150``: the challenge annotation PNG (0 = other);
* ``ade847``: ``(R // 10) * 256 + G`` of ``*_seg.png`` (the full ADE20K index); images with a shorter
  side over 512 are resized to 512 (image bilinear, label nearest, as OpenCV's ``INTER_LINEAR`` /
  ``INTER_NEAREST`` which the field's preparation uses);
* ``pc59`` / ``pc459``: ``LabelMap`` of Pascal Context's ``.mat`` files (459 label ids, 0 = unlabelled);
* ``voc20`` / ``voc21``: the palette indices of ``SegmentationClass/*.png`` (255 = boundary);
* ``coco_stuff171``: ``value + 1`` of the stuffthingmaps PNGs (value = category id - 1, 255 unlabelled);
* ``coco_panoptic133``: the category of each panoptic segment (segment id ``R + 256 G + 256^2 B``);
* ``cityscapes19``: the ``*_gtFine_labelIds.png`` labelIds.

A benchmark with a Hub copy (``ade150``: scene_parse_150) is also read from a local copy of that repo
(:mod:`~opentrans_hf.data.benchmarks.hub_copy`: the repo's root holding the configuration folder, e.g.
``scene_parsing/{train,validation}/*.parquet`` as ``refs/convert/parquet`` holds it, or that folder
itself): its image column as stored, its label column read as the official label PNG.

Images are stored as their original file bytes when they can be (an RGB JPEG or PNG, not resized);
a JPEG's EXIF orientation tag is dropped losslessly (labels are on the stored pixel grid, and
``datasets`` would otherwise rotate the image away from its label on decoding). Images that must be
re-encoded are PNG (lossless: a grayscale or CMYK image converted to RGB), except resized ADE20K-847
images, which are JPEG quality 95 (the field's preparation re-saves them as JPEG too).

The output is written atomically (a temporary sibling directory renamed into place): an error or a
kill mid-way never leaves a half-written dataset under the output name.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from opentrans_hf.data.benchmarks.hub_copy import (
    HubCopy,
    config_folders,
    declared_configs,
    hub_copy_splits,
    is_hub_copy,
    load_hub_copy,
    open_hub_copy,
)
from opentrans_hf.data.benchmarks.registry import PREPARED_RECORD, Benchmark, get_benchmark
from opentrans_hf.utils.io import atomic_directory

SPLITS = ("train", "validation")
"""The splits ``prepare-dataset`` writes (named as ``datasets`` names them)."""

FORMAT_VERSION = 1
ADE847_SHORTER_SIDE = 512
RESIZED_JPEG_QUALITY = 95
_ORIENTATION = 0x0112  # the EXIF orientation tag


class RawLayoutError(FileNotFoundError):
    """A folder or file of the official release is not where the benchmark's layout puts it."""


class RawDataError(ValueError):
    """A file of the official release cannot be decoded (names the file)."""


@dataclass(frozen=True)
class RawExample:
    """One image of the official release and its label file (and, for COCO panoptic, its segments as
    ``((segment id, category id), ...)``)."""

    image: Path
    label: Path
    segments: tuple[tuple[int, int], ...] | None = None


def layout_text(benchmark: Benchmark) -> str:
    """The benchmark's ``raw_layout``, with ``as <other>`` resolved."""
    text = benchmark.raw_layout
    m = re.fullmatch(r"as (\w+)", text.strip())
    return get_benchmark(m.group(1)).raw_layout if m else text


# -- reading the official files ------------------------------------------------------------------------
def _open_image(path: Path | str, data: bytes | None = None):
    """A fully decoded PIL image (of ``data``, the bytes of ``path``, when given: ``path`` then only names
    it); an unreadable file is a :class:`RawDataError` naming it."""
    try:
        im = Image.open(path if data is None else io.BytesIO(data))
        im.load()
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise RawDataError(f"{path} cannot be decoded as an image: {err}") from None
    return im


def read_index_png(path: Path | str, data: bytes | None = None) -> np.ndarray:
    """The class indices of a single-channel label PNG (mode L, P (the palette indices, not the colours),
    I;16 or I) as int64 (of ``data``, the PNG's bytes, when given: ``path`` then only names it)."""
    im = _open_image(path, data)
    if im.mode not in ("L", "P", "I;16", "I;16B", "I"):
        raise RawDataError(f"label map {path} has PIL mode {im.mode}: expected one class index per pixel "
                           "(a single-channel or palette PNG as the official release ships it), not colours")
    return np.asarray(im).astype(np.int64)


def read_rgb_png(path: Path) -> np.ndarray:
    """The ``(H, W, 3)`` int64 channels of an RGB label PNG (ADE20K ``*_seg.png``, COCO panoptic PNGs)."""
    im = _open_image(path)
    if im.mode not in ("RGB", "RGBA"):
        raise RawDataError(f"label map {path} has PIL mode {im.mode}: expected an RGB PNG whose channels "
                           "encode the ids, as the official release ships it")
    return np.asarray(im)[..., :3].astype(np.int64)


def read_label_mat(path: Path) -> np.ndarray:
    """``LabelMap`` of a Pascal Context ``.mat`` file (Pascal Context's 459 label ids, 0 = unlabelled)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - scipy raises ValueError, TypeError, MatReadError, ...
        raise RawDataError(f"{path} cannot be read as a MATLAB file: {err}") from None
    if "LabelMap" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise RawDataError(f"{path} has no 'LabelMap' (it holds {keys}): expected a Pascal Context label file")
    arr = np.asarray(mat["LabelMap"])
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise RawDataError(f"{path}: LabelMap must be a 2-D array of label ids, got {arr.dtype} of shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise RawDataError(f"{path}: LabelMap holds values that are not integer label ids")
    return arr.astype(np.int64)


# -- the layouts ---------------------------------------------------------------------------------------
class Converter:
    """How one benchmark's official release is laid out and how its label files read.

    ``top``: the release's top folder(s) under ``--raw_dir`` (``--raw_dir`` may also be any of them,
    or the last one itself when it holds ``marker``)."""

    top: tuple[str, ...] = ()
    marker: str = ""
    official: dict[str, str] = {"train": "train", "validation": "val"}
    shorter_side: int | None = None

    def __init__(self, benchmark: Benchmark):
        self.benchmark = benchmark

    # paths ------------------------------------------------------------------------------------------
    def missing(self, path: Path, what: str) -> RawLayoutError:
        return RawLayoutError(f"{what} {path} does not exist; {self.benchmark.name} expects under --raw_dir: "
                              f"{layout_text(self.benchmark)}")

    def require(self, path: Path, what: str, kind: str = "dir") -> Path:
        ok = path.is_dir() if kind == "dir" else path.is_file()
        if not ok:
            raise self.missing(path, what)
        return path

    def locate(self, raw_dir: Path) -> Path:
        """The release's top folder: ``raw_dir/top``, or ``raw_dir`` when it is (part of) that path."""
        raw_dir = Path(raw_dir)
        for k in range(len(self.top)):
            candidate = raw_dir.joinpath(*self.top[k:])
            if candidate.is_dir() and (k == 0 or raw_dir.name == self.top[k - 1]):
                return candidate
        if (raw_dir / self.marker).exists():
            return raw_dir
        for k in range(1, len(self.top)):  # raw_dir is an outer top folder under another name
            candidate = raw_dir.joinpath(*self.top[k:])
            if (candidate / self.marker).exists():
                return candidate
        expected = raw_dir.joinpath(*self.top) if self.top else raw_dir / self.marker
        raise RawLayoutError(
            f"folder {expected} does not exist (--raw_dir must be the folder that holds "
            f"{'/'.join(self.top) or self.marker}{' or that folder itself' if self.top else ''}); "
            f"{self.benchmark.name} expects under --raw_dir: {layout_text(self.benchmark)}")

    def examples(self, base: Path, split: str) -> list[RawExample]:
        raise NotImplementedError

    def _from_folder(self, image_dir: Path, pattern: str, label_of, recursive: bool = False) -> list[RawExample]:
        self.require(image_dir, "image folder")
        images = sorted(image_dir.rglob(pattern) if recursive else image_dir.glob(pattern),
                        key=lambda p: (p.name, str(p)))
        if not images:
            raise RawLayoutError(f"image folder {image_dir} holds no {pattern} files; {self.benchmark.name} "
                                 f"expects under --raw_dir: {layout_text(self.benchmark)}")
        return [RawExample(p, label_of(p)) for p in images]

    def _from_list(self, list_file: Path, image_dir: Path, label_of) -> list[RawExample]:
        self.require(list_file, "image list", "file")
        stems = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        if not stems:
            raise RawLayoutError(f"image list {list_file} is empty")
        self.require(image_dir, "image folder")
        out = []
        for stem in stems:
            image = image_dir / f"{stem}.jpg"
            if not image.is_file():
                raise RawLayoutError(f"image list {list_file} names {stem!r}, but its image {image} does not exist")
            out.append(RawExample(image, label_of(stem)))
        return out

    # values -----------------------------------------------------------------------------------------
    def raw_values(self, example: RawExample) -> np.ndarray:
        """``(H, W)`` int64: each pixel's value in the benchmark's raw id space (the ``raw_ids``); -1 or
        any value of no class is ignored."""
        return read_index_png(example.label)


class ADE150(Converter):
    top = ("ADEChallengeData2016",)
    marker = "images"
    official = {"train": "training", "validation": "validation"}

    def examples(self, base, split):
        ann = base / "annotations" / self.official[split]
        self.require(ann, "annotation folder")
        return self._from_folder(base / "images" / self.official[split], "*.jpg", lambda p: ann / f"{p.stem}.png")


class ADE847(Converter):
    top = ("ADE20K_2021_17_01",)
    marker = "images"
    official = {"train": "training", "validation": "validation"}
    shorter_side = ADE847_SHORTER_SIDE

    def examples(self, base, split):
        return self._from_folder(base / "images" / "ADE" / self.official[split], "ADE_*.jpg",
                                 lambda p: p.with_name(f"{p.stem}_seg.png"), recursive=True)

    def raw_values(self, example):
        rgb = read_rgb_png(example.label)
        return (rgb[..., 0] // 10) * 256 + rgb[..., 1]


class PascalContext(Converter):
    top = ("VOCdevkit", "VOC2010")
    marker = "JPEGImages"

    def examples(self, base, split):
        root = base.parent.parent  # the folder holding VOCdevkit
        candidates = [root / "trainval", base / "trainval", base.parent / "trainval"]
        labels = next((c for c in candidates if c.is_dir()), None)
        if labels is None:
            raise RawLayoutError(f"Pascal Context label folder {candidates[0]} (or {candidates[1]}) does not exist; "
                                 f"{self.benchmark.name} expects under --raw_dir: {layout_text(self.benchmark)}")
        return self._from_list(base / "ImageSets" / "Main" / f"{self.official[split]}.txt", base / "JPEGImages",
                               lambda stem: labels / f"{stem}.mat")

    def raw_values(self, example):
        return read_label_mat(example.label)


class VOC(Converter):
    top = ("VOCdevkit", "VOC2012")
    marker = "JPEGImages"

    def examples(self, base, split):
        labels = self.require(base / "SegmentationClass", "label folder")
        return self._from_list(base / "ImageSets" / "Segmentation" / f"{self.official[split]}.txt",
                               base / "JPEGImages", lambda stem: labels / f"{stem}.png")


class COCOStuff(Converter):
    top = ("coco",)
    marker = "stuffthingmaps_trainval2017"
    official = {"train": "train2017", "validation": "val2017"}

    def examples(self, base, split):
        labels = self.require(base / "stuffthingmaps_trainval2017" / self.official[split], "label folder")
        return self._from_folder(base / self.official[split], "*.jpg", lambda p: labels / f"{p.stem}.png")

    def raw_values(self, example):
        return read_index_png(example.label) + 1  # value = category id - 1; 255 -> 256, no category


class COCOPanoptic(Converter):
    top = ("coco",)
    marker = "annotations"
    official = {"train": "train2017", "validation": "val2017"}

    def examples(self, base, split):
        name = self.official[split]
        ann_file = self.require(base / "annotations" / f"panoptic_{name}.json", "panoptic annotation file", "file")
        png_dir = self.require(base / f"panoptic_{name}", "panoptic PNG folder")
        images = self._from_folder(base / name, "*.jpg", lambda p: png_dir / f"{p.stem}.png")
        try:
            annotations = json.loads(ann_file.read_text()).get("annotations")
        except (ValueError, AttributeError) as err:
            raise RawDataError(f"{ann_file} is not a COCO panoptic annotation file: {err}") from None
        if not isinstance(annotations, list):
            raise RawDataError(f"{ann_file} has no 'annotations' list: not a COCO panoptic annotation file")
        by_file = {}
        try:
            for ann in annotations:
                by_file[ann["file_name"]] = tuple((int(s["id"]), int(s["category_id"])) for s in ann["segments_info"])
        except (KeyError, TypeError, ValueError) as err:
            raise RawDataError(f"{ann_file}: an annotation lacks file_name / segments_info[].id / category_id "
                               f"({type(err).__name__}: {err})") from None
        out = []
        for ex in images:
            if ex.label.name not in by_file:
                raise RawLayoutError(f"image {ex.image} has no label: no annotation with file_name "
                                     f"{ex.label.name!r} in {ann_file}")
            out.append(RawExample(ex.image, ex.label, by_file[ex.label.name]))
        return out

    def raw_values(self, example):
        rgb = read_rgb_png(example.label)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
        category = dict(example.segments or ())
        uniq, inverse = np.unique(ids, return_inverse=True)
        cats = np.array([category.get(int(u), -1) for u in uniq], dtype=np.int64)  # no segment: -1, ignored
        return cats[inverse.reshape(ids.shape)]


class Cityscapes(Converter):
    top = ("cityscapes",)
    marker = "leftImg8bit"

    def locate(self, raw_dir):
        raw_dir = Path(raw_dir)
        if not (raw_dir / self.marker).is_dir() and (raw_dir / "cityscapes" / self.marker).is_dir():
            return raw_dir / "cityscapes"
        return self.require(raw_dir / self.marker, "folder").parent

    def examples(self, base, split):
        labels = self.require(base / "gtFine" / self.official[split], "label folder")

        def label_of(p: Path) -> Path:
            return labels / p.parent.name / (p.name[: -len("_leftImg8bit.png")] + "_gtFine_labelIds.png")

        return self._from_folder(base / "leftImg8bit" / self.official[split], "*/*_leftImg8bit.png", label_of)


CONVERTERS: dict[str, type[Converter]] = {
    "ade150": ADE150, "ade847": ADE847, "pc59": PascalContext, "pc459": PascalContext, "voc20": VOC,
    "voc21": VOC, "coco_stuff171": COCOStuff, "coco_panoptic133": COCOPanoptic, "cityscapes19": Cityscapes,
}


def converter(name: str) -> Converter:
    """The converter of benchmark ``name`` (an unknown name is an error listing the benchmarks)."""
    b = get_benchmark(name)
    return CONVERTERS[b.name](b)


# -- raw values -> prepared labels -----------------------------------------------------------------------
def class_lookup(benchmark: Benchmark) -> np.ndarray:
    """``lut[raw id] = class index`` (the ``raw_ids`` in label order), every other entry the prepared ignore."""
    lut = np.full(max(benchmark.raw_ids) + 1, benchmark.prepared_ignore_index, dtype=np.int64)
    lut[list(benchmark.raw_ids)] = np.arange(len(benchmark.raw_ids))
    return lut


def map_raw_values(raw: np.ndarray, benchmark: Benchmark, lut: np.ndarray | None = None) -> np.ndarray:
    """Raw ids -> prepared labels (``uint8`` / ``uint16``); values of no class -> the prepared ignore."""
    lut = class_lookup(benchmark) if lut is None else lut
    raw = np.asarray(raw, dtype=np.int64)
    out = np.full(raw.shape, benchmark.prepared_ignore_index, dtype=np.int64)
    known = (raw >= 0) & (raw < len(lut))
    out[known] = lut[raw[known]]
    return out.astype(np.uint16 if benchmark.label_bits == 16 else np.uint8)


def shorter_side_size(width: int, height: int, side: int) -> tuple[int, int] | None:
    """``(width, height)`` with the shorter side ``side`` (the longer one as the field computes it:
    ``int(longer * side / shorter)``), or None when the shorter side is not over ``side``."""
    ratio = side / min(width, height)
    if ratio >= 1:
        return None
    if width <= height:
        return side, int(height * ratio)
    return int(width * ratio), side


def _linear_taps(src: int, dst: int):
    f = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5  # half-pixel centres, as OpenCV
    i0 = np.floor(f).astype(np.int64)
    w = f - i0
    low, high = i0 < 0, i0 >= src - 1
    i0[low], w[low] = 0, 0.0
    i0[high], w[high] = src - 1, 0.0
    return i0, np.minimum(i0 + 1, src - 1), w.astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, C)`` uint8 -> ``size = (width, height)``, bilinear as OpenCV's ``INTER_LINEAR`` (no
    antialiasing; OpenCV's fixed-point rounding aside)."""
    h, w = image.shape[:2]
    tw, th = size
    y0, y1, wy = _linear_taps(h, th)
    x0, x1, wx = _linear_taps(w, tw)
    rows = image[y0].astype(np.float32) * (1 - wy)[:, None, None] + image[y1].astype(np.float32) * wy[:, None, None]
    out = rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` -> ``size = (width, height)``, nearest as OpenCV's ``INTER_NEAREST``
    (source index ``floor(dst * src / dst_size)``)."""
    h, w = label.shape[:2]
    tw, th = size
    yi = np.minimum(np.floor(np.arange(th) * (1.0 / (th / h))).astype(np.int64), h - 1)
    xi = np.minimum(np.floor(np.arange(tw) * (1.0 / (tw / w))).astype(np.int64), w - 1)
    return label[np.ix_(yi, xi)]


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def label_png(label: np.ndarray) -> bytes:
    """A prepared label map as PNG bytes: mode L (uint8) or 16-bit grayscale (uint16), which ``datasets``'
    own encoder would store as TIFF."""
    if label.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"label maps are uint8 or uint16, got {label.dtype}")
    return _png_bytes(Image.fromarray(np.ascontiguousarray(label)))


def _orientation(image) -> int | None:
    try:
        return image.getexif().get(_ORIENTATION)
    except Exception:  # noqa: BLE001 - a broken EXIF block: treated as none (PIL then ignores it too)
        return None


def strip_jpeg_app1(data: bytes) -> bytes | None:
    """The JPEG ``data`` without its APP1 segments (EXIF, XMP), the compressed image untouched; None if
    the marker structure cannot be followed."""
    if data[:2] != b"\xff\xd8":
        return None
    out, i, n = [data[:2]], 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xDA, 0xD9):  # start of scan (the rest is image data) / end of image
            out.append(data[i:])
            return b"".join(out)
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            out.append(data[i:i + 2])
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2 or i + 2 + length > n:
            return None
        if marker != 0xE1:
            out.append(data[i:i + 2 + length])
        i += 2 + length
    return None


def image_entry(path: Path | str, label_path: Path | str, label_shape: tuple[int, int], shorter_side: int | None = None,
                data: bytes | None = None):
    """``({"bytes": ..., "path": None}, resized_to)``: the RGB image on its label's pixel grid (resized
    so its shorter side is ``shorter_side`` when over it; ``resized_to`` is then ``(width, height)``).
    ``data``: the image file's bytes (``path`` then only names it), else read from ``path``."""
    data = Path(path).read_bytes() if data is None else data
    im = _open_image(path, data)
    h, w = label_shape
    orient = _orientation(im)
    transposed = False
    if im.size != (w, h):
        if orient not in (None, 1):
            rotated = ImageOps.exif_transpose(im)
            transposed = rotated.size == (w, h)
            im = rotated if transposed else im
        if not transposed:
            raise RawDataError(f"label map {label_path} is {w}x{h} pixels but its image {path} is "
                               f"{im.size[0]}x{im.size[1]}")
    target = shorter_side_size(w, h, shorter_side) if shorter_side else None
    if target is None and not transposed and im.mode == "RGB" and im.format in ("JPEG", "PNG"):
        if orient in (None, 1):
            return {"bytes": data, "path": None}, None
        if im.format == "JPEG":
            stripped = strip_jpeg_app1(data)
            if stripped is not None and _orientation(Image.open(io.BytesIO(stripped))) in (None, 1):
                return {"bytes": stripped, "path": None}, None
    rgb = im if im.mode == "RGB" else im.convert("RGB")
    if target is None:
        return {"bytes": _png_bytes(Image.fromarray(np.asarray(rgb))), "path": None}, None
    resized = Image.fromarray(resize_bilinear(np.asarray(rgb), target))
    buf = io.BytesIO()
    resized.save(buf, format="JPEG", quality=RESIZED_JPEG_QUALITY)
    return {"bytes": buf.getvalue(), "path": None}, target


def convert_example(conv: Converter, example: RawExample, lut: np.ndarray | None = None) -> dict:
    """One prepared row: ``{"image": {"bytes", "path"}, "label": {"bytes", "path"}}``."""
    return _prepared_row(conv, conv.raw_values(example), example.image, example.label, lut)


def _prepared_row(conv: Converter, raw: np.ndarray, image_path, label_path, lut: np.ndarray | None = None,
                  image_data: bytes | None = None) -> dict:
    """The prepared row of an image (read from ``image_path``, or ``image_data``) and the raw values of
    its label map (read from ``label_path``, which names it)."""
    if raw.ndim != 2:
        raise RawDataError(f"label map {label_path} decodes to shape {raw.shape}, expected (H, W)")
    image, resized_to = image_entry(image_path, label_path, raw.shape, conv.shorter_side, data=image_data)
    label = map_raw_values(raw, conv.benchmark, lut)
    if resized_to is not None:
        label = resize_nearest(label, resized_to)
    return {"image": image, "label": {"bytes": label_png(label), "path": None}}


def split_examples(conv: Converter, base: Path, split: str, max_examples: int | None = None) -> list[RawExample]:
    """The examples of ``split`` (the first ``max_examples``), every label file checked to exist."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    examples = conv.examples(base, split)
    if max_examples is not None:
        examples = examples[:max_examples]
    for ex in examples:
        if not ex.label.is_file():
            raise RawLayoutError(f"image {ex.image} has no label file: expected {ex.label}")
    return examples


def _generate(name: str, examples: list[RawExample], desc: str, progress: bool) -> Iterator[dict]:
    conv = converter(name)
    lut = class_lookup(conv.benchmark)
    for ex in tqdm(examples, desc=desc, unit="img", disable=not progress):
        yield convert_example(conv, ex, lut)


# -- a local copy of the benchmark's Hub dataset repo -----------------------------------------------------
def hub_copy_to_prepare(conv: Converter, raw_dir: Path) -> HubCopy | None:
    """The local copy of the benchmark's Hub repo that ``raw_dir`` is (its root, holding the configuration
    the benchmark is, or that configuration's folder), or None when ``raw_dir`` is no such copy or holds
    the official release (which is then what is converted). A copy without the benchmark's configuration
    is a :class:`RawLayoutError` naming the missing folder."""
    b = conv.benchmark
    if b.hub is None or not is_hub_copy(raw_dir):
        return None
    try:
        conv.locate(raw_dir)
        return None
    except RawLayoutError:
        pass
    wanted = b.hub.data_dir
    if wanted and raw_dir.name != wanted:
        folders, declared = config_folders(raw_dir), declared_configs(raw_dir)
        if (folders or len(declared) > 1) and wanted not in folders and wanted not in declared:
            raise RawLayoutError(
                f"folder {raw_dir / wanted} does not exist: {raw_dir} is a copy of a Hub dataset repo with the "
                f"configurations {folders or declared}, and {b.name} is configuration {wanted!r} of "
                f"{b.hub.repo_id} ({hub_copy_layout(b)}); {b.name} also reads its official release: {layout_text(b)}")
    try:
        return open_hub_copy(raw_dir, b.name)
    except ValueError as err:
        raise RawLayoutError(str(err)) from None


def hub_copy_layout(benchmark: Benchmark) -> str:
    """How a local copy of the benchmark's Hub repo is laid out, for messages."""
    hub = benchmark.hub
    folder = f"{hub.data_dir}/" if hub.data_dir else ""
    return (f"{folder}{{train,validation}}/*.parquet with columns {hub.image_column!r} and {hub.label_column!r}, as "
            f"{hub.repo_id}{'@' + hub.revision if hub.revision else ''} holds it")


def hub_copy_rows(conv: Converter, copy: HubCopy, split: str, max_examples: int | None = None):
    """The rows of ``split`` of the copy (the first ``max_examples``), images and labels as stored (not
    decoded); a missing split or column is a :class:`RawLayoutError` naming the folder."""
    import datasets

    hub = conv.benchmark.hub
    name = hub.splits.get(split, split)
    available = hub_copy_splits(copy)
    if name not in available:
        raise RawLayoutError(f"split folder {copy.folder / name} does not exist: the Hub dataset copy {copy.where} has "
                             f"the splits {available}; {conv.benchmark.name} expects {hub_copy_layout(conv.benchmark)}")
    ds = load_hub_copy(copy, name)
    missing = [c for c in (hub.image_column, hub.label_column) if c not in ds.column_names]
    if missing:
        raise RawLayoutError(f"the Hub dataset copy {copy.where} split {name!r} has no column {missing[0]!r} (its columns: "
                             f"{ds.column_names}); {conv.benchmark.name} expects {hub_copy_layout(conv.benchmark)}")
    if len(ds) == 0:
        raise RawLayoutError(f"the Hub dataset copy {copy.where} split {name!r} has no examples")
    if max_examples is not None:
        ds = ds.select(range(min(max_examples, len(ds))))
    ds = ds.select_columns([hub.image_column, hub.label_column])
    for column in (hub.image_column, hub.label_column):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def _stored_bytes(entry, what: str) -> bytes:
    """The file bytes of an undecoded ``datasets.Image`` value (embedded, or the file it points at)."""
    if isinstance(entry, dict) and entry.get("bytes"):
        return entry["bytes"]
    path = entry.get("path") if isinstance(entry, dict) else None
    if path and Path(path).is_file():
        return Path(path).read_bytes()
    raise RawDataError(f"{what} holds no image (neither bytes nor a file that exists: {str(entry)[:200]})")


def convert_hub_row(conv: Converter, row: dict, where: str, lut: np.ndarray | None = None) -> dict:
    """One prepared row of a row of the benchmark's Hub copy (``where`` names it in messages)."""
    hub = conv.benchmark.hub

    def name(column):
        path = row[column].get("path") if isinstance(row[column], dict) else None
        return f"{where} column {column!r}" + (f" ({path})" if path else "")

    image_name, label_name = name(hub.image_column), name(hub.label_column)
    raw = read_index_png(label_name, _stored_bytes(row[hub.label_column], label_name))
    return _prepared_row(conv, raw, image_name, label_name, lut,
                         image_data=_stored_bytes(row[hub.image_column], image_name))


def _generate_hub(name: str, rows, where: str, desc: str, progress: bool) -> Iterator[dict]:
    conv = converter(name)
    lut = class_lookup(conv.benchmark)
    for i, row in enumerate(tqdm(rows, desc=desc, unit="img", disable=not progress)):
        yield convert_hub_row(conv, row, f"{where} row {i}", lut)


@contextmanager
def _datasets_bars_off():
    import datasets

    was_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            datasets.enable_progress_bars()


def _locate_or_say_hub(conv: Converter, raw_dir: Path) -> Path:
    """:meth:`Converter.locate`, whose error also says that a local copy of the benchmark's Hub repo is read."""
    try:
        return conv.locate(raw_dir)
    except RawLayoutError as err:
        hub = conv.benchmark.hub
        raise RawLayoutError(f"{err}; or a local copy of its Hub dataset {hub.repo_id}: "
                             f"{hub_copy_layout(conv.benchmark)}") from None


def prepared_features():
    import datasets

    return datasets.Features({"image": datasets.Image(), "label": datasets.Image()})


def prepare_benchmark(name: str, raw_dir: str | Path, output_dir: str | Path, splits=("validation",),
                      max_examples: int | None = None, progress: bool = True) -> dict:
    """Convert benchmark ``name``'s official release under ``raw_dir`` into a prepared ``DatasetDict``
    at ``output_dir`` (replacing what is there, atomically) with ``id2label.json`` and
    ``benchmark.json``; returns the record written to ``benchmark.json``."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    conv = converter(name)
    b = conv.benchmark
    splits = list(dict.fromkeys(splits))
    if not splits:
        raise ValueError("no splits to prepare")
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"unknown split {s!r}; choose from {SPLITS}")
    raw_dir = Path(raw_dir)
    try:
        copy = hub_copy_to_prepare(conv, raw_dir)
    except ValueError as err:  # its configurations or dataset card cannot be read
        raise RawDataError(str(err)) from None
    if copy is None:
        base = conv.locate(raw_dir) if b.hub is None else _locate_or_say_hub(conv, raw_dir)
        listed = {s: split_examples(conv, base, s, max_examples) for s in splits}  # every layout error before any work
        generator = {s: (_generate, {"examples": listed[s]}) for s in splits}
        raw_form = "official release"
    else:
        with _datasets_bars_off():
            listed = {s: hub_copy_rows(conv, copy, s, max_examples) for s in splits}
        generator = {s: (_generate_hub, {"rows": listed[s], "where": f"{copy.where} split {s!r}"}) for s in splits}
        raw_form = f"local copy of {b.hub.repo_id}" + (f", configuration {copy.config!r}" if copy.config else "")
    with atomic_directory(output_dir) as tmp:
        cache = tmp / ".build-cache"
        parts = {}
        with _datasets_bars_off():
            for s in splits:
                generate, source = generator[s]
                try:
                    parts[s] = datasets.Dataset.from_generator(
                        generate, features=prepared_features(), cache_dir=str(cache),
                        gen_kwargs={"name": b.name, **source, "desc": f"{b.name} {s}", "progress": progress},
                        split=datasets.NamedSplit(s), fingerprint=uuid.uuid4().hex)
                except DatasetGenerationError as err:  # the converter's own error, not datasets' wrapper
                    cause = err.__cause__ or err.__context__
                    raise (cause if cause is not None else err) from None
            datasets.DatasetDict(parts).save_to_disk(str(tmp))
        del parts
        shutil.rmtree(cache, ignore_errors=True)
        id2label = {str(i): n for i, n in enumerate(b.class_names)}
        (tmp / "id2label.json").write_text(json.dumps(id2label, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        record = {
            "benchmark": b.name, "title": b.title, "num_classes": b.num_classes,
            "ignore_index": b.prepared_ignore_index, "label_bits": b.label_bits, "splits": splits,
            "raw_dir": str(raw_dir.resolve()), "raw_form": raw_form, "format_version": FORMAT_VERSION,
            "num_examples": {s: len(listed[s]) for s in splits}, "max_examples": max_examples,
        }
        (tmp / PREPARED_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record
