"""Sources: loading segmentation datasets (a Hub name, a ``save_to_disk`` directory, or an image/label folder);
finding their image and label columns and their class names."""

from __future__ import annotations

from pathlib import Path

from opentrans_hf.data.benchmarks import get_benchmark
from opentrans_hf.data.benchmarks.registry import PREPARED_RECORD, is_benchmark
from opentrans_hf.data.vocabulary import ID2LABEL_FILE, Vocabulary, read_id2label, resolve_vocabulary
from opentrans_hf.utils.hub import load_or_explain
from opentrans_hf.utils.io import read_json

IMAGE_COLUMNS = ("image", "pixel_values", "img")
LABEL_COLUMNS = ("label", "annotation", "semantic_segmentation", "segmentation", "mask", "labels")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


SPLIT_HINT = ("(train / demo: --validation_split_percentage P holds out a fixed P% of the training split for "
              "evaluation instead)")


def load_segmentation_dataset(name_or_path: str | Path, split: str = "train", revision: str | None = None):
    """A ``datasets.Dataset`` for ``split`` of:

    * a directory written by ``DatasetDict.save_to_disk`` (``split`` must be one of its splits), or
      one written by ``Dataset.save_to_disk``: one split, the one recorded in it, else the directory's
      name if it is a split directory of a ``DatasetDict``, else ``train``;
    * an image/label folder: ``<dir>/<split>/images`` + ``<dir>/<split>/labels``, paired by file stem;
      a folder without split folders (``<dir>/images`` + ``<dir>/labels``) is the ``train`` split, as in
      ``datasets``' imagefolder;
    * a benchmark name of :mod:`opentrans_hf.data.benchmarks` (``ade150``): its Hub copy, in the form the
      registry records (repo, revision such as ``refs/convert/parquet``, sub-folder, split names); a
      benchmark without one is an error saying how to prepare it;
    * a Hugging Face Hub dataset name (``datasets.load_dataset``).

    A split the dataset does not have is an error, never another split; so is an empty split.
    """
    import datasets

    p = Path(name_or_path)
    data_dir = None
    if not p.exists():
        if is_benchmark(name_or_path):
            bench = get_benchmark(name_or_path)
            if bench.hub is None:
                raise ValueError(
                    f"benchmark {bench.name} ({bench.title}) has no copy on the Hugging Face Hub: prepare it from its "
                    f"official release with `opentrans-hf prepare-dataset {bench.name} --raw_dir DIR --output_dir OUT` "
                    "and give OUT as the dataset")
            name_or_path, revision, data_dir = bench.hub.repo_id, revision or bench.hub.revision, bench.hub.data_dir
            split = bench.hub.splits.get(split, split)
    if p.is_dir():
        if (p / "dataset_dict.json").is_file():
            splits = _dataset_dict_splits(p)
            if split not in splits:
                raise ValueError(f"dataset at {p} has splits {sorted(splits)}; split {split!r} is not one of them "
                                 f"{SPLIT_HINT}")
            return _nonempty(_load_from_disk(p / split, p, split), p, split)
        if (p / "state.json").is_file() or (p / "dataset_info.json").is_file():
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
        raise ValueError(
            f"{p} is neither a save_to_disk dataset (no state.json / dataset_dict.json) nor an image/label folder "
            f"(expected {p}/images and {p}/labels, or {p}/{split}/images and {p}/{split}/labels)"
        )
    if p.exists():
        raise ValueError(f"dataset path {p} is a file; pass a directory or a Hub dataset name")
    def load():
        try:
            extra = {"data_dir": data_dir} if data_dir else {}
            return datasets.load_dataset(str(name_or_path), split=split, revision=revision, **extra)
        except ValueError as err:
            if "unknown split" in str(err).lower():
                raise _MissingSplit(str(err)) from err
            raise

    try:
        ds = load_or_explain(name_or_path, load, "dataset")
    except _MissingSplit as err:
        raise ValueError(f"Hub dataset {str(name_or_path)!r} has no split {split!r}: {err} {SPLIT_HINT}") from None
    return _nonempty(ds, name_or_path, split)


