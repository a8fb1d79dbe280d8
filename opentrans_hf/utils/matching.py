"""PEFT's rules for selecting modules by name.

* a string is a regular expression that must match the *whole* module name (``re.fullmatch``);
* a list (or other iterable) of strings matches a name equal to an entry or ending in ``"." + entry``.

These are the rules of ``peft.tuners.tuners_utils.check_target_module_exists`` so that
``target_modules`` / ``exclude_modules`` mean the same thing here as in a ``LoraConfig``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

Patterns = str | Iterable[str] | None


def normalize_patterns(patterns: Patterns) -> str | list[str] | None:
    """Return ``None``, a regex string, or a list of names; reject anything else clearly."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        try:
            re.compile(patterns)
        except re.error as err:
            raise ValueError(f"invalid regular expression {patterns!r} for module selection: {err}") from None
        return patterns
    out = list(patterns)
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"module patterns must be strings, got {p!r} ({type(p).__name__})")
    return out


def name_matches(name: str, patterns: Patterns) -> bool:
    """True when ``name`` is selected by ``patterns`` under PEFT's rules (``None`` selects nothing)."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def is_selected(name: str, target_modules: Patterns, exclude_modules: Patterns) -> bool:
    """``target_modules=None`` means every candidate; ``exclude_modules`` always wins."""
    if exclude_modules is not None and name_matches(name, exclude_modules):
        return False
    return target_modules is None or name_matches(name, target_modules)
