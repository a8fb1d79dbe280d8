"""The field's open-vocabulary segmentation benchmarks: class lists with synonyms, label conventions,
Hub ids, evaluation resolution.

Class lists are the ones the field's evaluation code scores with (FC-CLIP's and OpenSeg's lists: one
line per class, several comma-separated names, the first being the usual name), so numbers computed
with them compare with published ones. Each list ships in ``classes/<name>.txt``, one class per line in
label order, as ``RAW_ID:name,synonym,...`` where ``RAW_ID`` is the value the class has in the
benchmark's official release (the ADE20K challenge's 1..150, the full ADE20K index, Pascal Context's
459 label ids, COCO category ids, Cityscapes labelIds), which is what ``prepare-dataset`` converts from.

Two label conventions matter:

* ``raw``: the labels as the Hub dataset (or the official release) stores them: e.g. ADE20K-150's
  ``0 = other`` (``reduce_labels``), VOC's 255 boundary pixels;
* ``prepared``: what ``opentrans-hf prepare-dataset`` writes: label ``i`` is class ``i``, everything
  else the ignore value (255 in 8-bit PNGs; 65535 in 16-bit PNGs for ADE20K-847 and Pascal
  Context-459, which have more than 255 classes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

CLASSES_DIR = Path(__file__).parent / "classes"


@dataclass(frozen=True)
class HubSource:
    """Where a benchmark loads from on the Hugging Face Hub, and in which form."""

    repo_id: str
    revision: str | None = None
    """e.g. ``refs/convert/parquet`` for datasets whose loading script today's ``datasets`` no longer runs."""
    data_dir: str | None = None
    """a sub-folder of the repo (the configuration of a parquet conversion)."""
    image_column: str = "image"
    label_column: str = "label"
    splits: dict = field(default_factory=dict)
    """``{"train": ..., "validation": ...}``: the Hub split names (default: the same)."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its classes (label order, synonyms), label conventions and sources."""

    name: str
    title: str
    raw_ids: tuple[int, ...]
    synonyms: tuple[tuple[str, ...], ...]
    label_bits: int = 8
    raw_reduce_labels: bool = False
    raw_ignore_index: int = 255
    hub: HubSource | None = None
    eval_split: str = "validation"
    shortest_side: int = 800
    max_size: int = 1333
    role: str = "evaluation"
    raw_layout: str = ""
    notes: str = ""

    def __len__(self) -> int:
        return len(self.synonyms)

    @property
    def num_classes(self) -> int:
        return len(self.synonyms)

    @property
    def class_names(self) -> list[str]:
        """One name per class (label order): the first synonym, or, where several classes share a first
        name (ADE20K-847's two "bag"s), all of its names joined by ", ", so that names are unique."""
        firsts = [s[0] for s in self.synonyms]
        return [s[0] if firsts.count(s[0]) == 1 else ", ".join(s) for s in self.synonyms]

    @property
    def class_prompts(self) -> list[tuple[str, ...]]:
        """The names the classifier scores each class with (all its synonyms)."""
        return [tuple(s) for s in self.synonyms]

    @property
    def prepared_ignore_index(self) -> int:
        """The ignore value of a prepared dataset: 255 (8-bit labels) or 65535 (16-bit)."""
        return 65535 if self.label_bits == 16 else 255

    def describe(self) -> str:
        """One line for ``opentrans-hf benchmarks``."""
        hub = (f"Hub {self.hub.repo_id}" + (f"@{self.hub.revision}" if self.hub.revision else "")) if self.hub else "no Hub copy"
        raw = []
        if self.raw_reduce_labels:
            raw.append("reduce_labels")
        raw.append(f"ignore {self.raw_ignore_index}")
        return (f"{self.name:<17} {self.title:<22} {self.num_classes:>4} classes  {self.label_bits:>2}-bit labels  "
                f"raw: {', '.join(raw):<26} eval: shortest side {self.shortest_side}, {hub}")


def read_class_file(path: Path) -> tuple[tuple[int, ...], tuple[tuple[str, ...], ...]]:
    """``(raw ids, synonyms)`` of a ``RAW_ID:name,synonym,...`` class file (duplicate synonyms of one
    class dropped, order kept)."""
    ids, names = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        raw, sep, rest = line.partition(":")
        if not sep or not raw.strip().isdigit() or not rest.strip():
            raise ValueError(f"{path}, line {n}: expected 'RAW_ID:name,synonym,...', got {line!r}")
        syn = tuple(dict.fromkeys(s.strip() for s in rest.split(",") if s.strip()))
        ids.append(int(raw))
        names.append(syn)
    return tuple(ids), tuple(names)


def _entry(name: str, title: str, **kwargs) -> Benchmark:
    ids, synonyms = read_class_file(CLASSES_DIR / f"{name}.txt")
    return Benchmark(name=name, title=title, raw_ids=ids, synonyms=synonyms, **kwargs)


