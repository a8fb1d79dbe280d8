"""The library's logger, after ``transformers.utils.logging``.

Library code logs through its module's logger (``logger = logging.get_logger(__name__)`` with
``from opentrans_hf.utils import logging``); it never prints, except where printing is the point
(``SpectralModel.print_trainable_parameters``, the jobs' own results). All of it sits under the
``opentrans_hf`` logger, which writes to stderr: ``message`` lines at INFO and DEBUG,
``warning: message`` / ``error: message`` at WARNING and above. The default level is WARNING; the jobs
(the ``opentrans-hf`` command, the scripts) run at INFO, so they say what they do. Control it as in
transformers::

    from opentrans_hf.utils import logging
    logging.set_verbosity_info()     # or set_verbosity_warning / _error / _debug, or set_verbosity("error")
    # or before starting Python (it also overrides the jobs' INFO): OPENTRANS_HF_VERBOSITY=error

Under several processes (``accelerate launch``) only the main process (``RANK`` unset or 0) writes,
unless a record is logged with ``extra={"all_ranks": True}``.

The records do not reach the root logger (so an application's ``logging.basicConfig`` does not print
them twice); :func:`enable_propagation` sends them there too (e.g. for pytest's ``caplog``), and
:func:`disable_default_handler` stops the stderr lines.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from contextlib import contextmanager

LIBRARY = "opentrans_hf"
ENV_VERBOSITY = "OPENTRANS_HF_VERBOSITY"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}
DEFAULT_LEVEL = logging.WARNING
JOB_LEVEL = logging.INFO
"""The level of the jobs (``opentrans-hf COMMAND``, ``scripts/*.py``) unless ``OPENTRANS_HF_VERBOSITY`` names one."""

DEBUG, INFO, WARNING, ERROR, CRITICAL = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL

_lock = threading.Lock()
_handler: logging.Handler | None = None


class MainProcessFilter(logging.Filter):
    """Drop records on processes other than the main one (``RANK`` > 0) unless ``record.all_ranks``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "all_ranks", False):
            return True
        return os.environ.get("RANK", "0").strip() in ("", "0")


class LevelPrefixFormatter(logging.Formatter):
    """``message`` below WARNING, ``warning: message`` / ``error: message`` / ``critical: message`` from it on."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


class StderrHandler(logging.StreamHandler):
    """A ``StreamHandler`` on whatever ``sys.stderr`` is when a record is written (not when the handler was
    made), so that a redirected or captured stderr (``contextlib.redirect_stderr``, pytest's ``capsys``)
    gets the lines."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ / setStream assign it; sys.stderr is always used
        pass


def env_verbosity() -> int | None:
    """The level ``OPENTRANS_HF_VERBOSITY`` names, or None when it is unset or empty. A name that is not a
    level is ignored with a warning naming it."""
    name = os.environ.get(ENV_VERBOSITY, "").strip().lower()
    if not name:
        return None
    if name not in LEVELS:
        logging.getLogger(LIBRARY).warning("%s=%r is not one of %s; ignored", ENV_VERBOSITY, name, ", ".join(LEVELS))
        return None
    return LEVELS[name]


def _configure_library_root_logger() -> logging.Logger:
    """Give the ``opentrans_hf`` logger its stderr handler and level once (on the first :func:`get_logger`)."""
    global _handler
    root = logging.getLogger(LIBRARY)
    with _lock:
        if _handler is None:
            _handler = StderrHandler()
            _handler.setFormatter(LevelPrefixFormatter("%(message)s"))
            _handler.addFilter(MainProcessFilter())
            root.addHandler(_handler)
            root.propagate = False
            level = env_verbosity()
            root.setLevel(DEFAULT_LEVEL if level is None else level)
    return root


def get_logger(name: str | None = None) -> logging.Logger:
    """The logger ``name`` (a module's ``__name__``), under the configured ``opentrans_hf`` logger."""
    _configure_library_root_logger()
    return logging.getLogger(name or LIBRARY)


def get_verbosity() -> int:
    """The level of the ``opentrans_hf`` logger (``logging.WARNING`` by default)."""
    return _configure_library_root_logger().getEffectiveLevel()


def _level(level: int | str) -> int:
    if isinstance(level, str):
        if level.strip().lower() not in LEVELS:
            raise ValueError(f"verbosity must be one of {', '.join(LEVELS)}, got {level!r}")
        return LEVELS[level.strip().lower()]
    return int(level)


def set_verbosity(level: int | str) -> None:
    """Set the level of every ``opentrans_hf`` logger: a ``logging`` level or its name (``"info"``)."""
    _configure_library_root_logger().setLevel(_level(level))


def set_verbosity_debug() -> None:
    set_verbosity(logging.DEBUG)


def set_verbosity_info() -> None:
    set_verbosity(logging.INFO)


def set_verbosity_warning() -> None:
    set_verbosity(logging.WARNING)


def set_verbosity_error() -> None:
    set_verbosity(logging.ERROR)


def job_level(level: int | str = JOB_LEVEL) -> int:
    """The level a job runs at: the one ``OPENTRANS_HF_VERBOSITY`` names, else ``level`` (INFO: the job's
    progress lines show). A script that is one job: ``logging.set_verbosity(logging.job_level())``."""
    chosen = env_verbosity()
    return _level(level) if chosen is None else chosen


@contextmanager
def job_verbosity(level: int | str = JOB_LEVEL):
    """Run a job at :func:`job_level` and restore the verbosity before it afterwards. The ``opentrans-hf``
    command runs every job in it."""
    previous = _configure_library_root_logger().level
    set_verbosity(job_level(level))
    try:
        yield
    finally:
        _configure_library_root_logger().setLevel(previous)


def enable_propagation() -> None:
    """Also pass the library's records to the root logger's handlers (an application's, pytest's ``caplog``)."""
    _configure_library_root_logger().propagate = True


def disable_propagation() -> None:
    """Keep the library's records from the root logger (the default)."""
    _configure_library_root_logger().propagate = False


def enable_default_handler() -> None:
    """Write the library's records to stderr again (the default)."""
    root = _configure_library_root_logger()
    if _handler not in root.handlers:
        root.addHandler(_handler)


def disable_default_handler() -> None:
    """Stop writing the library's records to stderr (e.g. with :func:`enable_propagation`, to route them elsewhere)."""
    _configure_library_root_logger().removeHandler(_handler)
