"""Stage 3 of the data path, the split: torch datasets over a source's HF dataset with its vocabulary
(:class:`SegmentationSplit`), seen / held-out classes, a held-out validation part, loaders. Calls only
:mod:`~opentrans_hf.data.transforms` (the last stage: tensors, resizing, collation)."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import torch
from torch.utils.data import Dataset

from opentrans_hf.data.transforms import SegmentationTransform, collate_segmentation, to_label_tensor


class SegmentationSplit(Dataset):
    """An HF dataset seen through a transform and, optionally, a class subset.

    ``class_names`` are the dataset's classes (index = label value). With ``keep_classes`` (a subset of
    names), labels of the other classes become ``ignore_index`` and the kept classes are renumbered
    0..K-1 in the order of ``keep_classes``: training on seen classes only, for zero-shot evaluation on
    the held-out ones. ``self.class_names`` are the names the model must be given for these labels.

    ``origin`` is ``(dataset, split)``; ``name`` (default ``"dataset 'ade' split 'validation'"``) starts
    every error about an example, which also names the example's files when the dataset knows them;
    ``vocabulary`` says, for people, where the class names came from and which label conventions apply.
    ``class_prompts`` (aligned with ``class_names``) is what the model is given per class: the name, or a
    tuple of synonyms (a benchmark's class lists); ``benchmark`` names the benchmark the data is, if any.
    """

    def __init__(self, hf_dataset, image_column: str, label_column: str | None, class_names: list[str],
                 transform: SegmentationTransform, keep_classes: list[str] | None = None, seed: int = 0,
                 origin: tuple[str, str] | None = None, vocabulary: str | None = None, name: str | None = None,
                 class_prompts: list | None = None):
        self.ds = hf_dataset
        self.origin = origin
        self.name = name or (f"dataset {origin[0]!r} split {origin[1]!r}" if origin else "dataset")
        self.vocabulary = vocabulary
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.all_class_names = list(class_names)
        prompts = list(class_prompts) if class_prompts is not None else list(class_names)
        if len(prompts) != len(self.all_class_names):
            raise ValueError(f"class_prompts has {len(prompts)} entries for {len(self.all_class_names)} classes")
        self.benchmark = None
        if keep_classes is None:
            self.class_names = list(class_names)
            self.class_prompts = prompts
            self.lut = None
        else:
            unknown = [c for c in keep_classes if c not in class_names]
            if unknown:
                raise ValueError(f"classes {unknown} are not among the dataset's classes {class_names}")
            self.class_names = list(keep_classes)
            self.class_prompts = [prompts[class_names.index(n)] for n in keep_classes]
            lut = torch.full((max(256, len(class_names)),), transform.ignore_index, dtype=torch.long)
            for new, name in enumerate(keep_classes):
                lut[class_names.index(name)] = new
            self.lut = lut

    def __len__(self) -> int:
        return len(self.ds)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def use_eval_resize(self, resize: str, size: int | None = None, max_size: int | None = None) -> None:
        """Evaluate with another resize from now on: ``"square"`` (image and label ``size x size``; default
        the current size) or ``"shortest_side"`` (the field's protocol: the image's shorter side ``size``,
        default 800, longer side at most ``max_size``, default 1333 (FC-CLIP's / detectron2's test
        resize); the label map keeps its original size and evaluation runs sliding windows). Only
        the transform changes (label conventions, kept classes and checks stay); evaluation splits only."""
        if self.transform.train:
            raise ValueError(f"{self.name}: use_eval_resize is for evaluation splits; this one has the training transform")
        if resize == "shortest_side":
            size = 800 if size is None else int(size)
            max_size = 1333 if max_size is None else int(max_size)
        else:
            size, max_size = (self.transform.size if size is None else int(size)), None
        self.transform = replace(self.transform, resize=resize, size=size, max_size=max_size)

    def __getitem__(self, i: int):
        i = int(i)
        if not -len(self.ds) <= i < len(self.ds):
            raise IndexError(f"{self.name}: example {i} is out of range ({len(self.ds)} examples)")
        try:
            ex = self.ds[i]
        except Exception as err:  # noqa: BLE001 - a file that cannot be decoded: say which
            col = self._unreadable_column(i)
            raise ValueError(f"{self.name}, example {i}{self._files(i, [col] if col else None)}: cannot read its "
                             f"{col or 'data'}: {err}") from err
        # per-example RNG: augmentations depend on (seed, epoch, index) only, so a resumed run and
        # every process see exactly the augmentations an uninterrupted run would
        rng = random.Random(hash((self.seed, self.epoch, i)))
        label = ex[self.label_column] if self.label_column else None
        try:
            x, y = self.transform(ex[self.image_column], label, index=i, rng=rng)
        except ValueError as err:
            text = str(err).removeprefix(f"example {i}: ")
            raise ValueError(f"{self.name}, example {i}{self._files(i)}: {text}") from err
        if y is not None and self.lut is not None:
            y = self._apply_lut(y)
        return x, y

    def _apply_lut(self, y: torch.Tensor) -> torch.Tensor:
        keep = y != self.transform.ignore_index
        return torch.where(keep, self.lut[y.clamp(0, len(self.lut) - 1)], y)

    def _columns(self) -> list[str]:
        return [c for c in (self.image_column, self.label_column) if c]

    def _unreadable_column(self, i: int) -> str | None:
        for col in self._columns():
            try:
                self.ds.select_columns([col])[i]
            except Exception:  # noqa: BLE001
                return col
        return None

    def _files(self, i: int, columns: list[str] | None = None) -> str:
        """`` (image file a.jpg, label file a.png)`` for datasets that know their examples' files."""
        import datasets

        found = []
        for col in columns or self._columns():
            if not isinstance(self.ds.features.get(col), datasets.Image):
                continue
            try:
                raw = self.ds.select_columns([col]).cast_column(col, datasets.Image(decode=False))[i][col]
            except Exception:  # noqa: BLE001 - naming the file is a courtesy; never hide the real error
                continue
            if isinstance(raw, dict) and raw.get("path"):
                what = "label" if col == self.label_column else "image"
                found.append(f"{what} file {raw['path']}")
        return f" ({', '.join(found)})" if found else ""

    def check_labelled(self) -> None:
        """Raise unless some example has a pixel that is not ignored (after the dataset's void value,
        ``reduce_labels`` and the held-out classes): a split with nothing to learn or score is an error
        before training, not a NaN mIoU after it. Stops at the first labelled example (usually the first)."""
        if self.label_column is None:
            return
        if len(self.ds) == 0:
            raise ValueError(f"{self.name} has no examples")
        labels = self.ds.select_columns([self.label_column])
        ignore = self.transform.ignore_index
        for i in range(len(labels)):
            try:
                y = self.transform.convert_labels(to_label_tensor(labels[i][self.label_column]))
            except Exception as err:  # noqa: BLE001
                raise ValueError(f"{self.name}, example {i}{self._files(i, [self.label_column])}: cannot read its "
                                 f"label map: {err}") from err
            if self.lut is not None:
                y = self._apply_lut(y)
            if bool((y != ignore).any()):
                return
        rules = [f"ignore value {self.transform.label_ignore_index}" if self.transform.label_ignore_index is not None
                 else f"ignore value {ignore}"]
        if self.transform.reduce_labels:
            rules.append("reduce_labels (0 is ignored)")
        if self.lut is not None:
            rules.append(f"only the classes {self.class_names} kept")
        raise ValueError(f"{self.name}: every pixel of its {len(labels)} examples is ignored ({', '.join(rules)}): nothing "
                         "to train on or score; check --reduce_labels / ignore_index / --holdout_classes")


def make_loader(split: SegmentationSplit, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0):
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        split, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None,
        collate_fn=collate_segmentation, num_workers=num_workers, drop_last=False,
    )


