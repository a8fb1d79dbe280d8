"""Torch datasets over HF segmentation datasets: transforms, seen/held-out class splits, loaders."""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from .transforms import SegmentationTransform, collate_segmentation


class SegmentationSplit(Dataset):
    """An HF dataset seen through a transform and, optionally, a class subset.

    ``class_names`` are the dataset's classes (index = label value). With ``keep_classes`` (a subset of
    names), labels of the other classes become ``ignore_index`` and the kept classes are renumbered
    0..K-1 in the order of ``keep_classes``: training on seen classes only, for zero-shot evaluation on
    the held-out ones. ``self.class_names`` are the names the model must be given for these labels.
    """

    def __init__(self, hf_dataset, image_column: str, label_column: str | None, class_names: list[str],
                 transform: SegmentationTransform, keep_classes: list[str] | None = None, seed: int = 0):
        self.ds = hf_dataset
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.all_class_names = list(class_names)
        if keep_classes is None:
            self.class_names = list(class_names)
            self.lut = None
        else:
            unknown = [c for c in keep_classes if c not in class_names]
            if unknown:
                raise ValueError(f"classes {unknown} are not among the dataset's classes {class_names}")
            self.class_names = list(keep_classes)
            lut = torch.full((max(256, len(class_names)),), transform.ignore_index, dtype=torch.long)
            for new, name in enumerate(keep_classes):
                lut[class_names.index(name)] = new
            self.lut = lut

    def __len__(self) -> int:
        return len(self.ds)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        ex = self.ds[int(i)]
        # per-example RNG: augmentations depend on (seed, epoch, index) only, so a resumed run and
        # every process see exactly the augmentations an uninterrupted run would
        rng = random.Random(hash((self.seed, self.epoch, int(i))))
        label = ex[self.label_column] if self.label_column else None
        x, y = self.transform(ex[self.image_column], label, index=int(i), rng=rng)
        if y is not None and self.lut is not None:
            keep = y != self.transform.ignore_index
            y = torch.where(keep, self.lut[y.clamp(0, len(self.lut) - 1)], y)
        return x, y


def make_loader(split: SegmentationSplit, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0):
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        split, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None,
        collate_fn=collate_segmentation, num_workers=num_workers, drop_last=False,
    )
