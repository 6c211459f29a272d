"""Atomic file writes and content hashes shared by every stage.

Every temporary file or directory is named ``.<final name>.<random>.tmp`` and is ``flock``ed by its
writer for as long as the writer lives, so ``remove_dead_temps`` can tell the leftovers of a
killed writer (unlocked) from work in progress (locked) and remove only the former.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, BinaryIO


# Read once at import: os.umask can only be read by setting it, which other threads could see.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
DEFAULT_FILE_MODE = 0o666 & ~_UMASK
TEMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temp file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    # A second descriptor keeps the writer's lock until the rename, after the file is closed.
    lock_fd = os.dup(fd)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; outputs should get the permissions a plain open() gives.
        os.chmod(tmp, DEFAULT_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(lock_fd)
    fsync_dir(path.parent)


class TempDir:
    """``parent/.<name>.<random>[.<kind>].tmp``, locked by this process until ``close`` (or its death).

    Build a directory here and rename it into place; ``close`` after the rename or removal."""

    def __init__(self, parent: str | os.PathLike, name: str, kind: str = ""):
        parent = Path(parent)
        parent.mkdir(parents=True, exist_ok=True)
        suffix = f".{kind}{TEMP_SUFFIX}" if kind else TEMP_SUFFIX
        self.path = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=suffix, dir=parent))
        self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.path.chmod(0o755)  # mkdtemp makes it private; the finished directory should not be

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def remove_dead_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories in ``directory`` whose writer is gone (killed,
    crashed, rebooted); a live writer's are locked and stay. Returns what was removed."""
    directory = Path(directory)
    try:
        entries = [p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX)]
    except FileNotFoundError:
        return []
    removed = []
    for path in entries:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
