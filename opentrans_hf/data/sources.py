"""Stage 1 of the data path, the source: the raw dataset a name and a split stand for (``'embedded'``, a
benchmark name or Hub id, a local copy of a Hub dataset repo, a ``save_to_disk`` directory, an image/label
folder), what it is (a benchmark, raw (its Hub copy, or a local copy of it) or prepared by
``opentrans-hf prepare-dataset``), its label conventions, its default held-out classes and its image and
label columns.

The data path runs one way: sources -> :mod:`~opentrans_hf.data.vocabulary` (class names) ->
:mod:`~opentrans_hf.data.splits` (held-out classes, validation part) -> :mod:`~opentrans_hf.data.transforms`,
composed by :mod:`~opentrans_hf.data.assembly`. This module calls only :mod:`~opentrans_hf.data.benchmarks`
(and the embedded dataset)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from opentrans_hf.data.benchmarks import get_benchmark, is_benchmark, list_benchmarks
from opentrans_hf.data.benchmarks.hub_copy import hub_copy_benchmark, is_hub_copy, load_hub_copy, open_hub_copy
from opentrans_hf.data.benchmarks.registry import PREPARED_RECORD
from opentrans_hf.embedded.dataset import HELD_OUT_CLASSES, embedded_dataset
from opentrans_hf.utils.hub import load_or_explain
from opentrans_hf.utils.io import is_integer, read_json

EMBEDDED = "embedded"
IMAGE_COLUMNS = ("image", "pixel_values", "img")
LABEL_COLUMNS = ("label", "annotation", "semantic_segmentation", "segmentation", "mask", "labels")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


SPLIT_HINT = ("(train / demo: --validation_split_percentage P holds out a fixed P% of the training split for "
              "evaluation instead)")


@dataclass(frozen=True)
class SourceIdentity:
    """What a dataset name stands for: the benchmark its data is (None for other data), for a directory
    written by ``prepare-dataset``, the record (``benchmark.json``) it carries and that file, and whether
    it is the benchmark's Hub copy (``hub_copy``: its name, or a local copy of its repo, ``how`` says why)."""

    name: str
    benchmark: str | None = None
    record: dict | None = None
    record_file: Path | None = None
    hub_copy: bool = False
    how: str = ""

    @property
    def embedded(self) -> bool:
        return self.name == EMBEDDED


def benchmark_name(dataset: str) -> str | None:
    """The registered name of a dataset given as a benchmark name (``ADE20K-150`` -> ``ade150``) or as the
    Hub id of a benchmark's Hub copy (``scene_parse_150`` -> ``ade150``); None for anything else (an
    existing path is always a path)."""
    if Path(dataset).exists():
        return None
    if is_benchmark(dataset):
        return get_benchmark(dataset).name
    return next((b.name for b in list_benchmarks() if b.hub is not None and b.hub.repo_id == str(dataset)), None)


def identify_source(name: str, split: str, benchmark: str | None = None) -> SourceIdentity:
    """What ``name`` is: ``benchmark`` (the data is this benchmark in its raw form) if given, else the
    benchmark a benchmark name stands for; a directory written by ``prepare-dataset`` carries its benchmark
    in its ``benchmark.json``, and a local copy of a benchmark's Hub repo is that benchmark's Hub copy
    (:func:`~opentrans_hf.data.benchmarks.hub_copy.hub_copy_benchmark`); another ``benchmark`` for either
    is an error naming the file or folder."""
    given = get_benchmark(benchmark).name if benchmark is not None else None
    benchmark = given or (benchmark_name(name) if name != EMBEDDED else None)
    hub_copy = benchmark is not None and not Path(name).exists()
    record, record_file = find_prepared_record(name) if name != EMBEDDED else (None, None)
    how = ""
    if record is not None:
        if benchmark is not None and benchmark != record["benchmark"]:
            raise ValueError(f"dataset {name!r} split {split!r}: it was prepared as benchmark {record['benchmark']!r} "
                             f"({record_file}), not {benchmark!r}")
        benchmark = record["benchmark"]
    elif name != EMBEDDED and Path(name).is_dir():
        copy_of, how = hub_copy_benchmark(name)
        if copy_of is not None:
            if benchmark is not None and benchmark != copy_of:
                raise ValueError(f"dataset {name!r} split {split!r}: it is {how}, benchmark {copy_of!r}, not "
                                 f"{benchmark!r}")
            benchmark, hub_copy = copy_of, True
    return SourceIdentity(name, benchmark, record, record_file, hub_copy, how)


