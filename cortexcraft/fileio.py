"""Atomic file writes and content hashes shared by every stage.

Every temporary file or directory is named ``.<final name>.<random>.tmp`` and is ``flock``ed by its
writer for as long as the writer lives, so ``remove_dead_temps`` can tell the leftovers of a
killed writer (unlocked) from work in progress (locked) and remove only the former.

A full disk (ENOSPC, or a quota: EDQUOT) during any write made through here becomes one
``DiskFullError`` line naming the path, the space the write needed and the space that is free;
the partial file is removed first, so whatever existed before is left intact.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, BinaryIO, Optional

from cortexcraft.errors import CortexCraftError


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


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(CortexCraftError):
    """A write failed because the file system holding its path is full (or over quota)."""


def _free_bytes(path: Path) -> int:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def disk_full_error(path: str | os.PathLike, needed: Optional[int], approximate: bool = False) -> DiskFullError:
    """The one-line error for ``path``, which needs ``needed`` bytes (None: unknown)."""
    path = Path(path)
    need = "" if needed is None else f"{'about ' if approximate else ''}{needed:,} bytes needed, "
    return DiskFullError(f"no space left on the device to write {path}: {need}{_free_bytes(path):,} bytes free; "
                         f"free some space (or write elsewhere) and re-run")


@contextmanager
def disk_full_is_an_error(path: str | os.PathLike, needed: Optional[int] = None, approximate: bool = False,
                          cleanup: Optional[Any] = None) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT raised inside the block into ``disk_full_error``; ``cleanup()`` runs
    first (remove the partial output), so the free space reported is what the user has."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in NO_SPACE_ERRNOS:
            raise
        if cleanup is not None:
            cleanup()
        raise disk_full_error(path, needed, approximate) from None


def ensure_free_space(path: str | os.PathLike, needed: int) -> None:
    """DiskFullError before writing ``needed`` bytes under ``path`` if they cannot fit."""
    if _free_bytes(Path(path)) < needed:
        raise disk_full_error(path, needed)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", size: Optional[int] = None) -> Iterator[BinaryIO]:
    """Open a temp file beside ``path``; on success fsync it and rename it over ``path``.

    On any exception the temp file is removed and ``path`` is left as it was. ``size`` (bytes
    about to be written, when known) goes into the error message if the disk fills up.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    # A second descriptor keeps the writer's lock until the rename, after the file is closed.
    lock_fd = os.dup(fd)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    try:
        with disk_full_is_an_error(path, size, cleanup=lambda: Path(tmp).unlink(missing_ok=True)):
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


def fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory`` and the directories holding them (for trees that a
    library wrote with plain opens, before ``replace_dir`` publishes them)."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb+") as handle:
                os.fsync(handle.fileno())
    for path in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
        fsync_dir(path)


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the finished directory ``tmp`` to ``out_dir``, replacing what was there: the old
    directory is moved aside first and deleted only once the new one is in place."""
    old = None
    if out_dir.exists():
        old = TempDir(out_dir.parent, out_dir.name, kind="old")
        os.replace(out_dir, old.path / out_dir.name)
    os.replace(tmp, out_dir)
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old.path)
        old.close()


@contextmanager
def build_dir(out_dir: str | os.PathLike, needed: Optional[int] = None, approximate: bool = False) -> Iterator[Path]:
    """A locked temp dir beside ``out_dir`` to build it in, renamed over ``out_dir`` when the block
    succeeds and removed when it fails (a full disk then raises ``disk_full_error`` naming
    ``needed`` bytes). Temporaries that dead writers left beside it are removed first."""
    out_dir = Path(out_dir)
    remove_dead_temps(out_dir.parent)
    temp = TempDir(out_dir.parent, out_dir.name)
    try:
        with disk_full_is_an_error(out_dir, needed, approximate,
                                   cleanup=lambda: shutil.rmtree(temp.path, ignore_errors=True)):
            yield temp.path
            replace_dir(temp.path, out_dir)
    except BaseException:
        shutil.rmtree(temp.path, ignore_errors=True)
        raise
    finally:
        temp.close()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb", size=len(data)) as handle:
        handle.write(data)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` in one write. If the disk is full the file is cut back to its old length,
    so a later append never continues a torn line."""
    path = Path(path)
    data = text.encode("utf-8")
    with open(path, "ab") as handle:
        start = handle.tell()
        with disk_full_is_an_error(path, len(data), cleanup=lambda: handle.truncate(start)):
            handle.write(data)
            handle.flush()


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
