"""What every stage task shares: content-addressed output directories, a cache key over input
content + config + code, and an on-disk record that lets the flow check a cached result.

A stage's key is the sha256 of (stage name, the content hashes of its inputs, its config, the
source of the code it runs). Its outputs live in ``DATA_DIR/<stage dir>/<key>/`` (e.g.
``runs/<key>`` for train) beside a ``stage.json`` record (files with sizes and sha256) that is also
the task's result. Prefect's cache record for the key lives in ``DATA_DIR/.prefect-results``, so it
travels with the data, not with ``~/.prefect``. Prefect cannot see that an output was deleted
after the record was written, so ``run_stage`` checks ``stage.json`` against the files first and
drops the cache record if it fails.

One writer per stage output: every stage task runs as a SERIALIZABLE transaction over its cache
key, locked by ``StageLockManager`` (``DATA_DIR/.locks/<key>.lock``, released by the kernel when
its holder dies, see ``cortexcraft.locks``). Pipelines that need the same output wait for the
one computing it and come out Cached; pipelines that need different outputs run side by side.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from prefect import Task, get_run_logger
from prefect.cache_policies import CachePolicy
from prefect.locking.protocol import LockManager
from prefect.states import State
from prefect.transactions import IsolationLevel

from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import atomic_write_json, read_json, remove_dead_temps, sha256_file, sha256_json
from cortexcraft.locks import FileLock, describe_holder, lock_holder

STAGES = ("download", "vocab", "shards", "train", "report")
# Directory under DATA_DIR holding each stage's keyed outputs.
STAGE_DIRS = {
    "download": "corpus",
    "vocab": "vocab",
    "shards": "shards",
    "train": "runs",
    "report": "reports",
    "count-part": "parts",
    "encode-part": "parts",
}
RECORD_NAME = "stage.json"
KEY_CHARS = 20
_OWN_PACKAGES = ("cortexcraft", "tasks")


def results_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir).resolve() / ".prefect-results"


def stage_dir(data_dir: str | os.PathLike, stage: str, key: str) -> Path:
    return Path(data_dir).resolve() / STAGE_DIRS[stage] / key


def _module_file(name: str) -> Path | None:
    """Source file of a project module, found without importing it (or its parents) so that a
    cached run never pays for importing torch."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(list(spec.submodule_search_locations)[0]).joinpath(*rest)
    candidates = ([base.with_suffix(".py")] if rest else []) + [base / "__init__.py"]
    return next((c for c in candidates if c.is_file()), None)


