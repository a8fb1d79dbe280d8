"""One run per output directory: a lock file in the directory names the run that holds it.

``<output_dir>/.opentrans-hf.lock`` holds the holder's pid, host, job and start time, and the holder
keeps an exclusive ``flock`` on it for as long as it runs (the kernel drops it when the process dies,
however it dies). A second run on the same directory fails at once with :class:`OutputDirLocked`
naming the holder. A lock file left by a process of this host that is gone is taken over with a
:class:`StaleLockWarning`; one left by another host is never taken over (its process cannot be checked
from here): the error says which file to delete once that run is known to be gone.

Locks are per directory and re-entrant within a process, so a job holding its directory can run
sub-jobs in subdirectories (the demo) or in the same directory. Under Accelerate only the main process
takes the lock; the others wait for the outcome and fail with it (:func:`output_dir_lock`).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from opentrans_hf.utils.distributed import on_main_process

LOCK_NAME = ".opentrans-hf.lock"


class OutputDirLocked(RuntimeError):
    """Another run holds the output directory."""


class StaleLockWarning(UserWarning):
    """A lock left by a run that is gone was taken over."""


_registry_lock = threading.Lock()
_held: dict[str, "OutputDirLock"] = {}  # real path of the directory -> the lock this process holds


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process (its lock file is still being written)"
    text = f"pid {holder.get('pid')} on host {holder.get('host')}"
    if holder.get("command"):
        text += f" (opentrans-hf {holder['command']}"
        text += f", since {holder['started']})" if holder.get("started") else ")"
    return text


class OutputDirLock:
    """The lock of one output directory. ``acquire()`` raises :class:`OutputDirLocked` if another live run
    holds it; ``release()`` removes the lock file. Prefer :func:`output_dir_lock`."""

    def __init__(self, directory: str | Path, command: str | None = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.command = command
        self._fd: int | None = None
        self._count = 0
        self._created = False  # the directory did not exist: removed again on release if still empty

    # -- the lock file ----------------------------------------------------------------------------
    @staticmethod
    def _read(fd_or_path) -> dict | None:
        try:
            if isinstance(fd_or_path, int):
                os.lseek(fd_or_path, 0, os.SEEK_SET)
                raw = os.read(fd_or_path, 65536)
            else:
                raw = Path(fd_or_path).read_bytes()
            holder = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _refuse(self, holder: dict | None, hint: str = "") -> OutputDirLocked:
        return OutputDirLocked(
            f"output directory {self.directory} is in use by {_describe(holder)}: one run per output directory; "
            f"wait for it to finish or choose another --output_dir{hint}")

    def _open_locked(self) -> tuple[int, bool]:
        """Open the lock file and take its flock; returns ``(fd, flock_works)``."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise self._refuse(holder) from None
            except (ImportError, OSError) as err:  # no flock here (some network filesystems): pid check only
                if isinstance(err, OSError) and err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS,
                                                                  errno.EINVAL):
                    os.close(fd)
                    raise
                return fd, False
            # a holder that releases unlinks the file before closing it: make sure ours is the live one
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd, True
            os.close(fd)

    def acquire(self) -> "OutputDirLock":
        if self._count:
            self._count += 1
            return self
        self._created = not self.directory.exists()
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            fd, flock_works = self._open_locked()
        except BaseException:
            self._remove_if_created()
            raise
        try:
            previous = self._read(fd)
            host = socket.gethostname()
            if previous and (previous.get("host"), previous.get("pid")) != (host, os.getpid()):
                if previous.get("host") != host:
                    raise self._refuse(previous, f"; if that run is gone, delete {self.path}")
                pid = previous.get("pid")
                alive = isinstance(pid, int) and _pid_alive(pid)
                if alive and not flock_works:
                    raise self._refuse(previous)
                state = "no longer holds it" if alive else "is no longer running"
                warnings.warn(f"taking over the lock of {self.directory} left by {_describe(previous)}, which "
                              f"{state}", StaleLockWarning, stacklevel=3)
            record = {"pid": os.getpid(), "host": host, "command": self.command,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._count = fd, 1
        return self

    def release(self) -> None:
        if not self._count:
            return
        self._count -= 1
        if self._count:
            return
        try:
            os.unlink(self.path)  # before closing: a process waiting on this file sees it is gone and retries
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None
            self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self._created:
            try:
                self.directory.rmdir()  # only if empty: nothing was written there
            except OSError:
                pass


def acquire(directory: str | Path, command: str | None = None) -> OutputDirLock:
    """Take the lock of ``directory`` (re-entrant: a process that holds it just counts once more)."""
    key = os.path.realpath(directory)
    with _registry_lock:
        lock = _held.get(key) or OutputDirLock(directory, command)
        lock.acquire()
        _held[key] = lock
        return lock


def release(lock: OutputDirLock) -> None:
    key = os.path.realpath(lock.directory)
    with _registry_lock:
        lock.release()
        if not lock._count:
            _held.pop(key, None)


@contextmanager
def output_dir_lock(directory: str | Path, state=None, command: str | None = None):
    """Hold the lock of ``directory`` for the ``with`` block, and release it at its end, also on errors.

    ``state`` (an ``Accelerator`` or ``PartialState``; None: one process): only the main process takes the
    lock; the others wait for the outcome, so when the directory is in use every process fails together.
    """
    held = on_main_process(state, lambda: acquire(directory, command))
    try:
        yield held
    finally:
        if held is not None:
            release(held)
