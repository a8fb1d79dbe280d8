"""The one entry point of the data path: the training and evaluation splits of a run, and the splits
pruning distils on. It composes the stages, each of which calls only the ones below it:

1. :mod:`~opentrans_hf.data.sources`: the raw dataset of a name and split (``'embedded'``, a benchmark
   name or Hub id, a ``save_to_disk`` directory, an image/label folder), what it is, its label
   conventions and columns;
2. :mod:`~opentrans_hf.data.vocabulary`: its class names (with a benchmark's synonyms) and where they
   came from;
3. :mod:`~opentrans_hf.data.splits`: held-out classes, a held-out validation part, the torch dataset;
4. :mod:`~opentrans_hf.data.transforms`: tensors, resizing, augmentation, collation.

:mod:`~opentrans_hf.data.specs` parses the evaluation datasets' specs (``NAME[:SPLIT]`` or a JSON file)."""

from __future__ import annotations

from pathlib import Path

from opentrans_hf.data.sources import (
    EMBEDDED,
    default_columns,
    default_held_out,
    find_columns,
    find_label_map_columns,
    identify_source,
    label_conventions,
    load_raw_dataset,
)
from opentrans_hf.data.specs import parse_dataset_spec
from opentrans_hf.data.splits import SegmentationSplit, held_out_classes, hold_out, make_loader, make_split
from opentrans_hf.data.transforms import SegmentationTransform
from opentrans_hf.data.vocabulary import check_no_explicit_names, own_vocabulary, resolve_vocabulary

__all__ = ["CLI_FLAGS", "EMBEDDED", "add_eval_split", "distillation_split", "hold_out", "load_eval_splits",
           "load_source", "load_spec_split", "load_split", "load_training_data", "make_loader", "make_split"]

CLI_FLAGS = ("--class_names", "--id2label", "--vocabulary")


def load_source(name: str, split: str, image_size: int, *, seed: int = 0, embedded_size: int = 192,
                class_names=None, id2label=None, vocabulary=None, image_column=None, label_column=None,
                benchmark: str | None = None, flags: tuple[str, str, str] = CLI_FLAGS) -> dict:
    """One split of a dataset (``'embedded'``, a benchmark name, Hub name, ``save_to_disk`` dir or
    image/label folder): the HF dataset, its class names (see :mod:`~opentrans_hf.data.vocabulary`: an
    explicit source, else the dataset's own ``benchmark.json`` / ``id2label.json`` / label-column
    ``ClassLabel``, never a guess), what the model is given per class (``prompts``: synonyms), where the
    names came from, its columns, its default held-out classes and its label conventions
    (``reduce_labels``, ``ignore_index``: a benchmark's raw ones, a prepared benchmark's, else none).

    ``benchmark``: the data is this benchmark (:mod:`opentrans_hf.data.benchmarks`) in its raw form (a
    benchmark name as ``name`` implies it): its names and conventions apply. A directory written by
    ``prepare-dataset`` carries its benchmark in its ``benchmark.json``. ``flags`` name the explicit
    sources in messages."""
    what = f"dataset {name!r} split {split!r}"
    found = identify_source(name, split, benchmark)
    check_no_explicit_names(found, what, flags, class_names, id2label, vocabulary)
    ds = load_raw_dataset(name, split, image_size=image_size, seed=seed, embedded_size=embedded_size)
    own, searched = own_vocabulary(found)
    image_column, label_column = default_columns(found, image_column, label_column)
    img_col, lab_col = find_label_map_columns(ds, image_column, label_column, what)
    vocab = resolve_vocabulary(ds, label_column=lab_col, class_names=class_names, id2label=id2label,
                               vocabulary=vocabulary, own=own, what=what, flags=flags, searched=searched)
    return {"ds": ds, "names": list(vocab.names), "prompts": vocab.class_prompts, "vocabulary": vocab.source,
            "image_column": img_col, "label_column": lab_col, "holdout": default_held_out(found), "dataset": name,
            "split": split, "benchmark": found.benchmark, **label_conventions(found)}


def load_split(name: str, split: str, image_size: int, *, seed: int = 0, embedded_size: int = 192,
               reduce_labels: bool = False, ignore_index: int | None = None, **source_kwargs):
    """An evaluation :class:`SegmentationSplit` of one dataset split (:func:`load_source` + :func:`make_split`)."""
    source = load_source(name, split, image_size, seed=seed, embedded_size=embedded_size, **source_kwargs)
    return make_split(source, image_size, reduce_labels=reduce_labels, ignore_index=ignore_index, seed=seed)