def make_split(source: dict, image_size: int, *, train: bool = False, reduce_labels: bool = False,
               ignore_index: int | None = None, keep_classes=None, seed: int = 0) -> SegmentationSplit:
    """A :class:`SegmentationSplit` of a source (the dict :func:`~opentrans_hf.data.assembly.load_source`
    returns: dataset, columns, names, conventions) with the training or evaluation transform;
    ``ignore_index`` is the dataset's value for unlabelled pixels (default: the source's convention, else
    255), ``reduce_labels`` applies if asked or if the source's convention says so. Checked to have a
    labelled pixel (an error, not a NaN mIoU later)."""
    names = source["names"]
    reduce_labels = bool(reduce_labels or source.get("reduce_labels", False))
    if ignore_index is None:
        ignore_index = source.get("ignore_index")
    if ignore_index is not None and not (isinstance(ignore_index, int) and not isinstance(ignore_index, bool)
                                         and ignore_index >= 0):
        raise ValueError(f"dataset {source.get('dataset', '?')!r} split {source.get('split', '?')!r}: ignore_index "
                         f"{ignore_index!r} is no label value (an integer >= 0)")
    void = None if ignore_index is None or ignore_index == SegmentationTransform.ignore_index else int(ignore_index)
    tf = SegmentationTransform(image_size, train=train, reduce_labels=reduce_labels, num_labels=len(names),
                               label_ignore_index=void)
    if keep_classes is not None and list(keep_classes) == names:
        keep_classes = None
    conventions = [source.get("vocabulary") or "class names given"]
    if reduce_labels:
        conventions.append("reduce_labels")
    if void is not None:
        conventions.append(f"ignore {void}")
    split = SegmentationSplit(source["ds"], source["image_column"], source["label_column"], names, tf,
                              keep_classes=keep_classes, seed=seed,
                              origin=(source.get("dataset", "?"), source.get("split", "?")),
                              vocabulary=", ".join(conventions), class_prompts=source.get("prompts"))
    split.benchmark = source.get("benchmark")
    split.check_labelled()
    return split


