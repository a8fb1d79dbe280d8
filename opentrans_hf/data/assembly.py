"""Dataset assembly for the jobs: one split of a dataset with its class names and columns, seen /
held-out class splits, the training and evaluation splits of a run."""

from __future__ import annotations

from pathlib import Path

from opentrans_hf.data.benchmarks import get_benchmark
from opentrans_hf.data.sources import find_columns, find_id2label, find_prepared_record, load_segmentation_dataset
from opentrans_hf.data.specs import benchmark_name, parse_dataset_spec
from opentrans_hf.data.splits import SegmentationSplit
from opentrans_hf.data.transforms import SegmentationTransform
from opentrans_hf.data.vocabulary import Vocabulary, benchmark_vocabulary, resolve_vocabulary
from opentrans_hf.embedded import dataset as synthetic
from opentrans_hf.embedded.dataset import embedded_dataset

EMBEDDED = "embedded"
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
    searched = ""
    conventions = {}
    if benchmark is not None:
        benchmark = get_benchmark(benchmark).name
    else:
        benchmark = benchmark_name(name) if name != EMBEDDED else None
    record, record_file = find_prepared_record(name) if name != EMBEDDED else (None, None)
    if record is not None:
        if benchmark is not None and benchmark != record["benchmark"]:
            raise ValueError(f"{what}: it was prepared as benchmark {record['benchmark']!r} ({record_file}), not "
                             f"{benchmark!r}")
        benchmark = record["benchmark"]
    if benchmark is not None and (class_names or id2label or vocabulary):
        raise ValueError(f"{what} is benchmark {benchmark!r}, which brings its own class names: give "
                         f"{' / '.join(f for f, v in zip(flags, (class_names, id2label, vocabulary)) if v)} only for other data")
    if name == EMBEDDED:
        ds = synthetic.embedded_dataset(split, num_train=embedded_size, image_size=image_size, seed=seed)
        own = Vocabulary(tuple(synthetic.CLASS_NAMES), "embedded dataset's classes")
        holdout = list(synthetic.HELD_OUT_CLASSES)
    else:
        ds = load_segmentation_dataset(name, split)
        holdout = []
        if record is not None:
            own = benchmark_vocabulary(benchmark, f"prepared: {record_file}")
            conventions = {"reduce_labels": False, "ignore_index": int(record.get("ignore_index", 255))}
        elif benchmark is not None:
            bench = get_benchmark(benchmark)
            own = benchmark_vocabulary(benchmark, "raw labels")
            conventions = {"reduce_labels": bench.raw_reduce_labels, "ignore_index": bench.raw_ignore_index}
            if bench.hub is not None and not Path(name).exists():
                image_column = image_column or bench.hub.image_column
                label_column = label_column or bench.hub.label_column
        else:
            own, searched = find_id2label(name)
    img_col, lab_col = find_columns(ds, image_column, label_column)
    if lab_col is None:
        raise ValueError(f"{what} has no label column (columns: {ds.column_names}); name it with --label_column "
                         "(or \"label_column\" in a dataset spec)")
    vocab = resolve_vocabulary(ds, label_column=lab_col, class_names=class_names, id2label=id2label,
                               vocabulary=vocabulary, own=own, what=what, flags=flags, searched=searched)
    return {"ds": ds, "names": list(vocab.names), "prompts": vocab.class_prompts, "vocabulary": vocab.source,
            "image_column": img_col, "label_column": lab_col, "holdout": holdout, "dataset": name, "split": split,
            "benchmark": benchmark, **conventions}


def make_split(source: dict, image_size: int, *, train: bool = False, reduce_labels: bool = False,
               ignore_index: int | None = None, keep_classes=None, seed: int = 0):
    """A :class:`SegmentationSplit` of a :func:`load_source` result with the training or evaluation
    transform; ``ignore_index`` is the dataset's value for unlabelled pixels (default: the source's
    convention, else 255), ``reduce_labels`` applies if asked or if the source's convention says so.
    Checked to have a labelled pixel (an error, not a NaN mIoU later)."""
    names = source["names"]
    reduce_labels = bool(reduce_labels or source.get("reduce_labels", False))
    if ignore_index is None:
        ignore_index = source.get("ignore_index")
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


def hold_out(source: dict, percentage: float, seed: int = 0) -> tuple[dict, dict]:
    """Split a :func:`load_source` result into (training part, held-out part): a fixed ``percentage`` of
    its examples, chosen by ``seed`` (the same on every run and process), disjoint from the rest."""
    ds = source["ds"]
    n = len(ds)
    k = round(n * percentage / 100)
    if k < 1 or k >= n:
        raise ValueError(f"dataset {source['dataset']!r} split {source['split']!r} has {n} example(s): holding out "
                         f"{percentage:g}% of it leaves {'no held-out' if k < 1 else 'no training'} example; "
                         "both parts need at least one")
    parts = ds.train_test_split(test_size=k, shuffle=True, seed=seed, keep_in_memory=True)
    held = f"{source['split']}[{percentage:g}% held out]"
    return dict(source, ds=parts["train"]), dict(source, ds=parts["test"], split=held)


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
    if name == EMBEDDED:
        ds = embedded_dataset(split, embedded_size, image_size, seed)
    else:
        ds = load_segmentation_dataset(name, split)
    if validation_split_percentage is not None:
        ds = hold_out({"ds": ds, "dataset": name, "split": split}, validation_split_percentage, seed)[0]["ds"]
    img_col, lab_col = find_columns(ds, image_column, label_column)
    return SegmentationSplit(ds, img_col, lab_col if with_labels else None, class_names=[],
                             transform=SegmentationTransform(image_size, train=True), seed=seed,
                             origin=(name, split))
