"""Shared Hub helpers: loading by local path or Hub id with clear errors when offline."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def load_or_explain(name_or_path: str | os.PathLike, loader: Callable[[], T], what: str = "model") -> T:
    """Call ``loader()`` (a ``from_pretrained``); turn a failed Hub lookup into an error that says
    whether ``name_or_path`` was taken as a local directory or a Hub id, and what to do."""
    try:
        return loader()
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
