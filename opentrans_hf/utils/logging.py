"""The library's logger, after ``transformers.utils.logging``.

Library code logs through ``logging.getLogger(__name__)`` (or :func:`get_logger`); nothing prints. All of it
sits under the ``opentrans_hf`` logger, which writes ``message`` lines to stderr at WARNING by default (the
jobs of the ``opentrans-hf`` command raise it to INFO, so they say what they do). Control it as in
transformers::

    import opentrans_hf
    opentrans_hf.utils.logging.set_verbosity_info()     # or set_verbosity_warning / _error / _debug
    # or before starting Python: OPENTRANS_HF_VERBOSITY=error

Under several processes (``accelerate launch``) only the main process (``RANK`` 0) writes, unless a record
is logged with ``extra={"all_ranks": True}``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

LIBRARY = "opentrans_hf"
ENV_VERBOSITY = "OPENTRANS_HF_VERBOSITY"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}
DEFAULT_LEVEL = logging.WARNING

_lock = threading.Lock()
_handler: logging.Handler | None = None


class MainProcessFilter(logging.Filter):
    """Drop records on processes other than the main one (``RANK`` > 0) unless ``record.all_ranks``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "all_ranks", False):
            return True
        return os.environ.get("RANK", "0") in ("", "0")


def _env_level() -> int:
    name = os.environ.get(ENV_VERBOSITY, "").strip().lower()
    if not name:
        return DEFAULT_LEVEL
    if name not in LEVELS:
        logging.getLogger(LIBRARY).warning("%s=%r is not one of %s; using warning", ENV_VERBOSITY, name,
                                           ", ".join(LEVELS))
        return DEFAULT_LEVEL
    return LEVELS[name]


def _configure_library_root_logger() -> logging.Logger:
    """Give the ``opentrans_hf`` logger its stderr handler once (on the first :func:`get_logger` call)."""
    global _handler
    root = logging.getLogger(LIBRARY)
    with _lock:
        if _handler is None:
            _handler = logging.StreamHandler(sys.stderr)
            _handler.setFormatter(logging.Formatter("%(message)s"))
            _handler.addFilter(MainProcessFilter())
            root.addHandler(_handler)
            root.setLevel(_env_level())
            root.propagate = False
    return root


def get_logger(name: str | None = None) -> logging.Logger:
    """The logger ``name`` (a module's ``__name__``), under the configured ``opentrans_hf`` logger."""
    _configure_library_root_logger()
    return logging.getLogger(name or LIBRARY)


def get_verbosity() -> int:
    return _configure_library_root_logger().getEffectiveLevel()


def set_verbosity(level: int | str) -> None:
    """Set the level of every ``opentrans_hf`` logger: a ``logging`` level or its name (``"info"``)."""
    if isinstance(level, str):
        if level.lower() not in LEVELS:
            raise ValueError(f"verbosity must be one of {', '.join(LEVELS)}, got {level!r}")
        level = LEVELS[level.lower()]
    _configure_library_root_logger().setLevel(level)


def set_verbosity_debug() -> None:
    set_verbosity(logging.DEBUG)


def set_verbosity_info() -> None:
    set_verbosity(logging.INFO)


def set_verbosity_warning() -> None:
    set_verbosity(logging.WARNING)


def set_verbosity_error() -> None:
    set_verbosity(logging.ERROR)