@lru_cache(maxsize=None)
def _source_info(name: str) -> tuple[str, frozenset[str]] | None:
    """(sha256 of the code, project modules it imports) of module ``name``, None if not ours. The
    code is the parsed syntax tree, so comments, blank lines and line wrapping change no key."""
    path = _module_file(name)
    if path is None:
        return None
    tree = ast.parse(path.read_bytes())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from package import module` imports that module; the package's own code counts only
            # where a name defined in it is imported (as for `from package.module import name`).
            submodules = {f"{node.module}.{alias.name}" for alias in node.names}
            names.update({m for m in submodules if _module_file(m) is not None} or {node.module})
    own = frozenset(n for n in names if n.split(".")[0] in _OWN_PACKAGES)
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest(), own


def code_modules(module: str) -> dict[str, str]:
    """``module`` and every project module it imports, transitively (lazy imports inside functions
    included), each with the sha256 of its code: what a stage whose task is ``module`` runs."""
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or (info := _source_info(name)) is None:
            continue
        seen[name], imports = info
        todo.extend(imports)
    return seen


def code_version(module: str) -> str:
    return sha256_json(code_modules(module))


def file_digest(path: str) -> str:
    """Content hash of a local file, or a marker the library will turn into a clear error."""
    try:
        return sha256_file(path)
    except OSError:
        return f"unreadable:{path}"


# Files of a transformers model directory that hold weights, not the tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


def pretrained_digest(init_from: str | None, weights: bool = True) -> list[str]:
    """Cache-key inputs for a pretrained model: the content of a local ``hf:DIR`` (without the
    weight files when ``weights`` is false: all a tokenizer depends on), or the commit a hub
    reference resolves to now (so a new commit on its branch re-runs the stages that use it)."""
    if not init_from:
        return []
    from cortexcraft.config import pretrained_reference
    from cortexcraft.hub import hub_model_reference, model_commit

    ref = pretrained_reference(init_from)
    directory = Path(ref).expanduser()
    if not directory.is_dir():
        reference = hub_model_reference(ref)
        # Anything else is neither: the library names the problem when the stage runs.
        return [f"hf:{reference[0]}@{model_commit(*reference)}" if reference else init_from]
    files = sorted(p for p in directory.rglob("*") if p.is_file() and (weights or p.suffix not in WEIGHT_SUFFIXES))
    return [sha256_json([[p.relative_to(directory).as_posix(), sha256_file(p)] for p in files])]


def stage_key(stage: str, inputs: Iterable[str], config: Any) -> str:
    """The content address of a stage: what it reads, how it is configured, and its code."""
    payload = {"stage": stage, "inputs": list(inputs), "config": config, "code": code_version(f"tasks.{stage}")}
    return sha256_json(payload)[:KEY_CHARS]


def cache_key(stage: str, key: str) -> str:
    return f"{stage}-{key}"


def _file_entry(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}


def _relative(path: Path, data_dir: Path) -> str:
    path = path.resolve()
    return path.relative_to(data_dir).as_posix() if path.is_relative_to(data_dir) else str(path)


def write_record(
    data_dir: str | os.PathLike, stage: str, key: str, files: Iterable[Path], **extra: Any
) -> dict[str, Any]:
    """Hash ``files`` and save the stage record; its ``content`` hash is what later stages key on."""
    data_dir = Path(data_dir).resolve()
    entries = {_relative(Path(f), data_dir): _file_entry(Path(f)) for f in sorted(set(files))}
    record = {
        "stage": stage,
        "key": key,
        "dir": _relative(stage_dir(data_dir, stage, key), data_dir),
        "files": entries,
        # Content only: rewriting byte-identical outputs must not invalidate later stages.
        "content": sha256_json({name: e["sha256"] for name, e in entries.items()}),
        **extra,
    }
    atomic_write_json(stage_dir(data_dir, stage, key) / RECORD_NAME, record)
    return record


def files_under(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and p.name != RECORD_NAME and not p.name.endswith(".tmp")]


def valid_record(data_dir: str | os.PathLike, stage: str, key: str) -> dict[str, Any] | None:
    """The saved record if every file it lists is still there with the same content, else None.

    Size and mtime unchanged means unchanged; otherwise the file is re-hashed, so touching a file
    costs a hash but a rewrite with different bytes is always caught.
    """
    data_dir = Path(data_dir).resolve()
    path = stage_dir(data_dir, stage, key) / RECORD_NAME
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return None
    for name, entry in record.get("files", {}).items():
        file = data_dir / name
        try:
            stat = file.stat()
        except OSError:
            return None
        if stat.st_size != entry["bytes"]:
            return None
        if stat.st_mtime_ns != entry["mtime_ns"] and sha256_file(file) != entry["sha256"]:
            return None
    return record


def resolve(data_dir: str | os.PathLike, name: str) -> Path:
    """A path from a record: relative to the data directory unless it was outside it."""
    return Path(data_dir).resolve() / name


def locks_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir).resolve() / ".locks"


class StageLockManager(LockManager):
    """Prefect's lock manager protocol over ``cortexcraft.locks.FileLock``: one lock file per key
    in one directory, waited for as long as a live process holds it and taken over the moment
    that process dies (Prefect's FileSystemLockManager never expires a dead holder's lock)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self._held: dict[str, tuple[str, FileLock]] = {}

    def __deepcopy__(self, memo: dict) -> "StageLockManager":
        # Prefect copies cache policies; a copy must still know which locks this process holds.
        return self

    def _lock(self, key: str) -> FileLock:
        # Keys are "<stage>-<hex key>": safe file names, and never suffix-mangled.
        return FileLock(self.directory / f"{key}.lock")

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        if key in self._held and self._held[key][0] == holder:
            return True
        lock = self._lock(key)  # another holder in this process too: flock makes it wait its turn
        if not lock.acquire(timeout=acquire_timeout):
            return False
        self._held[key] = (holder, lock)
        return True

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        if not self.is_lock_holder(key, holder):
            raise ValueError(f"no lock held by {holder} for transaction with key {key}")
        self._held.pop(key)[1].release()

    def is_locked(self, key: str) -> bool:
        return key in self._held or lock_holder(self.directory / f"{key}.lock") is not None

    def is_lock_holder(self, key: str, holder: str) -> bool:
        return key in self._held and self._held[key][0] == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        probe = self._lock(key)
        if not probe.acquire(timeout=timeout):
            return False
        probe.release()
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        return self.wait_for_lock(key, timeout)


_LOCK_MANAGERS: dict[Path, StageLockManager] = {}


def stage_lock_manager(data_dir: str | os.PathLike) -> StageLockManager:
    """The one lock manager of this process for ``data_dir``'s stage locks."""
    directory = locks_dir(data_dir)
    return _LOCK_MANAGERS.setdefault(directory, StageLockManager(directory))


def discard_stale_outputs(data_dir: str | os.PathLike, stage: str, key: str, forced: bool = False) -> None:
    """Under the stage's lock (so no writer is half-way): remove what killed writers left behind
    and, unless the stage is forced anyway, drop a cache record whose outputs are missing or
    changed, so that the stage computes again."""
    lock = FileLock(locks_dir(data_dir) / f"{cache_key(stage, key)}.lock")
    if not lock.try_acquire():
        get_run_logger().info("waiting for %s, which %s is computing", stage, describe_holder(lock_holder(lock.path)))
    with lock:
        cache_record = results_dir(data_dir) / cache_key(stage, key)
        # Prefect writes its record in place: one torn by a kill must not count as a cache hit.
        if not forced and (valid_record(data_dir, stage, key) is None or not _is_json(cache_record)):
            cache_record.unlink(missing_ok=True)
        out_dir = stage_dir(data_dir, stage, key)
        remove_dead_temps(out_dir)
        remove_dead_temps(out_dir.parent)


def _is_json(path: Path) -> bool:
    try:
        read_json(path)
    except (OSError, ValueError):
        return False
    return True


def run_stage(task: Task, key: str, refresh: Iterable[str], **parameters: Any) -> dict[str, Any]:
    """Call a stage task (named after its stage) with the project's result storage and its lock.

    The task is Cached when its record exists and its outputs are intact; it recomputes when
    forced (``refresh``) or when the outputs behind the record are missing or changed."""
    data_dir, stage = parameters["data_dir"], task.name
    forced = stage in refresh
    discard_stale_outputs(data_dir, stage, key, forced)
    policy = locked_cache_policy(data_dir, lambda *_: cache_key(stage, key))
    configured = task.with_options(cache_policy=policy, result_storage=results_dir(data_dir), refresh_cache=forced)
    return configured(**parameters)


def locked_cache_policy(data_dir: str | os.PathLike, key_fn: Callable[[Any, dict[str, Any]], str]) -> CachePolicy:
    """Caching on ``key_fn``'s key as a SERIALIZABLE transaction under the stage locks of
    ``data_dir``: of two runs with one key, the second waits for the first and comes out Cached."""
    return CachePolicy.from_cache_key_fn(key_fn).configure(
        isolation_level=IsolationLevel.SERIALIZABLE, lock_manager=stage_lock_manager(data_dir)
    )


def retry_unless_user_error(task: Task, task_run: Any, state: State) -> bool:
    """Retry crashes and transient failures, never a CortexCraftError (bad input stays bad)."""
    try:
        state.result()
    except CortexCraftError:
        return False
    except Exception:
        return True
    return True
