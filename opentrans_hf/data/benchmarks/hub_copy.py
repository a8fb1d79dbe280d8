"""Local copies of Hugging Face Hub dataset repos: a folder laid out as ``datasets``' packaged builders
read a Hub repo (parquet or arrow shards, image folders with a ``metadata.jsonl`` / ``.csv`` /
``.parquet``), e.g. a ``huggingface-cli download`` or Hub-cache snapshot:

* ``data/<split>-00000-of-00001.parquet`` (a repo's main branch), ``<split>/*.parquet``;
* ``<config>/<split>/0000.parquet``, one folder per configuration, as ``refs/convert/parquet`` holds them
  (scene_parse_150: ``scene_parsing/{train,validation,test}/*.parquet`` and ``instance_segmentation/...``);
* configurations declared in the ``README.md``'s ``configs`` (a repo's dataset card).

``datasets.load_dataset(folder, data_dir=... | name=..., split=...)`` resolves the layout itself; this
module only finds the folder's configurations, picks one (the one a benchmark's Hub copy is, when the folder
is that benchmark's repo; see :class:`~opentrans_hf.data.benchmarks.registry.HubSource`) and checks splits,
so that a local copy loads wherever its Hub id does, with the same conventions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from opentrans_hf.data.benchmarks.registry import Benchmark, get_benchmark, list_benchmarks

DATA_SUFFIXES = (".parquet", ".arrow")
"""Shards of a Hub repo (a parquet conversion, ``push_to_hub``'s output)."""
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
"""The files that make an image folder a dataset with columns of its own (``file_name``,
``annotation_file_name``, ...), as ``datasets``' imagefolder reads them."""
SAVE_TO_DISK_FILES = ("dataset_dict.json", "state.json")


@dataclass(frozen=True)
class HubCopy:
    """A local copy of a Hub dataset repo and the configuration of it to load.

    ``path``: the folder given (the repo's root or one configuration's folder); ``config``: the
    configuration chosen (None: the folder is a single one); ``load_kwargs``: what picks it in
    ``datasets.load_dataset`` (``{"data_dir": folder}`` or ``{"name": config}``); ``benchmark``: the
    registered benchmark whose Hub repo this is a copy of (None: other data), and ``how`` it was recognised."""

    path: Path
    config: str | None = None
    load_kwargs: dict = field(default_factory=dict)
    benchmark: str | None = None
    how: str = ""

    @property
    def where(self) -> str:
        """The folder (and configuration) in messages."""
        return str(self.path) + (f" (configuration {self.config!r})" if self.config else "")

    @property
    def folder(self) -> Path:
        """The folder holding the chosen configuration's splits."""
        return self.path / self.load_kwargs["data_dir"] if "data_dir" in self.load_kwargs else self.path


def _is_save_to_disk(path: Path) -> bool:
    return any((path / f).is_file() for f in SAVE_TO_DISK_FILES)


def _has_data_files(path: Path, depth: int) -> bool:
    """Shards (:data:`DATA_SUFFIXES`) at most ``depth`` folders below ``path`` (hidden folders skipped)."""
    for level in range(1, depth + 1):
        for suffix in DATA_SUFFIXES:
            pattern = "/".join(["*"] * (level - 1) + [f"*{suffix}"])
            if any(not any(part.startswith(".") for part in f.relative_to(path).parts) for f in path.glob(pattern)):
                return True
    return False


def _readme_declares_configs(path: Path) -> bool:
    """The folder's ``README.md`` has a YAML header with a ``configs`` list (a dataset card's)."""
    readme = path / "README.md"
    if not readme.is_file():
        return False
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return False
    header = text[3:].split("\n---", 1)[0]
    return any(line.startswith("configs:") for line in header.splitlines())


def is_hub_copy(path) -> bool:
    """``path`` is a folder laid out as a Hub dataset repo that ``datasets.load_dataset`` reads (shards up
    to three folders deep, an image folder's metadata file, or a dataset card declaring configurations),
    and not a ``save_to_disk`` directory."""
    p = Path(path)
    if not p.is_dir() or _is_save_to_disk(p):
        return False
    if _has_data_files(p, 3) or _readme_declares_configs(p):
        return True
    return any((p / m).is_file() or any(p.glob(f"*/{m}")) for m in METADATA_FILES)


def _split_keywords() -> set[str]:
    from datasets.data_files import SPLIT_KEYWORDS

    return {k.lower() for words in SPLIT_KEYWORDS.values() for k in words} | {"data"}


def config_folders(path) -> list[str]:
    """The sub-folders of a repo copy that are configurations, as in a parquet conversion: each holds
    shards itself or in split folders, and is neither a split folder nor ``data/``."""
    p = Path(path)
    skip = _split_keywords()
    return sorted(d.name for d in p.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and d.name.lower() not in skip and d.name.lower().removeprefix("partial-") not in skip
                  and _has_data_files(d, 2))


def declared_configs(path) -> list[str]:
    """The configurations a copy's ``README.md`` declares (``[]`` if it declares none)."""
    import datasets

    p = Path(path)
    if not _readme_declares_configs(p):
        return []
    try:
        return list(datasets.get_dataset_config_names(str(p)))
    except (OSError, ValueError) as err:
        raise ValueError(f"{p / 'README.md'}: its configs cannot be read by datasets: {err}") from err


def _cache_repo_id(path: Path) -> str | None:
    """The repo id of a Hub-cache snapshot (``.../datasets--owner--name/snapshots/<commit>/...``)."""
    for part in path.resolve().parts:
        if part.startswith("datasets--"):
            return part[len("datasets--"):].replace("--", "/")
    return None


def _with_hub(benchmarks) -> list[Benchmark]:
    return [b for b in benchmarks if b.hub is not None]


def hub_copy_benchmark(path) -> tuple[str | None, str]:
    """``(benchmark name, how it was recognised)`` when ``path`` is a copy of a registered benchmark's Hub
    repo: the folder of its configuration (``scene_parsing`` for ade150), a repo root holding that
    configuration (as a folder or in its dataset card), or a Hub-cache snapshot of its repo; else
    ``(None, "")``."""
    p = Path(path)
    if not is_hub_copy(p):
        return None, ""
    benchmarks = _with_hub(list_benchmarks())
    for b in benchmarks:
        if b.hub.data_dir and p.name == b.hub.data_dir:
            return b.name, f"the folder of configuration {b.hub.data_dir!r} of {b.hub.repo_id}"
    folders = config_folders(p)
    for b in benchmarks:
        if b.hub.data_dir and b.hub.data_dir in folders:
            return b.name, f"a copy of {b.hub.repo_id} (it holds its configuration folder {b.hub.data_dir!r})"
    repo = _cache_repo_id(p)
    for b in benchmarks:
        if repo is not None and repo == b.hub.repo_id:
            return b.name, f"a Hub-cache snapshot of {b.hub.repo_id}"
    declared = declared_configs(p)
    for b in benchmarks:
        if b.hub.data_dir and b.hub.data_dir in declared:
            return b.name, f"a copy of {b.hub.repo_id} (its README declares configuration {b.hub.data_dir!r})"
    return None, ""


def open_hub_copy(path, benchmark: str | None = None) -> HubCopy:
    """The :class:`HubCopy` of a folder and the configuration to load: the folder itself when it is one
    configuration, else the one ``benchmark``'s Hub copy is (by default the benchmark recognised by
    :func:`hub_copy_benchmark`); several configurations and none of them known is an error listing them
    and saying how to pick one."""
    p = Path(path)
    if not is_hub_copy(p):
        raise ValueError(f"{p} is not laid out as a Hub dataset repo (no {' / '.join(DATA_SUFFIXES)} shards, image-folder "
                         f"metadata or dataset card with configs)")
    found, how = hub_copy_benchmark(p)
    if benchmark is not None:
        benchmark = get_benchmark(benchmark).name
        if found is not None and found != benchmark:
            raise ValueError(f"{p} is {how}, benchmark {found!r}, not {benchmark!r}")
    name = benchmark or found
    wanted = get_benchmark(name).hub.data_dir if name is not None and get_benchmark(name).hub else None
    if wanted and p.name == wanted:
        return HubCopy(p, None, {}, name, how)
    declared = declared_configs(p)
    if len(declared) > 1:
        if wanted in declared:
            return HubCopy(p, wanted, {"name": wanted}, name, how)
        raise ValueError(_several(p, declared, name, wanted, folders=[c for c in declared if (p / c).is_dir()]))
    folders = config_folders(p)
    if wanted in folders:
        return HubCopy(p, wanted, {"data_dir": wanted}, name, how)
    if len(folders) > 1:
        raise ValueError(_several(p, folders, name, wanted, folders=folders))
    if len(folders) == 1 and not _has_data_files(p, 1):
        return HubCopy(p, folders[0], {"data_dir": folders[0]}, name, how)
    return HubCopy(p, None, {}, name, how)


def _several(p: Path, configs: list[str], benchmark: str | None, wanted: str | None, folders: list[str]) -> str:
    what = (f"none of them {wanted!r}, the configuration benchmark {benchmark} loads" if wanted else
            "and none of them is known")
    pick = (f"give the folder of the one to load as the dataset, e.g. {p / folders[0]}" if folders else
            "load the one you want with datasets.load_dataset(DIR, CONFIG) and save it with save_to_disk")
    return f"Hub dataset copy {p} has several configurations {configs}, {what}: {pick}"


def hub_copy_splits(copy: HubCopy) -> list[str]:
    """The splits of the copy's configuration, as ``datasets`` finds them (no data is read)."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(str(copy.path), **copy.load_kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"Hub dataset copy {copy.where} cannot be read by datasets: {err}") from err
    files = builder.config.data_files
    if files:
        return [str(s) for s in files]
    return [str(s) for s in (builder.info.splits or {})]


def load_hub_copy(copy: HubCopy, split: str, hint: str = ""):
    """``datasets.load_dataset`` of one split of the copy; a split it does not have is an error listing the
    ones it has (and ``hint``)."""
    import datasets

    splits = hub_copy_splits(copy)
    if split not in splits:
        expected = ("" if "name" in copy.load_kwargs else
                    f" (expected shards in {copy.folder / split} or named {split}-*)")
        raise ValueError(f"Hub dataset copy {copy.where} has splits {splits}; split {split!r} is not one of them"
                         f"{expected}{' ' + hint if hint else ''}")
    try:
        return datasets.load_dataset(str(copy.path), split=split, **copy.load_kwargs)
    except (OSError, ValueError) as err:
        if "corresponds to no data" in str(err):  # datasets' word for a split whose shards hold no rows
            raise ValueError(f"Hub dataset copy {copy.where} split {split!r} has no examples") from None
        raise ValueError(f"could not load split {split!r} of the Hub dataset copy {copy.where}: {err}") from err