def _dataset_dict_splits(path: Path) -> list[str]:
    """The splits listed by ``path/dataset_dict.json`` (a ``DatasetDict.save_to_disk`` directory), or []."""
    f = path / "dataset_dict.json"
    return list(read_json(f, "dataset_dict.json").get("splits") or []) if f.is_file() else []


def _load_from_disk(path: Path, where: Path, split: str):
    """``datasets.load_from_disk`` of one split directory; an empty one (``datasets`` saves no data file
    for it and then cannot load it) is an error saying so, a broken one an error naming the directory."""
    import datasets

    state = path / "state.json"
    if state.is_file() and not read_json(state, "save_to_disk state.json").get("_data_files"):
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


def find_id2label(name_or_path: str | Path, revision: str | None = None):
    """``(Vocabulary, "")`` from the ``id2label.json`` that describes a dataset's label map: in its
    directory (for a split directory of a ``DatasetDict``, in the ``DatasetDict``'s), or in its Hub
    repo (as transformers' semantic-segmentation examples read it). ``(None, what was searched)`` if none."""
    p = Path(name_or_path)
    if p.is_dir():
        candidates = [p / ID2LABEL_FILE]
        if p.name in _dataset_dict_splits(p.parent):
            candidates.append(p.parent / ID2LABEL_FILE)
        for f in candidates:
            if f.is_file():
                return Vocabulary(read_id2label(f), f"{ID2LABEL_FILE} in {f.parent}"), ""
        return None, f"no {ID2LABEL_FILE} in {p}"
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = hf_hub_download(repo_id=str(name_or_path), filename=ID2LABEL_FILE, repo_type="dataset", revision=revision)
    except LocalEntryNotFoundError:
        return None, f"the Hub repo's {ID2LABEL_FILE} is not in the local cache (offline?)"
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None, f"no {ID2LABEL_FILE} in the Hub repo {str(name_or_path)!r}"
    except OSError as err:  # network trouble: say so rather than guess
        return None, f"the Hub repo's {ID2LABEL_FILE} could not be fetched ({err})"
    where = f"{ID2LABEL_FILE} of Hub dataset {str(name_or_path)!r}"
    return Vocabulary(read_id2label(path, where), where), ""


def find_prepared_record(name_or_path) -> tuple[dict | None, Path | None]:
    """``(record, file)`` of the ``benchmark.json`` that ``opentrans-hf prepare-dataset`` wrote beside a
    dataset (in its directory, or for a split directory of a ``DatasetDict``, in the ``DatasetDict``'s),
    or ``(None, None)``. A record naming no known benchmark is an error naming the file."""
    p = Path(name_or_path)
    if not p.is_dir():
        return None, None
    candidates = [p / PREPARED_RECORD]
    if p.name in _dataset_dict_splits(p.parent):
        candidates.append(p.parent / PREPARED_RECORD)
    for f in candidates:
        if f.is_file():
            record = read_json(f, "prepared benchmark record")
            if not isinstance(record, dict) or not is_benchmark(record.get("benchmark", "")):
                raise ValueError(f"{f}: expected {{\"benchmark\": NAME, \"ignore_index\": ...}} naming a known benchmark "
                                 f"(opentrans-hf benchmarks), got {str(record)[:200]}")
            return record, f
    return None, None


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


def resolve_class_names(dataset=None, *, class_names: list[str] | None = None, id2label: str | Path | dict | None = None,
                        label_column: str | None = None) -> list[str]:
    """Class names, index = label value: an explicit list, else an ``id2label`` JSON file or dict
    (``{"0": "wall", ...}``, contiguous ids from 0), else the names of a ``ClassLabel`` feature of the
    dataset's label column itself (``label_column``, default: detected). A ClassLabel of another column
    is never used (see :mod:`opentrans_hf.data.vocabulary`, which also knows ``id2label.json`` files)."""
    if dataset is not None and label_column is None:
        label_column = next((c for c in LABEL_COLUMNS if c in dataset.column_names), None)
    return list(resolve_vocabulary(dataset, label_column=label_column, class_names=class_names, id2label=id2label,
                                   flags=("class_names", "id2label", "vocabulary")).names)
