"""Shared Hub helpers: loading by local path or Hub id with clear errors when offline; model weights from
safetensors only (a directory holding only pickled weights is refused, naming the file), and a truncated or
corrupt safetensors file named; pushing a folder in one commit."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import huggingface_hub
from huggingface_hub import CommitOperationAdd, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

T = TypeVar("T")


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def load_or_explain(name_or_path: str | os.PathLike, loader: Callable[[], T], what: str = "model") -> T:
    """Call ``loader()`` (a ``from_pretrained``); turn a failed Hub lookup into an error that says
    whether ``name_or_path`` was taken as a local directory or a Hub id, and what to do. A missing
    local path fails at once (no Hub retries). A local directory is checked first
    (:func:`check_weights_directory`): weights only as pickles, or a truncated safetensors file, is an error
    naming the file."""
    check_local_or_hub(name_or_path, what)
    check_weights_directory(name_or_path, what)
    try:
        return loader()
    except SafetensorError as err:  # a file the header check passed but the load could not read
        raise ValueError(f"could not load the {what} from {name_or_path}: a safetensors file there is not readable "
                         f"({err})") from None
    except (OSError, ValueError) as err:
        p = Path(name_or_path)
        if p.exists():
            raise type(err)(f"could not load the {what} from local directory {p}: {err}") from err
        hint = (
            "HF_HUB_OFFLINE is set, so only the local cache is searched"
            if is_offline()
            else "the Hub may be unreachable (no network?) or the id may be wrong"
        )
        raise OSError(
            f"could not load the {what} {str(name_or_path)!r}: it is not a local directory, and loading it as a "
            f"Hugging Face Hub id failed ({hint}). Original error: {err}"
        ) from err


def looks_like_local_path(name: str | os.PathLike) -> bool:
    """True when ``name`` can only be meant as a local path: absolute, ``./``/``../``/``~`` relative,
    more than two components (a Hub id is ``name`` or ``owner/name``), or whose parent directory exists."""
    s = str(name)
    if s in (".", "..") or s.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        return True
    parts = Path(s).parts
    if len(parts) > 2:
        return True
    return len(parts) == 2 and Path(parts[0]).is_dir()


def check_local_or_hub(name_or_path: str | os.PathLike | None, what: str = "path") -> None:
    """Raise ``FileNotFoundError`` ("no such directory") when ``name_or_path`` is meant as a local path
    (:func:`looks_like_local_path`) but does not exist, instead of trying it as a Hub id for a while."""
    if name_or_path is None or Path(name_or_path).expanduser().exists():
        return
    if looks_like_local_path(name_or_path):
        raise FileNotFoundError(
            f"{what} {str(name_or_path)!r}: no such directory (a local path, so it is not looked up "
            f"on the Hugging Face Hub; a Hub id is 'name' or 'owner/name')"
        )


MODEL_CARDS_DIR = Path(__file__).parents[1] / "model_cards"


def resolve_pretrained_dir(
    name_or_path: str | os.PathLike,
    filenames: list[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    optional: tuple[str, ...] = ("README.md",),
    what: str = "adapter",
) -> Path:
    """Return a local directory holding ``filenames``: ``name_or_path`` itself when it is a directory
    (a missing file is an error naming it), otherwise the files downloaded from the Hub repo of that id
    (offline or unreachable: an error saying so). Files in ``optional`` may be absent."""
    p = Path(name_or_path)
    if p.is_dir():
        missing = [f for f in filenames if f not in optional and not (p / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{what} directory {p} lacks {missing}; expected {filenames}")
        return p
    if p.exists():
        raise NotADirectoryError(f"{what} path {p} is a file; pass the directory that holds {filenames}")
    check_local_or_hub(name_or_path, what)
    local = None
    for f in filenames:
        try:
            local = Path(huggingface_hub.hf_hub_download(str(name_or_path), f, revision=revision, token=token))
        except EntryNotFoundError as err:
            if isinstance(err, LocalEntryNotFoundError):  # offline / unreachable and not cached
                _raise_download_error(name_or_path, f, what, err)
            if f in optional:
                continue
            raise FileNotFoundError(f"Hub repo {name_or_path!r} has no file {f!r} (expected {filenames})") from None
        except Exception as err:  # offline, unreachable, unknown repo, bad id
            _raise_download_error(name_or_path, f, what, err)
    if local is None:
        raise FileNotFoundError(f"no file of {filenames} found in Hub repo {name_or_path!r}")
    return local.parent


def _raise_download_error(name_or_path, filename: str, what: str, err: Exception):
    hint = "HF_HUB_OFFLINE is set" if is_offline() else "the Hub may be unreachable or the id wrong"
    raise OSError(
        f"{str(name_or_path)!r} is not a local {what} directory, and downloading {filename!r} from the Hugging Face "
        f"Hub failed ({hint}): {err}"
    ) from err


SKIPPED_IN_COMMITS = (".git", ".cache")
"""Directories never pushed (as ``upload_folder`` leaves ``.git`` and ``.cache/huggingface`` out)."""

TOKEN_PLACEHOLDER = "<HUB_TOKEN>"
"""What a Hub token is written as in saved arguments, as transformers' ``TrainingArguments.to_dict`` does."""


