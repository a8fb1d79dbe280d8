"""Stage 2 of the data path, the vocabulary: the class names of a source's label map (what a model is given
for it, with a benchmark's synonyms), and where they came from. Calls only :mod:`~opentrans_hf.data.sources`
and :mod:`~opentrans_hf.data.benchmarks`.

Names are never guessed. They come from, in this order:

1. an explicit source, at most one: a list of names (``--class_names``, ``"class_names"`` in a dataset
   spec), an ``id2label`` mapping or JSON file (``--id2label``, ``"id2label"``), or a named benchmark
   vocabulary (``--benchmark``, ``"vocabulary"``: one of :mod:`opentrans_hf.data.benchmarks`, with its synonyms,
   or one registered in :data:`VOCABULARIES`);
2. metadata that describes the label map itself: the ``benchmark.json`` of a dataset written by
   ``opentrans-hf prepare-dataset``, an ``id2label.json`` in the dataset's directory or Hub repo (as
   transformers' semantic-segmentation examples read it), or a ``ClassLabel`` feature of the label
   column itself (e.g. ``List(List(ClassLabel))``).

A ``ClassLabel`` of another column (ADE20K's ``scene_category``, a per-image list of present classes)
describes something else and is never used. When the explicit names and the dataset's own names
differ in number, that is an error; when neither exists, the error says where names can come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

from opentrans_hf.data.benchmarks import BENCHMARK_NAMES, get_benchmark, is_benchmark
from opentrans_hf.data.sources import LABEL_COLUMNS, SourceIdentity, files_beside
from opentrans_hf.embedded.dataset import CLASS_NAMES
from opentrans_hf.utils.io import read_json

ID2LABEL_FILE = "id2label.json"

VOCABULARIES: dict[str, tuple[str, ...]] = {}
"""Extra named vocabularies (``{"my_labels": ("wall", "building", ...)}``) that a dataset spec can refer to
with ``"vocabulary": NAME``, beside the benchmarks of :mod:`opentrans_hf.data.benchmarks` (``ade150``, ...),
which are always known. Register one at run time: ``VOCABULARIES[name] = names``."""

SOURCES_HINT = (
    "class names come from --id2label FILE ({\"0\": \"wall\", ...}) or --class_names A B ... (the training "
    "--dataset, or evaluate with one dataset), from \"id2label\" / \"class_names\" / \"vocabulary\" in a "
    "dataset spec file (any evaluation dataset), from an id2label.json in the dataset's directory or Hub "
    "repo, or from a ClassLabel feature of the label column itself"
)


@dataclass(frozen=True)
class Vocabulary:
    """The class names of a label map (index = label value) and, for people, where they came from.

    ``prompts``: what the model is given per class when it differs from the name: a tuple of synonyms
    (a benchmark's ``("building", "edifice")``), else None."""

    names: tuple[str, ...]
    source: str
    prompts: tuple | None = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def class_prompts(self) -> list:
        """One entry per class for the model: its name, or the tuple of its names (synonyms)."""
        if self.prompts is None:
            return list(self.names)
        return [p[0] if isinstance(p, tuple) and len(p) == 1 else p for p in self.prompts]


def benchmark_vocabulary(name: str, how: str = "") -> Vocabulary:
    """The vocabulary of a benchmark of :mod:`opentrans_hf.data.benchmarks` (display names + synonyms)."""
    b = get_benchmark(name)
    return Vocabulary(tuple(b.class_names), f"benchmark {b.name} ({b.title}{', ' + how if how else ''})",
                      tuple(b.class_prompts))


def named_vocabulary(name: str) -> Vocabulary:
    """A benchmark's vocabulary (:mod:`opentrans_hf.data.benchmarks`) or one registered in :data:`VOCABULARIES`."""
    if name in VOCABULARIES:
        return Vocabulary(_check_names(VOCABULARIES[name], f"vocabulary {name!r}"), f"vocabulary {name!r}")
    if is_benchmark(name):
        return benchmark_vocabulary(name)
    known = ", ".join([*BENCHMARK_NAMES, *sorted(VOCABULARIES)])
    raise ValueError(f"unknown vocabulary {name!r} (known vocabularies: {known}); give the class names with "
                     "\"id2label\" or \"class_names\" instead")


def read_id2label(id2label: str | Path | dict, what: str = "id2label") -> tuple[str, ...]:
    """Names, index = id, from an ``{id: name}`` mapping or JSON file; ids must be 0..N-1."""
    if not isinstance(id2label, dict):
        what = f"{what} file {id2label}"
        id2label = read_json(id2label, "id2label file")
        if not isinstance(id2label, dict):
            raise ValueError(f"{what}: expected a JSON object {{\"0\": \"name\", ...}}, got {type(id2label).__name__}")
    try:
        by_id = {int(k): v for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{what}: keys must be integer ids, got {list(id2label)[:5]}") from None
    ids = sorted(by_id)
    if ids != list(range(len(ids))):
        raise ValueError(f"{what}: ids must be contiguous from 0; got {ids[:10]}{'...' if len(ids) > 10 else ''}")
    return _check_names([by_id[i] for i in ids], what)


def _check_names(names, what: str) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise ValueError(f"{what}: expected a list of class names, got {names!r}")
    not_text = next(((i, n) for i, n in enumerate(names) if not isinstance(n, str)), None)
    if not_text is not None:
        raise ValueError(f"{what}: class {not_text[0]} has the name {not_text[1]!r}; class names are strings")
    out = tuple(n.strip() for n in names)
    if not out:
        raise ValueError(f"{what}: no class names")
    empty = [i for i, n in enumerate(out) if not n]
    if empty:
        raise ValueError(f"{what}: class {empty[0]} has an empty name")
    dupes = sorted({n for n in out if out.count(n) > 1})
    if dupes:
        raise ValueError(f"{what}: duplicate class names {dupes}")
    return out


def explicit_vocabulary(*, class_names=None, id2label=None, vocabulary: str | None = None,
                        flags: tuple[str, str, str] = ("class_names", "id2label", "vocabulary")) -> Vocabulary | None:
    """The vocabulary given explicitly (at most one of the three), or None. ``flags`` name the three
    sources in messages (``--class_names`` for a command line, ``"class_names"`` for a spec file)."""
    values = (class_names, id2label, vocabulary)
    given = [i for i, v in enumerate(values) if v]
    if len(given) > 1:
        raise ValueError(f"give the class names either with {' or '.join(flags[i] for i in given)}, not both")
    if not given:
        return None
    i = given[0]
    if i == 0:
        return Vocabulary(_check_names(list(class_names), flags[0]), flags[0])
    if i == 1:
        if isinstance(id2label, dict):
            return Vocabulary(read_id2label(id2label, flags[1]), flags[1])
        return Vocabulary(read_id2label(id2label, flags[1]), f"{flags[1]} {id2label}")
    return named_vocabulary(vocabulary)


def label_column_vocabulary(dataset, label_column: str | None) -> Vocabulary | None:
    """The names of a ``ClassLabel`` feature of the label column itself (inside any ``List``/``Sequence``
    nesting), or None. A scalar ``ClassLabel`` label column is one class per image, not a label map."""
    import datasets

    if dataset is None or label_column is None or label_column not in dataset.features:
        return None
    feat, depth = dataset.features[label_column], 0
    while not isinstance(feat, datasets.ClassLabel) and getattr(feat, "feature", None) is not None:
        feat, depth = feat.feature, depth + 1
    if not isinstance(feat, datasets.ClassLabel):
        return None
    if depth == 0:
        raise ValueError(f"label column {label_column!r} is a ClassLabel with one class per image, not a label map: "
                         "this looks like an image-classification dataset; pass the label-map column "
                         "(--label_column / \"label_column\")")
    return Vocabulary(_check_names(list(feat.names), f"ClassLabel of column {label_column!r}"),
                      f"ClassLabel of column {label_column!r}")


def other_classlabel_columns(dataset, label_column: str | None) -> dict[str, list[str]]:
    """``{column: names}`` of the ClassLabel features of columns other than the label column (named in
    errors: they are why a dataset may look named when its label map is not)."""
    import datasets

    out = {}
    for name, feat in (dataset.features.items() if dataset is not None else ()):
        if name == label_column:
            continue
        while not isinstance(feat, datasets.ClassLabel) and getattr(feat, "feature", None) is not None:
            feat = feat.feature
        if isinstance(feat, datasets.ClassLabel):
            out[name] = list(feat.names)
    return out


def resolve_vocabulary(dataset=None, *, label_column: str | None = None, class_names=None, id2label=None,
                       vocabulary: str | None = None, own: Vocabulary | None = None, what: str = "the dataset",
                       flags: tuple[str, str, str] = ("--class_names", "--id2label", "vocabulary"),
                       searched: str = "") -> Vocabulary:
    """The vocabulary of ``dataset``'s label map (see the module docstring for the order).

    ``own``: names the dataset carries outside its features (an ``id2label.json`` found beside it, the
    embedded dataset's classes); ``what`` names the dataset and split in messages, ``flags`` the three
    explicit sources, ``searched`` where an ``id2label.json`` was looked for."""
    explicit = explicit_vocabulary(class_names=class_names, id2label=id2label, vocabulary=vocabulary, flags=flags)
    column = label_column_vocabulary(dataset, label_column)
    if own is not None and column is not None and own.names != column.names:
        raise ValueError(f"{what}: its {own.source} names {len(own)} classes {list(own.names)[:5]}... but the "
                         f"{column.source} names {len(column)} {list(column.names)[:5]}...; give the names explicitly")
    own = own or column
    if explicit is not None:
        if own is not None and len(own) != len(explicit):
            raise ValueError(f"{what} has {len(own)} classes of its own ({own.source}), but {explicit.source} "
                             f"gives {len(explicit)}: give one name per label value, or none")
        return explicit
    if own is not None:
        return own
    others = other_classlabel_columns(dataset, label_column)
    note = "".join(
        f"; column {c!r} has a ClassLabel ({', '.join(n[:3])}{', ...' if len(n) > 3 else ''}) but it is not the "
        f"label map {label_column!r}, so its names are not used" for c, n in others.items())
    searched = f"; {searched}" if searched else ""
    raise ValueError(f"{what}: no class names for its label map (column {label_column!r}){note}{searched}. "
                     f"{SOURCES_HINT[0].upper()}{SOURCES_HINT[1:]}")


def check_no_explicit_names(source: SourceIdentity, what: str, flags: tuple[str, str, str], class_names=None,
                            id2label=None, vocabulary=None) -> None:
    """A benchmark brings its own class names: explicit ones for it are an error naming the flags given."""
    if source.benchmark is not None and (class_names or id2label or vocabulary):
        given = " / ".join(f for f, v in zip(flags, (class_names, id2label, vocabulary)) if v)
        raise ValueError(f"{what} is benchmark {source.benchmark!r}, which brings its own class names: give "
                         f"{given} only for other data")


def own_vocabulary(source: SourceIdentity) -> tuple[Vocabulary | None, str]:
    """``(names the source carries outside its features, where an id2label.json was looked for)``: the
    embedded dataset's classes, a prepared or raw benchmark's names, else an ``id2label.json`` beside it
    (:func:`find_id2label`); ``(None, what was searched)`` if none."""
    if source.embedded:
        return Vocabulary(tuple(CLASS_NAMES), "embedded dataset's classes"), ""
    if source.record is not None:
        return benchmark_vocabulary(source.benchmark, f"prepared: {source.record_file}"), ""
    if source.benchmark is not None:
        return benchmark_vocabulary(source.benchmark, "raw labels"), ""
    return find_id2label(source.name)


def find_id2label(name_or_path: str | Path, revision: str | None = None):
    """``(Vocabulary, "")`` from the ``id2label.json`` that describes a dataset's label map: in its
    directory (for a split directory of a ``DatasetDict``, in the ``DatasetDict``'s), or in its Hub
    repo (as transformers' semantic-segmentation examples read it). ``(None, what was searched)`` if none."""
    p = Path(name_or_path)
    if p.is_dir():
        for f in files_beside(p, ID2LABEL_FILE):
            if f.is_file():
                return Vocabulary(read_id2label(f), f"{ID2LABEL_FILE} in {f.parent}"), ""
        return None, f"no {ID2LABEL_FILE} in {p}"
    try:
        path = huggingface_hub.hf_hub_download(repo_id=str(name_or_path), filename=ID2LABEL_FILE, repo_type="dataset", revision=revision)
    except LocalEntryNotFoundError:
        return None, f"the Hub repo's {ID2LABEL_FILE} is not in the local cache (offline?)"
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None, f"no {ID2LABEL_FILE} in the Hub repo {str(name_or_path)!r}"
    except OSError as err:  # network trouble: say so rather than guess
        return None, f"the Hub repo's {ID2LABEL_FILE} could not be fetched ({err})"
    where = f"{ID2LABEL_FILE} of Hub dataset {str(name_or_path)!r}"
    return Vocabulary(read_id2label(path, where), where), ""


def resolve_class_names(dataset=None, *, class_names: list[str] | None = None, id2label: str | Path | dict | None = None,
                        label_column: str | None = None) -> list[str]:
    """Class names, index = label value: an explicit list, else an ``id2label`` JSON file or dict
    (``{"0": "wall", ...}``, contiguous ids from 0), else the names of a ``ClassLabel`` feature of the
    dataset's label column itself (``label_column``, default: detected). A ClassLabel of another column
    is never used (see :func:`resolve_vocabulary`, which also knows ``id2label.json`` files)."""
    if dataset is not None and label_column is None:
        label_column = next((c for c in LABEL_COLUMNS if c in dataset.column_names), None)
    return list(resolve_vocabulary(dataset, label_column=label_column, class_names=class_names, id2label=id2label,
                                   flags=("class_names", "id2label", "vocabulary")).names)
