"""Dataset assembly for the jobs: one split of a dataset with its class names and columns, seen /
held-out class splits, the training and evaluation splits of a run."""

from __future__ import annotations

from pathlib import Path

EMBEDDED = "embedded"


def load_source(name: str, split: str, image_size: int, *, seed: int = 0, embedded_size: int = 192,
                class_names=None, id2label=None, image_column=None, label_column=None) -> dict:
    """One split of a dataset (``'embedded'``, Hub name, ``save_to_disk`` dir or image/label folder):
    the HF dataset, its class names and columns, and its default held-out classes."""
    from .loading import find_columns, load_segmentation_dataset, resolve_class_names

    if name == EMBEDDED:
        from . import synthetic

        ds = synthetic.embedded_dataset(split, num_train=embedded_size, image_size=image_size, seed=seed)
        names = resolve_class_names(ds)
        holdout = list(synthetic.HELD_OUT_CLASSES)
    else:
        ds = load_segmentation_dataset(name, split)
        names = resolve_class_names(ds, class_names=class_names, id2label=id2label)
        holdout = []
    img_col, lab_col = find_columns(ds, image_column, label_column)
    if lab_col is None:
        raise ValueError(f"dataset {name!r} split {split!r} has no label column (columns: {ds.column_names})")
    return {"ds": ds, "names": names, "image_column": img_col, "label_column": lab_col, "holdout": holdout}


def make_split(source: dict, image_size: int, *, train: bool = False, reduce_labels: bool = False,
               keep_classes=None, seed: int = 0):
    """A :class:`SegmentationSplit` of a :func:`load_source` result with the training or evaluation transform."""
    from .transforms import SegmentationTransform
    from .splits import SegmentationSplit

    names = source["names"]
    tf = SegmentationTransform(image_size, train=train, reduce_labels=reduce_labels, num_labels=len(names))
    if keep_classes is not None and list(keep_classes) == names:
        keep_classes = None
    return SegmentationSplit(source["ds"], source["image_column"], source["label_column"], names, tf,
                             keep_classes=keep_classes, seed=seed)


def load_split(name: str, split: str, image_size: int, *, seed: int = 0, embedded_size: int = 192,
               reduce_labels: bool = False, **source_kwargs):
    """An evaluation :class:`SegmentationSplit` of one dataset split (:func:`load_source` + :func:`make_split`)."""
    source = load_source(name, split, image_size, seed=seed, embedded_size=embedded_size, **source_kwargs)
    return make_split(source, image_size, reduce_labels=reduce_labels, seed=seed)


def parse_split_spec(spec: str, default_split: str = "validation") -> tuple[str, str]:
    """``NAME[:SPLIT]`` (a local path may itself contain ':' only if it exists as given)."""
    if Path(spec).exists() or ":" not in spec:
        return spec, default_split
    name, _, split = spec.rpartition(":")
    return name, split or default_split


def load_training_data(args, image_size: int):
    """(train split on the seen classes, {name: eval split}, held-out classes)."""
    common = dict(seed=args.seed, embedded_size=args.embedded_size, class_names=args.class_names,
                  id2label=args.id2label, image_column=args.image_column, label_column=args.label_column)
    source = load_source(args.dataset, args.train_split, image_size, **common)
    names = source["names"]
    holdout = list(args.holdout_classes) if args.holdout_classes is not None else source["holdout"]
    if [c.lower() for c in holdout] == ["none"]:
        holdout = []
    unknown = [c for c in holdout if c not in names]
    if unknown:
        raise ValueError(f"--holdout_classes {unknown} are not classes of {args.dataset!r} ({names})")
    seen = [c for c in names if c not in holdout]
    if not seen:
        raise ValueError(f"all classes {names} are held out: nothing to train on")
    train = make_split(source, image_size, train=True, reduce_labels=args.reduce_labels, keep_classes=seen,
                       seed=args.seed)
    evals = {f"{args.dataset}:{args.eval_split}": load_split(args.dataset, args.eval_split, image_size,
                                                             reduce_labels=args.reduce_labels, **common)}
    for spec in args.eval_datasets:
        name, split = parse_split_spec(spec)
        evals[f"{name}:{split}"] = load_split(name, split, image_size, seed=args.seed, embedded_size=args.embedded_size)
    return train, evals, holdout




def distillation_split(name: str, split: str, image_size: int, *, seed: int = 0, embedded_size: int = 192,
                       image_column=None, label_column=None, with_labels: bool = True):
    """The images (and, if the dataset has them and ``with_labels``, the label maps, as regions) that
    pruning distils on: no class names are needed, since IMP is semantic-agnostic."""
    from .loading import find_columns, load_segmentation_dataset
    from .splits import SegmentationSplit
    from .synthetic import embedded_dataset
    from .transforms import SegmentationTransform

    if name == EMBEDDED:
        ds = embedded_dataset(split, embedded_size, image_size, seed)
    else:
        ds = load_segmentation_dataset(name, split)
    img_col, lab_col = find_columns(ds, image_column, label_column)
    return SegmentationSplit(ds, img_col, lab_col if with_labels else None, class_names=[],
                             transform=SegmentationTransform(image_size, train=True), seed=seed)
