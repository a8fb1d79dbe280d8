"""Aliases that keep the module paths of version 0.1 importing for one version.

Version 0.2 moved the modules into layers (``utils``, ``spectral``, ``methods``, ``models``, ``data``,
``training``, ...). Each old path is a small module that warns once (``FutureWarning``) and hands back the
new module itself, so objects, ``isinstance`` checks and ``mock.patch`` targets are the same under both names.
The aliases go in version 0.3.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable
from types import ModuleType

REMOVED_IN = "0.3"


def warn_moved(old: str, *new: str, stacklevel: int = 4) -> None:
    """Warn (``FutureWarning``) that the module ``old`` moved to the module(s) ``new``."""
    where = " and ".join(f"`{n}`" for n in new)
    warnings.warn(f"`{old}` moved to {where} in opentrans-hf 0.2; the old path goes in {REMOVED_IN}: "
                  f"import from {where}", FutureWarning, stacklevel=stacklevel)


def alias_module(old: str, new: str) -> ModuleType:
    """Make the module ``old`` (the caller, still importing) the module ``new``."""
    warn_moved(old, new)
    module = importlib.import_module(new)
    sys.modules[old] = module
    return module


def forward_package(old: str, new: str) -> Callable[[str], object]:
    """A module ``__getattr__`` for the old package ``old``: every name is looked up in ``new``. The old
    package stays a package of its own (its submodules are aliases too), so nothing is imported twice."""
    warn_moved(old, new)
    target = importlib.import_module(new)

    def __getattr__(name: str):
        try:
            return getattr(target, name)
        except AttributeError:
            raise AttributeError(f"module {old!r} (now {new!r}) has no attribute {name!r}") from None

    return __getattr__
