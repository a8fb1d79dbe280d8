"""Atomic writes: a temporary file (or directory) beside the target, then a rename.

A crash or an exception mid-write never leaves a half-written file or directory under the final name. An
OS-level failure (disk full, no permission, a file in the way, ...) while writing is a :class:`WriteError`:
one line that names the path, the reason and what was kept, whichever library's writer met it (Python's
``OSError``, safetensors' ``SafetensorError``, torch's ``inline_container.cc`` errors of a short write).
"""

from __future__ import annotations

import errno as errno_codes
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


class WriteError(OSError):
    """An OS-level failure while writing ``path``: ``cannot write PATH: REASON; KEPT`` (``kept``: what is left
    as it was). ``errno`` is the OS's error number where the writer said it (``errno.ENOSPC``, ...)."""

    def __init__(self, path: str | Path, reason: str, kept: str, code: int | None = None, what: str = ""):
        self.path, self.reason, self.kept, self.what = Path(path), reason, kept, what
        super().__init__(f"cannot write {what}{path}: {reason}; {kept}")
        self.errno = code

    def keeping(self, kept: str) -> WriteError:
        """The same failure with another account of what was kept."""
        return WriteError(self.path, self.reason, kept, self.errno, self.what)


# torch's zip writer reports a short write (a full disk) as "[enforce fail at inline_container.cc:NNN] .
# unexpected pos A vs B" or "PytorchStreamWriter failed writing file ...: file write failed"
_TORCH_SHORT_WRITE = re.compile(r"inline_container\.cc|PytorchStreamWriter failed|file write failed|unexpected pos")
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")  # safetensors (Rust): "I/O error: No space left on device (os error 28)"
NEARLY_FULL_BYTES = 64 * 2**20
"""A filesystem with less free space than this after a short write is taken to be full."""


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def write_failure(err: BaseException, path: str | Path, tmp: Path | None = None) -> tuple[str, int | None] | None:
    """``(reason, errno)`` if ``err`` is an OS-level failure of a write under ``path`` (an ``OSError`` with an
    error number, a ``SafetensorError`` of an I/O error, torch's error of a short write, a
    :class:`WriteError` from a nested write), else None; files under the temporary ``tmp`` are named relative
    to it. Call it before removing what was written: a short write is judged by the free space left."""
    if isinstance(err, WriteError):
        if tmp is not None and err.path.is_relative_to(tmp) and err.path != tmp:
            return f"{err.reason} (writing {err.path.relative_to(tmp)})", err.errno
        return err.reason, err.errno
    if isinstance(err, OSError) and err.errno is not None:
        name = os.fsdecode(err.filename) if err.filename is not None else None
        if name is not None and tmp is not None and Path(name).is_relative_to(tmp):
            name = Path(name).relative_to(tmp)
        if err.errno in (errno_codes.EEXIST, errno_codes.ENOTDIR) and err.filename is not None:
            full = Path(os.fsdecode(err.filename))
            blocker = next((p for p in (full, *full.parents) if p.is_file()), None)
            if blocker is not None:
                return f"{blocker} is a file where a directory is needed", err.errno
        reason = os.strerror(err.errno)
        if name is not None and str(name) not in (".", str(path)):
            reason += f" ({name})"
        return reason, err.errno
    text = str(err)
    if type(err).__name__ == "SafetensorError" and (code := _OS_ERROR_CODE.search(text)):
        return os.strerror(int(code.group(1))), int(code.group(1))
    if isinstance(err, RuntimeError) and _TORCH_SHORT_WRITE.search(text):
        free = _free_bytes(Path(path))
        detail = f"torch: {text.strip().splitlines()[0][:200]}"
        if free is not None and free < NEARLY_FULL_BYTES:
            return f"{os.strerror(errno_codes.ENOSPC)} (the write stopped part-way, {_size(free)} left)", errno_codes.ENOSPC
        free_text = f"{_size(free)} free on its filesystem" if free is not None else "free space unknown"
        return f"the write stopped part-way ({free_text}; {detail})", None
    return None


def _kept(path: Path, existed: bool) -> str:
    return (f"{path} was left as it was" if existed
            else "nothing was written under that name")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        failure = _as_write_error(err, path, existed)
        if failure is None:
            raise
        raise failure from err
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        failure = _as_write_error(err, path, existed, Path(tmp))
        if os.path.exists(tmp):
            os.unlink(tmp)
        if failure is not None:
            raise failure from err
        raise


@contextmanager
def atomic_directory(path: str | Path):
    """Yield a temporary directory beside ``path`` to fill; on success it replaces ``path`` (an existing
    directory there is removed only after the new one is complete), on error it is removed."""
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as err:
        failure = _as_write_error(err, path, existed)
        if failure is None:
            raise
        raise failure from err
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        replace_directory(tmp, path)
    except BaseException as err:
        failure = _as_write_error(err, path, existed, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure from err
        raise


def _as_write_error(err: BaseException, path: Path, existed: bool, tmp: Path | None = None) -> WriteError | None:
    """``err`` as a :class:`WriteError` about ``path`` if it is an OS-level write failure, else None. A
    :class:`WriteError` of a nested write into the temporary ``tmp`` becomes one about ``path`` (the temporary
    name means nothing to anyone); one about another file is left as it is."""
    if isinstance(err, WriteError) and (tmp is None or not err.path.is_relative_to(tmp)):
        return None
    found = write_failure(err, path, tmp)
    if found is None:
        return None
    reason, code = found
    return WriteError(path, reason, _kept(path, existed), code)


def replace_directory(src: str | Path, dst: str | Path) -> Path:
    """Rename the complete directory ``src`` onto ``dst`` (same filesystem). An existing ``dst`` is moved
    aside first and removed only once ``src`` is in place, so ``dst`` is at every moment either the old
    or the new directory, never a mix (a crash in between leaves the old one in a hidden ``.old`` folder)."""
    src, dst = Path(src), Path(dst)
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
        os.replace(dst, old / dst.name)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:  # put the old one back: dst is never left missing by a failed rename
            os.replace(old / dst.name, dst)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_with(path: str | Path, writer: Callable[[Path], object]) -> Path:
    """Call ``writer(tmp_path)`` (e.g. ``safetensors.torch.save_file`` or ``fig.savefig``) atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def json_safe(obj):
    """Replace non-finite floats (never valid JSON) by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def is_number(value) -> bool:
    """A JSON number: an int or a float, not a bool (``true`` is no number in a config file)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value) -> bool:
    """A JSON integer: an int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def read_json(path: str | Path, what: str = "file"):
    """``json.loads`` of a file, with errors that name the file and what it was meant to be."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path} is not valid JSON: {err}") from None