def check_can_push(repo_id: str) -> None:
    """``OSError`` when nothing can be pushed (``HF_HUB_OFFLINE`` is set): called before anything is saved or
    sent, so an offline push fails at once and does nothing."""
    if is_offline():
        raise OSError(f"cannot push to the Hub repo {repo_id!r}: HF_HUB_OFFLINE is set (unset it to push)")


def folder_operations(folder: str | os.PathLike) -> list[CommitOperationAdd]:
    """One ``CommitOperationAdd`` per file under ``folder``, subfolders included (``path_in_repo`` is the
    file's path relative to ``folder``, with ``/``), sorted; ``.git`` and ``.cache`` directories are left out.
    A missing folder is a ``FileNotFoundError``, one without files a ``ValueError``, both naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot push {folder}: no such directory")
    files = sorted(
        f for f in folder.rglob("*")
        if f.is_file() and not set(f.relative_to(folder).parts[:-1]) & set(SKIPPED_IN_COMMITS)
    )
    if not files:
        raise ValueError(f"cannot push {folder}: it holds no file")
    return [CommitOperationAdd(path_in_repo=f.relative_to(folder).as_posix(), path_or_fileobj=str(f)) for f in files]


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str = "Upload with opentrans-hf",
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
) -> str:
    """Push every file under ``folder`` (subfolders as subfolders of the repo) to the Hub model repo
    ``repo_id`` in ONE commit, as transformers' ``push_to_hub`` does: ``create_repo(exist_ok=True,
    private=private)``, then ``create_branch(exist_ok=True)`` when ``revision`` names a branch (created from
    the default branch if missing), then ``create_commit`` with one ``CommitOperationAdd`` per file.
    ``token``: None is the logged-in token. Returns the commit URL. Offline (``HF_HUB_OFFLINE``): an
    ``OSError`` before anything is sent; a failed Hub call: an ``OSError`` naming the folder and repo."""
    check_can_push(repo_id)
    operations = folder_operations(folder)
    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model")
        repo_id = url.repo_id if isinstance(getattr(url, "repo_id", None), str) else repo_id  # "name" -> "owner/name"
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, token=token, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, commit_message=commit_message,
                                 commit_description=commit_description, token=token, revision=revision,
                                 repo_type="model")
    except Exception as err:
        where = f" (revision {revision!r})" if revision is not None else ""
        raise OSError(f"pushing {folder} to the Hub repo {repo_id!r}{where} failed: {err}") from err
    return str(getattr(info, "commit_url", info))


def redact_tokens(values: dict) -> dict:
    """``values`` (a job's arguments) with every ``*_token`` that is set replaced by ``<HUB_TOKEN>``, for
    whatever is written or logged (metrics.json, the trackers' hyperparameters)."""
    return {k: (TOKEN_PLACEHOLDER if k.endswith("_token") and v not in (None, False, True) else v)
            for k, v in values.items()}


def render_model_card(template: str, card_data: dict, **variables) -> str:
    """Render ``opentrans_hf/model_cards/<template>`` (Jinja) with YAML metadata ``card_data``
    (``huggingface_hub.ModelCardData`` fields: library_name, tags, base_model, model-index, ...)."""
    path = MODEL_CARDS_DIR / template
    if not path.is_file():
        raise FileNotFoundError(f"model card template {path} does not exist")
    base = card_data.get("base_model")
    if base is not None and (Path(str(base)).exists() or str(base).startswith(("/", "."))):
        card_data = {k: v for k, v in card_data.items() if k != "base_model"}  # the Hub takes repo ids only
    card = ModelCard.from_template(ModelCardData(**card_data), template_path=str(path), **variables)
    return str(card)


@contextmanager
def quiet_loading():
    """Silence transformers' load report and progress bars, e.g. for ``CLIPVisionModel.from_pretrained``
    on a full ``CLIPModel`` checkpoint, where the text tower's "unexpected" keys are expected."""
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def read_safetensors(path: str | os.PathLike, what: str = "adapter weights") -> dict:
    """``safetensors.torch.load_file`` with errors that name the file: FileNotFoundError when it is
    missing, ValueError when it is not a complete safetensors file (truncated, corrupt; with the tensors
    cut off, when its header is intact)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(_unreadable(path, what, err)) from None


def check_safetensors_file(path: str | os.PathLike, what: str = "model weights") -> None:
    """Read only the header of safetensors file ``path``: a truncated or corrupt file is a ``ValueError``
    naming it (and the tensors cut off), before a loader fails on it with a message that names nothing."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise ValueError(_unreadable(path, what, err)) from None


def _unreadable(path: Path, what: str, err: Exception) -> str:
    return f"cannot read {path} ({what}): not a complete safetensors file ({err}){safetensors_cut_off(path)}"


def safetensors_cut_off(path: str | os.PathLike) -> str:
    """Which tensors of safetensors file ``path`` extend past its end (its header read by hand), as a
    clause to append to an error: ``"; tensor(s) cut off: 'a', 'b'"``, ``"; its header is cut off or
    corrupt"``, or ``""``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else None
            header = json.loads(f.read(n)) if n is not None and n < 100_000_000 else None
        size = path.stat().st_size - 8 - n
    except (OSError, ValueError, TypeError):
        header = None
    if not isinstance(header, dict):
        return "; its header is cut off or corrupt"
    cut = [k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
           and v.get("data_offsets", [0, 0])[1] > size]
    return f"; tensor(s) cut off: {', '.join(map(repr, cut[:5]))}{' ...' if len(cut) > 5 else ''}" if cut else ""


PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
"""Weight files that are pickles (``torch.save``): ``pytorch_model.bin`` and its shards, ``*.pt``, ...
Never loaded: model weights come from safetensors files only."""

NOT_WEIGHTS = frozenset({"training_args.bin"})  # transformers' Trainer writes it beside the weights


def pickle_refusal(path: str | os.PathLike) -> str:
    """The one line that refuses the pickled weight file ``path``, and says how to convert it."""
    return (f"refused: {path} is a pickle, and opentrans-hf loads model weights only from safetensors files "
            f"(model.safetensors), never from pickles ({', '.join(f'*{s}' for s in PICKLE_WEIGHT_SUFFIXES)}); to "
            "convert weights you trust, load them yourself (transformers' from_pretrained, or "
            "model.load_state_dict(torch.load(file, weights_only=True))) and save them with save_pretrained(directory), "
            "which writes model.safetensors")


def check_weights_directory(path: str | os.PathLike | None, what: str = "model") -> None:
    """Safetensors only: refuse (``ValueError``, :func:`pickle_refusal`) a local directory whose weights are
    only pickles (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``: no ``*.safetensors`` beside them),
    naming the file; and check the header of every safetensors file there (:func:`check_safetensors_file`).
    Anything that is not a local directory (a Hub id) is left to the loader."""
    if path is None:
        return
    d = Path(path).expanduser()
    if not d.is_dir():
        return
    files = sorted(f for f in d.iterdir() if f.is_file())
    safe = [f for f in files if f.name.endswith((".safetensors", ".safetensors.index.json"))]
    pickles = [f for f in files if f.suffix in PICKLE_WEIGHT_SUFFIXES and f.name not in NOT_WEIGHTS]
    if pickles and not safe:
        raise ValueError(pickle_refusal(pickles[0]))
    for f in safe:
        if f.suffix == ".safetensors":
            check_safetensors_file(f, f"{what} weights")