def load_raw_dataset(name: str, split: str, *, image_size: int, seed: int = 0, embedded_size: int = 192):
    """The ``datasets.Dataset`` of one split: the embedded dataset (``embedded_size`` training examples of
    ``image_size`` pixels, drawn with ``seed``) or :func:`load_segmentation_dataset`."""
    if name == EMBEDDED:
        return embedded_dataset(split, num_train=embedded_size, image_size=image_size, seed=seed)
    return load_segmentation_dataset(name, split)


def label_conventions(source: SourceIdentity) -> dict:
    """``{"reduce_labels": ..., "ignore_index": ...}`` of the source's label maps: a prepared benchmark's
    (label i is class i), a raw benchmark's (as its registry entry records them), else ``{}`` (none known)."""
    if source.embedded:
        return {}
    if source.record is not None:
        return {"reduce_labels": False, "ignore_index": int(source.record.get("ignore_index", 255))}
    if source.benchmark is not None:
        bench = get_benchmark(source.benchmark)
        return {"reduce_labels": bench.raw_reduce_labels, "ignore_index": bench.raw_ignore_index}
    return {}


def default_held_out(source: SourceIdentity) -> list[str]:
    """The classes a run holds out of training unless told otherwise (the embedded dataset's four; none else)."""
    return list(HELD_OUT_CLASSES) if source.embedded else []


def default_columns(source: SourceIdentity, image_column: str | None, label_column: str | None):
    """``(image column, label column)``: the given ones, else, for a raw benchmark's Hub copy (by name or a
    local copy of its repo), the columns its registry entry names (None: detected by :func:`find_columns`)."""
    if source.embedded or source.record is not None or source.benchmark is None:
        return image_column, label_column
    bench = get_benchmark(source.benchmark)
    if bench.hub is not None and source.hub_copy:
        return image_column or bench.hub.image_column, label_column or bench.hub.label_column
    return image_column, label_column


def find_label_map_columns(dataset, image_column: str | None, label_column: str | None, what: str) -> tuple[str, str]:
    """:func:`find_columns`, where a label column is required (``what`` names the dataset split in the error)."""
    img_col, lab_col = find_columns(dataset, image_column, label_column)
    if lab_col is None:
        raise ValueError(f"{what} has no label column (columns: {dataset.column_names}); name it with --label_column "
                         "(or \"label_column\" in a dataset spec)")
    return img_col, lab_col


def files_beside(name_or_path, filename: str) -> list[Path]:
    """Where a file that describes a dataset directory may lie: in the directory and, for a split directory
    of a ``DatasetDict``, in the ``DatasetDict``'s. ``[]`` for anything that is not a directory."""
    p = Path(name_or_path)
    if not p.is_dir():
        return []
    candidates = [p / filename]
    if p.name in _dataset_dict_splits(p.parent):
        candidates.append(p.parent / filename)
    return candidates


def find_prepared_record(name_or_path) -> tuple[dict | None, Path | None]:
    """``(record, file)`` of the ``benchmark.json`` that ``opentrans-hf prepare-dataset`` wrote beside a
    dataset (in its directory, or for a split directory of a ``DatasetDict``, in the ``DatasetDict``'s),
    or ``(None, None)``. A record naming no known benchmark is an error naming the file."""
    for f in files_beside(name_or_path, PREPARED_RECORD):
        if f.is_file():
            record = read_json(f, "prepared benchmark record")
            if not isinstance(record, dict) or not isinstance(record.get("benchmark"), str) \
                    or not is_benchmark(record["benchmark"]):
                raise ValueError(f"{f}: expected {{\"benchmark\": NAME, \"ignore_index\": ...}} naming a known benchmark "
                                 f"(opentrans-hf benchmarks), got {str(record)[:200]}")
            ignore = record.get("ignore_index", 255)
            if not (is_integer(ignore) and ignore >= 0):
                raise ValueError(f"{f}: 'ignore_index' must be a label value (an integer >= 0), got {ignore!r}")
            return record, f
    return None, None