def hold_out(source: dict, percentage: float, seed: int = 0) -> tuple[dict, dict]:
    """Split a source (a dict with ``ds``, ``dataset`` and ``split``) into (training part, held-out part):
    a fixed ``percentage`` of its examples, chosen by ``seed`` (the same on every run and process),
    disjoint from the rest.

    The choice is ``datasets``' ``train_test_split(test_size=k, shuffle=True, seed=seed)`` (a numpy
    ``default_rng(seed)`` permutation: its first k examples are held out), made here so that it works on
    every dataset a job loads: one in memory, a ``save_to_disk`` directory (which may be read-only) or a
    Hub-shaped parquet copy (backed by cache files). Both parts are index mappings kept in memory: nothing
    is written beside the data."""
    ds = source["ds"]
    n = len(ds)
    if not (isinstance(percentage, (int, float)) and not isinstance(percentage, bool)
            and math.isfinite(percentage) and 0 < percentage < 100):
        raise ValueError(f"dataset {source['dataset']!r} split {source['split']!r}: the held-out percentage must be "
                         f"a number between 0 and 100 (exclusive), got {percentage!r}")
    k = round(n * percentage / 100)
    if k < 1 or k >= n:
        raise ValueError(f"dataset {source['dataset']!r} split {source['split']!r} has {n} example(s): holding out "
                         f"{percentage:g}% of it leaves {'no held-out' if k < 1 else 'no training'} example; "
                         "both parts need at least one")
    permutation = np.random.default_rng(seed).permutation(n)
    held_ids, train_ids = permutation[:k].tolist(), permutation[k:].tolist()
    held = f"{source['split']}[{percentage:g}% held out]"
    return (dict(source, ds=ds.select(train_ids, keep_in_memory=True)),
            dict(source, ds=ds.select(held_ids, keep_in_memory=True), split=held))


def held_out_classes(names: list[str], requested, default: list[str], dataset: str) -> tuple[list[str], list[str]]:
    """``(held-out classes, seen classes)`` of a dataset with the classes ``names``: the ``requested`` ones
    (``--holdout_classes``; ``["none"]``: none), else the dataset's ``default``. An unknown class is an
    error naming it, and so is holding out every class."""
    holdout = list(requested) if requested is not None else list(default)
    if [c.lower() for c in holdout] == ["none"]:
        holdout = []
    unknown = [c for c in holdout if c not in names]
    if unknown:
        raise ValueError(f"--holdout_classes {unknown} are not classes of {dataset!r} ({names})")
    seen = [c for c in names if c not in holdout]
    if not seen:
        raise ValueError(f"all classes {names} are held out: nothing to train on")
    return holdout, seen
