"""Fingerprints of runs: the settings that change a run's result, recorded with its checkpoints so that a
resume under other settings is refused with the differences listed, instead of silently mixing two runs."""

from __future__ import annotations

import json


def fingerprint(settings: dict) -> dict:
    """``settings`` as plain JSON values (tuples -> lists, paths -> strings), comparable after a round trip."""
    return json.loads(json.dumps(settings, default=str, sort_keys=True))


def differences(saved: dict, current: dict, saved_name: str = "checkpoint") -> list[str]:
    """``"name: <saved> in the <saved_name>, <current> now"`` for every setting whose value differs. A
    setting absent from ``saved`` (recorded by an older version) is not compared."""
    current = fingerprint(current)
    return [f"{k}: {saved[k]!r} in the {saved_name}, {current.get(k)!r} now"
            for k in sorted(saved) if k in current and saved[k] != current[k]]
