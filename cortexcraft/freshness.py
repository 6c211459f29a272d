"""Is the source still what we downloaded? Cheap revalidation of http(s), hub and local sources.

Every pipeline run asks this before the download stage, so an unchanged source costs a HEAD request,
one small hub API call or a ``stat`` per file, and a changed one is noticed:

- http(s): the validators of a HEAD answer (ETag, Last-Modified, Content-Length). A server that
  refuses HEAD or sends no validator gets a conditional GET with the validators seen last time
  (``If-None-Match`` / ``If-Modified-Since``): 304 means unchanged and nothing is transferred; a 200
  without any validator is hashed, the only way left to know.
- hub datasets: the commit sha the revision (branch, tag or sha) resolves to, from the hub API
  (through huggingface_hub, with the user's token).
- local files and directories: the sha256 of every file, re-hashed only when its size, mtime or
  inode differs from the last check (a file modified less than ``RACY_SECONDS`` before it was
  hashed is re-hashed next time too: an edit in the same mtime tick would look unchanged).

Each check remembers what it saw in ``STATE_DIR/<kind>-<key>.json`` under the download cache (the
validators for the next conditional GET, the stat cache), written atomically.
"""
from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cortexcraft import hub
from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import atomic_write_json, read_json, sha256_file, sha256_json

STATE_DIR = "revisions"
TIMEOUT_SECONDS = 5.0
RACY_SECONDS = 2.0
VALIDATORS = ("etag", "last_modified", "content_length")


class SourceUnreachable(CortexCraftError):
    """No server answered: the caller may fall back to the copy it has."""


def revision_id(revision: dict[str, Any]) -> str:
    """Short content address of a revision (what the download cache and stage keys use)."""
    return sha256_json(revision["identity"])[:16]


def state_file(cache_dir: str | os.PathLike, kind: str, key: Any) -> Path:
    return Path(cache_dir) / STATE_DIR / f"{kind}-{sha256_json(key)[:16]}.json"


def read_state(path: Path) -> dict[str, Any]:
    try:
        state = read_json(path)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


# ---------------------------------------------------------------------------------------------
# http(s)


def _open(request: urllib.request.Request):
    """(status, headers, response or None); 3xx-5xx answers are returned, not raised."""
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
        return response.status, response.headers, response
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code, exc.headers, None
    except (urllib.error.URLError, OSError) as exc:
        raise SourceUnreachable(f"cannot reach {request.full_url} ({getattr(exc, 'reason', exc)})") from None


def _validators(headers) -> dict[str, Any]:
    length = headers.get("Content-Length")
    return {"etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified"),
            "content_length": int(length) if length and length.isdigit() else None}


def http_revision(url: str, cache_dir: str | os.PathLike) -> dict[str, Any]:
    """The revision of ``url``: its validators (or body hash), and how they were obtained."""
    path = state_file(cache_dir, "url", url)
    previous = read_state(path).get("identity")
    status, headers, _ = _open(urllib.request.Request(url, method="HEAD"))
    if status < 400 and status != 304:
        found = _validators(headers)
        if found["etag"] or found["last_modified"]:
            return _remember(path, {"kind": "http", "url": url, "identity": found, "checked_by": f"HEAD {status}"})
    elif status not in (405, 501):  # refusing HEAD is fine; anything else is the answer
        raise CortexCraftError(f"{url} answered HTTP {status}; check the URL")

    conditional = {}
    if previous and previous.get("etag"):
        conditional["If-None-Match"] = previous["etag"]
    if previous and previous.get("last_modified"):
        conditional["If-Modified-Since"] = previous["last_modified"]
    status, headers, response = _open(urllib.request.Request(url, headers=conditional))
    if status == 304 and previous:
        return _remember(path, {"kind": "http", "url": url, "identity": previous, "checked_by": "conditional GET 304"})
    if response is None:
        raise CortexCraftError(f"{url} answered HTTP {status}; check the URL")
    with response:
        found = _validators(headers)
        if found["etag"] or found["last_modified"]:
            checked_by = f"GET {status}"
        else:
            digest = hashlib.sha256()
            while chunk := response.read(1 << 20):
                digest.update(chunk)
            found = {"sha256": digest.hexdigest()}
            checked_by = f"GET {status} (no validators: body hashed)"
    return _remember(path, {"kind": "http", "url": url, "identity": found, "checked_by": checked_by})


# ---------------------------------------------------------------------------------------------
# hub


def hub_revision(repo: str, revision: str | None, cache_dir: str | os.PathLike) -> dict[str, Any]:
    """The commit sha that ``repo@revision`` (default main) resolves to, from the hub API with the
    user's token (private and gated datasets included, see ``cortexcraft.hub``)."""
    wanted = revision or "main"
    try:
        sha = hub.commit("dataset", repo, revision)
    except hub.HubUnreachable as exc:
        raise SourceUnreachable(str(exc)) from None
    path = state_file(cache_dir, "hub", [repo, wanted])
    return _remember(path, {"kind": "hub", "repo": repo, "requested": wanted, "identity": {"sha": sha},
                            "checked_by": "hub API"})


# ---------------------------------------------------------------------------------------------
# local files


def local_revision(files: list[Path], spec: str, cache_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Content hashes of ``files``; a file whose size, mtime and inode match the last check is not
    re-read. ``cache_dir`` None: nothing is remembered (every file is hashed)."""
    path = state_file(cache_dir, "local", spec) if cache_dir is not None else None
    known = read_state(path).get("stat", {}) if path is not None else {}
    stat_cache, hashed = {}, 0
    now = time.time()
    for file in files:
        name = str(file.resolve())
        st = file.stat()
        key = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = known.get(name)
        if entry and entry["stat"] == key and not entry["racy"]:
            sha = entry["sha256"]
        else:
            sha, hashed = sha256_file(file), hashed + 1
        stat_cache[name] = {"stat": key, "sha256": sha, "racy": now - st.st_mtime_ns / 1e9 < RACY_SECONDS}
    identity = {"files": [[name, entry["sha256"]] for name, entry in stat_cache.items()]}
    revision = {"kind": "local", "identity": identity, "checked_by": f"stat, {hashed} of {len(files)} files hashed"}
    if path is not None and stat_cache != known:
        atomic_write_json(path, {**revision, "stat": stat_cache})
    return revision


def _remember(path: Path, revision: dict[str, Any]) -> dict[str, Any]:
    if read_state(path) != revision:
        atomic_write_json(path, revision)
    return revision


def remembered(path: Path) -> dict[str, Any] | None:
    """The revision found by the last successful check of this source, if any."""
    state = read_state(path)
    return state if "identity" in state else None