def load_segmentation_dataset(name_or_path: str | Path, split: str = "train", revision: str | None = None):
    """A ``datasets.Dataset`` for ``split`` of:

    * a directory written by ``DatasetDict.save_to_disk`` (``split`` must be one of its splits), or
      one written by ``Dataset.save_to_disk``: one split, the one recorded in it, else the directory's
      name if it is a split directory of a ``DatasetDict``, else ``train``;
    * an image/label folder: ``<dir>/<split>/images`` + ``<dir>/<split>/labels``, paired by file stem;
      a folder without split folders (``<dir>/images`` + ``<dir>/labels``) is the ``train`` split, as in
      ``datasets``' imagefolder;
    * a local copy of a Hub dataset repo, laid out as ``datasets``' packaged builders read it
      (``data/<split>-*.parquet``, ``<split>/*.parquet``, ``<config>/<split>/*.parquet`` as a parquet
      conversion holds it, arrow shards, an image folder with a ``metadata.jsonl``): the directory may be
      the repo's root or one configuration's folder; a root with several configurations loads the one
      the benchmark whose copy it is loads (``scene_parsing`` of scene_parse_150), else is an error
      listing them (see :mod:`~opentrans_hf.data.benchmarks.hub_copy`);
    * a benchmark name of :mod:`opentrans_hf.data.benchmarks` (``ade150``): its Hub copy, in the form the
      registry records (repo, revision such as ``refs/convert/parquet``, sub-folder, split names); a
      benchmark without one is an error saying how to prepare it;
    * a Hugging Face Hub dataset name (``datasets.load_dataset``).

    A split the dataset does not have is an error, never another split; so is an empty split.
    """
    p = Path(name_or_path)
    if p.is_dir():
        return _load_directory(p, split)
    if p.exists():
        raise ValueError(f"dataset path {p} is a file; pass a directory or a Hub dataset name")
    repo_id, revision, data_dir, split = _hub_location(name_or_path, split, revision)
    return _load_hub(repo_id, split, revision, data_dir)


def _hub_location(name, split: str, revision: str | None):
    """``(repo id, revision, data_dir, split)`` on the Hub: the copy of a benchmark (given by name or by its
    Hub copy's id) as its registry entry records it (an error saying how to prepare a benchmark that has
    none), else the name as given."""
    registered = benchmark_name(name)
    if registered is None:
        return name, revision, None, split
    bench = get_benchmark(registered)
    if bench.hub is None:
        raise ValueError(
            f"benchmark {bench.name} ({bench.title}) has no copy on the Hugging Face Hub: prepare it from its "
            f"official release with `opentrans-hf prepare-dataset {bench.name} --raw_dir DIR --output_dir OUT` "
            "and give OUT as the dataset")
    return bench.hub.repo_id, revision or bench.hub.revision, bench.hub.data_dir, bench.hub.splits.get(split, split)


def _load_hub(name, split: str, revision: str | None, data_dir: str | None):
    """``datasets.load_dataset`` of one split of a Hub dataset; a split it does not have is an error saying so."""
    import datasets

    def load():
        try:
            extra = {"data_dir": data_dir} if data_dir else {}
            return datasets.load_dataset(str(name), split=split, revision=revision, **extra)
        except ValueError as err:
            if "unknown split" in str(err).lower():
                raise _MissingSplit(str(err)) from err
            raise

    try:
        ds = load_or_explain(name, load, "dataset")
    except _MissingSplit as err:
        raise ValueError(f"Hub dataset {str(name)!r} has no split {split!r}: {err} {SPLIT_HINT}") from None
    return _nonempty(ds, name, split)


def _load_directory(p: Path, split: str):
    """One split of a local directory: a ``DatasetDict`` or ``Dataset`` saved with ``save_to_disk``, else an
    image/label folder, else a local copy of a Hub dataset repo."""
    if (p / "dataset_dict.json").is_file():
        splits = _dataset_dict_splits(p)
        if split not in splits:
            raise ValueError(f"dataset at {p} has splits {sorted(splits)}; split {split!r} is not one of them "
                             f"{SPLIT_HINT}")
        return _nonempty(_load_from_disk(p / split, p, split), p, split)
    if (p / "state.json").is_file() or (p / "dataset_info.json").is_file():
        return _load_saved_dataset(p, split)
    return _load_image_label_split(p, split)


def _load_saved_dataset(p: Path, split: str):
    """A ``Dataset.save_to_disk`` directory, which holds one split: the one recorded in it, else the
    directory's name if it is a split directory of a ``DatasetDict``, else ``train``."""
    ds = _load_from_disk(p, p, split)
    parent_split = p.name if p.name in _dataset_dict_splits(p.parent) else None
    own = str(ds.split) if ds.split is not None else parent_split or "train"
    if split != own:
        how = ("the split recorded in it" if ds.split is not None else
               f"a split directory of the DatasetDict in {p.parent}" if parent_split else
               "saved without a split name, so it is 'train', as datasets names unsplit data")
        raise ValueError(f"dataset at {p} is one Dataset holding the split {own!r} ({how}); split "
                         f"{split!r} is not there: ask for {own!r} ({p}:{own}) or save a DatasetDict with "
                         f"a {split!r} split {SPLIT_HINT}")
    return _nonempty(ds, p, split)