def load_spec_split(spec, image_size: int, *, seed: int = 0, embedded_size: int = 192):
    """The evaluation :class:`SegmentationSplit` a :class:`~opentrans_hf.data.specs.DatasetSpec` describes,
    with its own class names, ``reduce_labels``, ignore value and columns."""
    if spec.is_file:
        where = Path(spec.origin).name
        flags = tuple(f"{key} in {where}" for key in ("class_names", "id2label", "vocabulary"))
    else:
        flags = CLI_FLAGS
    source = load_source(spec.dataset, spec.split, image_size, seed=seed, embedded_size=embedded_size,
                         flags=flags, **spec.label_options)
    return make_split(source, image_size, reduce_labels=spec.reduce_labels, ignore_index=spec.ignore_index, seed=seed)


def add_eval_split(splits: dict, name: str, split) -> None:
    """``splits[name] = split``; the same row name twice is an error (one would overwrite the other)."""
    if name in splits:
        raise ValueError(f"evaluation dataset {name!r} is given twice; give each its own row name (\"name\" in a "
                         "dataset spec file)")
    splits[name] = split


def load_eval_splits(specs, image_size: int, *, seed: int = 0, embedded_size: int = 192, splits: dict | None = None) -> dict:
    """``{row name: SegmentationSplit}`` for several :class:`~opentrans_hf.data.specs.DatasetSpec` (added
    to ``splits`` if given)."""
    splits = {} if splits is None else splits
    for spec in specs:
        add_eval_split(splits, spec.row_name, load_spec_split(spec, image_size, seed=seed, embedded_size=embedded_size))
    return splits


def load_training_data(args, image_size: int):
    """(train split on the seen classes, {name: eval split}, held-out classes).

    ``args`` (the train job's arguments): ``--class_names`` / ``--id2label`` / ``--reduce_labels`` /
    ``--ignore_index`` / columns describe ``--dataset`` only, for its training split and its evaluation
    split (``--eval_split``, or with ``--validation_split_percentage`` a held-out part of the training
    split). Every ``--eval_datasets`` entry is a dataset spec of its own."""
    common = dict(seed=args.seed, embedded_size=args.embedded_size)
    options = dict(class_names=args.class_names, id2label=args.id2label, image_column=args.image_column,
                   label_column=args.label_column, benchmark=getattr(args, "benchmark", None))
    labels = dict(reduce_labels=args.reduce_labels, ignore_index=getattr(args, "ignore_index", None))
    source = load_source(args.dataset, args.train_split, image_size, **common, **options)
    percentage = getattr(args, "validation_split_percentage", None)
    if percentage:
        source, eval_source = hold_out(source, percentage, seed=args.seed)
    else:
        eval_source = load_source(args.dataset, getattr(args, "eval_split", None) or "validation", image_size,
                                  **common, **options)
    holdout, seen = held_out_classes(source["names"], args.holdout_classes, source["holdout"], args.dataset)
    train = make_split(source, image_size, train=True, keep_classes=seen, seed=args.seed, **labels)
    evals = {f"{args.dataset}:{eval_source['split']}": make_split(eval_source, image_size, seed=args.seed, **labels)}
    specs = [parse_dataset_spec(spec) for spec in args.eval_datasets]
    load_eval_splits(specs, image_size, splits=evals, **common)
    return train, evals, holdout


def distillation_split(name: str, split: str, image_size: int, *, seed: int = 0, embedded_size: int = 192,
                       image_column=None, label_column=None, with_labels: bool = True,
                       validation_split_percentage: float | None = None):
    """The images (and, if the dataset has them and ``with_labels``, the label maps, as regions) that
    pruning distils on: no class names are needed, since IMP is semantic-agnostic. With
    ``validation_split_percentage``, the part :func:`hold_out` keeps for evaluation (same ``seed``) is
    left out here too, so no evaluation image is seen while pruning."""
    ds = load_raw_dataset(name, split, image_size=image_size, seed=seed, embedded_size=embedded_size)
    if validation_split_percentage is not None:
        ds = hold_out({"ds": ds, "dataset": name, "split": split}, validation_split_percentage, seed)[0]["ds"]
    img_col, lab_col = find_columns(ds, image_column, label_column)
    return SegmentationSplit(ds, img_col, lab_col if with_labels else None, class_names=[],
                             transform=SegmentationTransform(image_size, train=True), seed=seed,
                             origin=(name, split))