PASCAL_CONTEXT_LAYOUT = ("VOCdevkit/VOC2010/JPEGImages/*.jpg, VOCdevkit/VOC2010/ImageSets/Main/{train,val}.txt, "
                         "trainval/*.mat (Pascal Context's 459-label LabelMap; also VOCdevkit/VOC2010/trainval/)")
VOC_LAYOUT = ("VOCdevkit/VOC2012/JPEGImages/*.jpg, VOCdevkit/VOC2012/SegmentationClass/*.png, "
              "VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt")


@lru_cache(maxsize=None)
def _registry() -> dict[str, Benchmark]:
    entries = [
        _entry("coco_panoptic133", "COCO-Panoptic-133", role="training",
               raw_layout="coco/{val2017,train2017}/*.jpg, coco/annotations/panoptic_{val2017,train2017}.json, "
                          "coco/panoptic_{val2017,train2017}/*.png",
               notes="things and stuff of COCO panoptic as semantic classes: FC-CLIP-style training vocabulary"),
        _entry("coco_stuff171", "COCO-Stuff-171",
               raw_layout="coco/{val2017,train2017}/*.jpg, coco/stuffthingmaps_trainval2017/{val2017,train2017}/*.png "
                          "(value = COCO category id - 1, 255 unlabelled)"),
        _entry("ade150", "ADE20K-150", raw_reduce_labels=True,
               hub=HubSource("scene_parse_150", revision="refs/convert/parquet", data_dir="scene_parsing",
                             image_column="image", label_column="annotation"),
               raw_layout="ADEChallengeData2016/images/{training,validation}/*.jpg, "
                          "ADEChallengeData2016/annotations/{training,validation}/*.png (0 = other)",
               notes="the Hub copy loads only through its parquet conversion (its loading script no longer runs "
                     "with today's datasets); its label 0 is 'other' (reduce_labels)"),
        _entry("ade847", "ADE20K-847", label_bits=16, raw_ignore_index=65535,
               raw_layout="ADE20K_2021_17_01/images/ADE/{training,validation}/**/ADE_*.jpg with *_seg.png beside "
                          "each (class = R / 10 * 256 + G, the full ADE20K index)",
               notes="images with a shorter side over 512 are resized to 512, as the field's preparation does"),
        _entry("pc59", "Pascal Context-59",
               raw_layout=PASCAL_CONTEXT_LAYOUT,
               notes="the 59 frequent classes; every other label is ignored"),
        _entry("pc459", "Pascal Context-459", label_bits=16, raw_ignore_index=65535,
               raw_layout=PASCAL_CONTEXT_LAYOUT, notes="all 459 labels"),
        _entry("voc20", "Pascal VOC-20", raw_reduce_labels=True,
               raw_layout=VOC_LAYOUT,
               notes="background ignored"),
        _entry("voc21", "Pascal VOC-21", raw_layout=VOC_LAYOUT, notes="background is a class (with many synonyms)"),
        _entry("cityscapes19", "Cityscapes-19", shortest_side=1024, max_size=2560,
               raw_layout="leftImg8bit/{train,val}/<city>/*_leftImg8bit.png, "
                          "gtFine/{train,val}/<city>/*_gtFine_labelIds.png (labelIds -> the 19 trainIds)"),
    ]
    return {b.name: b for b in entries}


BENCHMARK_NAMES: tuple[str, ...] = ("coco_panoptic133", "coco_stuff171", "ade150", "ade847", "pc59", "pc459",
                                    "voc20", "voc21", "cityscapes19")


def list_benchmarks() -> list[Benchmark]:
    """Every registered benchmark, training vocabulary first."""
    reg = _registry()
    return [reg[n] for n in BENCHMARK_NAMES]


def _key(name) -> str:
    return "".join(c for c in str(name).lower() if c.isalnum())


@lru_cache(maxsize=None)
def _lookup() -> dict[str, str]:
    """Normalised names and titles (``ade150``, ``ade20k150``, ``pascalcontext59``, ...) -> name."""
    return {k: b.name for b in _registry().values() for k in (_key(b.name), _key(b.title))}


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called ``name`` (its name or title, case, dashes and spaces ignored: ``ade150``,
    ``ADE20K-150``); an unknown name is an error listing them."""
    found = _lookup().get(_key(name))
    if found is None:
        raise ValueError(f"unknown benchmark {name!r}; the benchmarks are {', '.join(BENCHMARK_NAMES)} "
                         "(opentrans-hf benchmarks lists them)")
    return _registry()[found]


def is_benchmark(name: str) -> bool:
    return _key(name) in _lookup()


PREPARED_RECORD = "benchmark.json"
"""The file ``prepare-dataset`` writes beside a prepared benchmark (``save_to_disk`` directory):
``{"benchmark": NAME, "title": ..., "num_classes": K, "ignore_index": 255 | 65535, "label_bits": 8 | 16,
"splits": [...], "raw_dir": ..., "format_version": 1}``; with it, evaluation finds the class names (with
synonyms) and the ignore value without flags. An ``id2label.json`` with the class names is written too."""