def _load_image_label_split(p: Path, split: str):
    """``<p>/<split>/images`` + ``labels``, or for the ``train`` split a folder without split folders
    (``<p>/images`` + ``labels``); otherwise an error listing the splits that are there."""
    if (p / split / "images").is_dir() and (p / split / "labels").is_dir():
        return _nonempty(_image_label_folder(p / split), p, split)
    flat = (p / "images").is_dir() and (p / "labels").is_dir()
    if flat and split == "train":
        return _nonempty(_image_label_folder(p), p, split)
    found = sorted(d.name for d in p.iterdir() if (d / "images").is_dir() and (d / "labels").is_dir())
    if flat or found:
        layout = (["train"] if flat and "train" not in found else []) + found
        raise ValueError(
            f"image/label folder {p}: split {split!r} is not there (no {p / split}/images and labels); "
            f"its splits are {layout}" + (" (a folder without split folders is the 'train' split)" if flat else "")
            + f" {SPLIT_HINT}")
    if is_hub_copy(p):
        return _load_hub_copy(p, split)
    raise ValueError(
        f"{p} is neither a save_to_disk dataset (no state.json / dataset_dict.json) nor an image/label folder "
        f"(expected {p}/images and {p}/labels, or {p}/{split}/images and {p}/{split}/labels) nor a copy of a Hub "
        f"dataset repo (parquet or arrow shards: {p}/data/{split}-*.parquet, {p}/{split}/*.parquet or "
        f"{p}/CONFIG/{split}/*.parquet; or a metadata.jsonl beside images)"
    )


def _load_hub_copy(p: Path, split: str):
    """One split of a local copy of a Hub dataset repo: the configuration the benchmark whose copy it is
    loads, under the split name its registry entry records."""
    copy = open_hub_copy(p)
    if copy.benchmark is not None:
        split = get_benchmark(copy.benchmark).hub.splits.get(split, split)
    return _nonempty(load_hub_copy(copy, split, SPLIT_HINT), copy.where, split)


def _dataset_dict_splits(path: Path) -> list[str]:
    """The splits listed by ``path/dataset_dict.json`` (a ``DatasetDict.save_to_disk`` directory), or []."""
    f = path / "dataset_dict.json"
    if not f.is_file():
        return []
    record = read_json(f, "dataset_dict.json")
    splits = record.get("splits") if isinstance(record, dict) else None
    if not (isinstance(splits, list) and all(isinstance(s, str) and s for s in splits)):
        raise ValueError(f"{f} is not a DatasetDict.save_to_disk record: expected {{\"splits\": [names]}}, got "
                         f"{str(record)[:200]}")
    return list(splits)


def _load_from_disk(path: Path, where: Path, split: str):
    """``datasets.load_from_disk`` of one split directory; an empty one (``datasets`` saves no data file
    for it and then cannot load it) is an error saying so, a broken one an error naming the directory."""
    import datasets

    state = path / "state.json"
    if state.is_file():
        record = read_json(state, "save_to_disk state.json")
        if not isinstance(record, dict):
            raise ValueError(f"{state} is not a Dataset.save_to_disk state: expected a JSON object, got "
                             f"{str(record)[:200]}")
        if not record.get("_data_files"):
            _nonempty([], where, split)
    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError, KeyError, IndexError) as err:
        raise ValueError(f"could not load the save_to_disk dataset at {path} (split {split!r}): {err}") from err


class _MissingSplit(Exception):
    """``load_dataset``'s unknown-split error, kept apart from the failures ``load_or_explain`` explains."""


def _nonempty(ds, where, split: str):
    if len(ds) == 0:
        raise ValueError(f"dataset {str(where)!r} split {split!r} has no examples")
    return ds


def _image_label_folder(root: Path):
    import datasets

    images = {f.stem: f for f in sorted((root / "images").iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES}
    labels = {f.stem: f for f in sorted((root / "labels").iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES}
    if not images:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {root / 'images'}")
    missing = sorted(set(images) - set(labels))
    if missing:
        raise ValueError(f"{len(missing)} image(s) in {root / 'images'} have no label map in {root / 'labels'}, e.g. {missing[0]!r}")
    stems = sorted(images)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict(
        {"image": [str(images[s]) for s in stems], "label": [str(labels[s]) for s in stems]}, features=features
    )


def find_columns(dataset, image_column: str | None = None, label_column: str | None = None) -> tuple[str, str | None]:
    """The image and label column names: the given ones (checked), else the usual names."""
    cols = list(dataset.column_names)

    def pick(given, candidates, what, required):
        if given is not None:
            if given not in cols:
                raise ValueError(f"{what} column {given!r} is not in the dataset; its columns are {cols}")
            return given
        for c in candidates:
            if c in cols:
                return c
        if required:
            raise ValueError(f"no {what} column found among {cols}; pass it explicitly (tried {list(candidates)})")
        return None

    return pick(image_column, IMAGE_COLUMNS, "image", True), pick(label_column, LABEL_COLUMNS, "label", False)
