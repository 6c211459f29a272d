"""Inter-process locks on files: one writer per output, and a dead holder never blocks anyone.

A lock is an exclusive ``flock`` on a small file. The kernel drops it the moment its holder exits,
however it exits (SIGKILL, OOM, power loss: after a reboot nobody holds it), so a waiter takes a
dead holder's lock over at its next poll instead of trusting a timeout. While held, the file
names its holder (pid, host, command, since when) for error messages; the holder removes it on
release. A file left by a dead holder is simply locked again and removed by the next holder.

Removing a lock file while others wait on it is safe: after locking, a holder checks that the
path still names the inode it locked and starts over if it does not.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from cortexcraft.errors import CortexCraftError

POLL_SECONDS = 0.1
NAMING_SECONDS = 1.0


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


class FileLock:
    """An exclusive lock on ``path`` (created on demand). Not re-entrant: one holder per object."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free (or its holder is dead); never waits."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FileLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not _try_flock(fd):
                    os.close(fd)
                    return False
                if _same_file(fd, self.path):
                    break
                # The previous holder removed the file between our open and flock: start over.
                os.close(fd)
            except BaseException:
                os.close(fd)
                raise
        self._fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return True

    def acquire(self, timeout: Optional[float] = None) -> bool:
        """Wait until the lock is ours (``timeout`` None: as long as a live holder keeps it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.try_acquire():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):
                self.path.unlink()
        finally:
            os.close(fd)

    def __enter__(self) -> "FileLock":
        if not self.held:
            self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_holder(path: str | os.PathLike) -> Optional[dict[str, Any]]:
    """Who holds the lock at ``path`` (pid, host, command, since), or None when nobody alive does."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        # A holder writes its name just after locking: give it a moment rather than answer {}.
        deadline = time.monotonic() + NAMING_SECONDS
        while True:
            if _try_flock(fd):  # free: a dead holder's file at most
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None
            try:
                return json.loads(os.pread(fd, 4096, 0))
            except ValueError:
                if time.monotonic() >= deadline:
                    return {}
            time.sleep(0.01)
    finally:
        os.close(fd)


def describe_holder(holder: Optional[dict[str, Any]]) -> str:
    if not holder:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
    return f"pid {holder['pid']} on {holder['host']} (since {since}: {holder['command']})"


class LockBusy(CortexCraftError):
    """Another live process holds the lock."""


def run_dir_lock(run_dir: str | os.PathLike) -> FileLock:
    """The lock of one run directory, kept beside it so the run directory holds only run files."""
    run_dir = Path(run_dir).resolve()
    return FileLock(run_dir.parent / f".{run_dir.name}.lock")


def lock_run_dir(run_dir: str | os.PathLike) -> FileLock:
    """Hold ``run_dir`` for training, or LockBusy naming the live process that trains it."""
    lock = run_dir_lock(run_dir)
    while not lock.try_acquire():
        holder = lock_holder(lock.path)
        if holder is None:  # released between our two looks: try again
            continue
        raise LockBusy(f"run directory {run_dir} is being trained by {describe_holder(holder)}; "
                       f"wait for it to finish or train into another --out")
    return lock
