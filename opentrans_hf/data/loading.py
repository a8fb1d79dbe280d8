"""Loading segmentation datasets: a Hub name, a ``save_to_disk`` directory, or an image/label folder;
finding their image and label columns and their class names."""

from __future__ import annotations

from pathlib import Path

from ..io import read_json

IMAGE_COLUMNS = ("image", "pixel_values", "img")
LABEL_COLUMNS = ("label", "annotation", "semantic_segmentation", "segmentation", "mask", "labels")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def load_segmentation_dataset(name_or_path: str | Path, split: str = "train", revision: str | None = None):
    """A ``datasets.Dataset`` for ``split`` of:

    * a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``;
    * an image/label folder: ``<dir>/images/*`` and ``<dir>/labels/*`` paired by file stem
      (or ``<dir>/<split>/images`` and ``<dir>/<split>/labels``);
    * a Hugging Face Hub dataset name (``datasets.load_dataset``).
    """
    import datasets

    p = Path(name_or_path)
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file() or (p / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ValueError(f"dataset at {p} has splits {sorted(ds)}; split {split!r} is not one of them")
                ds = ds[split]
            return ds
        for root in (p / split, p):
            if (root / "images").is_dir() and (root / "labels").is_dir():
                return _image_label_folder(root)
        raise ValueError(
            f"{p} is neither a save_to_disk dataset (no state.json / dataset_dict.json) nor an image/label folder "
            f"(expected {p}/images and {p}/labels, or {p}/{split}/images and {p}/{split}/labels)"
        )
    if p.exists():
        raise ValueError(f"dataset path {p} is a file; pass a directory or a Hub dataset name")
    from ..hub import load_or_explain  # a missing local path fails there at once

    return load_or_explain(name_or_path, lambda: datasets.load_dataset(str(name_or_path), split=split, revision=revision), "dataset")


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


def resolve_class_names(dataset=None, *, class_names: list[str] | None = None, id2label: str | Path | dict | None = None) -> list[str]:
    """Class names, index = label value: an explicit list, else an ``id2label`` JSON file or dict
    (``{"0": "wall", ...}``, contiguous ids from 0), else the names of a ``ClassLabel`` feature of the
    dataset (or of a ``Sequence(ClassLabel)``, e.g. a per-image list of present classes)."""
    if class_names:
        names = [str(c).strip() for c in class_names]
        if any(not n for n in names):
            raise ValueError(f"empty class name in {class_names!r}")
        return names
    if id2label is not None:
        if not isinstance(id2label, dict):
            id2label = read_json(id2label, "id2label file")
        try:
            ids = sorted(int(k) for k in id2label)
        except ValueError:
            raise ValueError(f"id2label keys must be integers, got {list(id2label)[:5]}") from None
        if ids != list(range(len(ids))):
            raise ValueError(f"id2label ids must be contiguous from 0; got {ids[:10]}...")
        return [str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in ids]
    if dataset is not None:
        import datasets

        for name, feat in dataset.features.items():
            inner = getattr(feat, "feature", None)
            if isinstance(feat, datasets.ClassLabel):
                return list(feat.names)
            if isinstance(inner, datasets.ClassLabel):
                return list(inner.names)
            if isinstance(feat, list) and feat and isinstance(feat[0], datasets.ClassLabel):
                return list(feat[0].names)
    raise ValueError(
        "no class names: the dataset has no ClassLabel feature; pass class_names=[...] (--class_names) "
        "or an id2label JSON file (--id2label)"
    )
