"""The Hugging Face hub through huggingface_hub, always with the user's token.

The token is huggingface_hub's own choice (``get_token``): ``HF_TOKEN``, else the one saved by
``hf auth login``. With it private and gated (once access is granted) datasets and models resolve
and download like public ones; without it the hub answers as if they did not exist, which becomes
one line naming ``HF_TOKEN``. ``HF_ENDPOINT`` picks another hub (a mirror, or a test server).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from cortexcraft.errors import CortexCraftError

RepoKind = Literal["dataset", "model"]
TIMEOUT_SECONDS = 5.0
LOGIN_HINT = "set HF_TOKEN to a token that can read it (or run `hf auth login`)"


class HubUnreachable(CortexCraftError):
    """No hub answered (or offline mode is on): a caller may fall back to what it has."""


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_token() -> Optional[str]:
    """The user's token as huggingface_hub finds it (HF_TOKEN, then `hf auth login`'s), or None."""
    from huggingface_hub import get_token

    return get_token()


def hub_model_reference(ref: str) -> Optional[tuple[str, Optional[str]]]:
    """(OWNER/NAME, revision or None) when ``ref`` (what follows ``hf:`` in ``init_from``) names a
    hub model; None for anything that is, or looks like, a local path."""
    if ref.startswith(("/", ".", "~")) or Path(ref).expanduser().exists():
        return None
    repo, _, revision = ref.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        return None
    return repo, revision or None


def access_problem(kind: RepoKind, repo: str, revision: str, exc: Exception, token: Optional[str]) -> CortexCraftError:
    """One line for a refusal by the hub, naming what to do about the token."""
    from huggingface_hub.errors import GatedRepoError, RevisionNotFoundError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, RevisionNotFoundError):
        return CortexCraftError(f"the hub's {kind} {repo} has no revision {revision!r} (HTTP {status}); "
                                f"check the revision (a branch, tag or commit sha)")
    if isinstance(exc, GatedRepoError):
        if token is None:
            return CortexCraftError(
                f"the hub's {kind} {repo} is gated and no token is set (HTTP {status}); {LOGIN_HINT}, "
                f"for an account that was granted access on {hub_endpoint()}/{_page(kind, repo)}"
            )
        return CortexCraftError(
            f"the hub's {kind} {repo} is gated and your token (HF_TOKEN or `hf auth login`) has no "
            f"access (HTTP {status}); request it on {hub_endpoint()}/{_page(kind, repo)}"
        )
    if status in (401, 403, 404):
        fix = (
            f"check the id and revision, or, if it is private or gated, {LOGIN_HINT}"
            if token is None
            else "check the id and revision, and that your token (HF_TOKEN or `hf auth login`) can read it"
        )
        return CortexCraftError(f"the hub has no {kind} {repo} at revision {revision!r} (HTTP {status}); {fix}")
    return CortexCraftError(
        f"the hub refused {kind} {repo}@{revision} (HTTP {status}: {_first_line(exc)}); check HF_ENDPOINT and retry"
    )


def _page(kind: RepoKind, repo: str) -> str:
    return f"datasets/{repo}" if kind == "dataset" else repo


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def commit(kind: RepoKind, repo: str, revision: Optional[str]) -> str:
    """The commit sha that ``repo@revision`` (default main) resolves to now, asked with the
    user's token. HubUnreachable when no hub answers; a CortexCraftError when it refuses."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = hub_token()
    api = HfApi(endpoint=hub_endpoint(), token=token)
    info = api.dataset_info if kind == "dataset" else api.model_info
    try:
        sha = info(repo, revision=revision or "main", timeout=TIMEOUT_SECONDS).sha
    except HfHubHTTPError as exc:
        raise access_problem(kind, repo, revision or "main", exc, token) from None
    except OfflineModeIsEnabled:
        raise HubUnreachable("HF_HUB_OFFLINE is set") from None
    # No answer at all: huggingface_hub's HTTP client raises its transport errors (and OSError,
    # TimeoutError) for refused connections, DNS failures and timeouts.
    except Exception as exc:  # noqa: BLE001
        raise HubUnreachable(f"cannot reach {hub_endpoint()} ({type(exc).__name__}: {_first_line(exc)})") from None
    if not sha:
        raise CortexCraftError(
            f"the hub's answer for {kind} {repo}@{revision or 'main'} has no commit sha; check HF_ENDPOINT"
        )
    return sha


MODEL_FILES = ["*.json", "*.safetensors", "*.txt"]


def cached_model_commit(repo: str, revision: Optional[str]) -> Optional[str]:
    """The commit of the copy of ``repo@revision`` in huggingface_hub's cache, if one was downloaded."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES, local_files_only=True)
    except Exception:  # noqa: BLE001 -- any failure means: no usable cached copy
        return None
    return Path(path).name  # the cache keeps a snapshot per commit, named by its sha


def model_commit(repo: str, revision: Optional[str]) -> str:
    """The commit a hub model reference resolves to: asked from the hub, or, when none answers,
    the commit of the copy downloaded before (a CortexCraftError when there is none)."""
    try:
        return commit("model", repo, revision)
    except HubUnreachable as exc:
        cached = cached_model_commit(repo, revision)
        if cached is None:
            raise CortexCraftError(
                f"cannot fetch {repo} from the Hugging Face hub ({exc}; no copy of "
                f"{repo}@{revision or 'main'} was downloaded before); save it with save_pretrained "
                f"where the hub is reachable and pass hf:/path/to/dir"
            ) from None
        return cached


def download_model(repo: str, revision: Optional[str], sha: str) -> Path:
    """The files of ``repo`` at commit ``sha``, which ``revision`` resolved to (weights as
    safetensors, configs, tokenizer files): from huggingface_hub's cache or downloaded into it with
    the user's token. Asked by the revision's name, so that the cache remembers which commit it
    named (``cached_model_commit`` needs that without a hub)."""
    from huggingface_hub import snapshot_download

    def fetch(wanted: str) -> Path:
        return Path(
            snapshot_download(
                repo, revision=wanted, allow_patterns=MODEL_FILES, token=hub_token(), endpoint=hub_endpoint()
            )
        )

    path = fetch(revision or "main")
    # Pushed to between resolving and downloading: the commit resolved first is the one keyed.
    return path if path.name == sha else fetch(sha)
