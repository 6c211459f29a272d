"""Shared fixtures. The real Tiny Shakespeare comes from one place: $CORTEXCRAFT_SHARED_DATA
(default ../shared/data beside the repository); tests that need it skip with a reason if absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Library loggers outside a flow run (plain library tests in a process that imported Prefect) should
# not warn that they cannot reach the API.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


@pytest.fixture(scope="session", autouse=True)
def calibration_cache(tmp_path_factory):
    """dtype=auto measures matmuls once per machine and caches the answer: in tests, in a tmp dir
    (subprocesses inherit it), never in the user's ~/.cache."""
    os.environ["CORTEXCRAFT_CACHE_DIR"] = str(tmp_path_factory.mktemp("cortexcraft-cache"))
    yield

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CORTEXCRAFT_SHARED_DATA", REPO.parent / "shared" / "data"))


def _shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} not found; set CORTEXCRAFT_SHARED_DATA to the folder holding {relative}")
    return path


@pytest.fixture(scope="session")
def tinyshakespeare_path() -> Path:
    return _shared_file("tinyshakespeare/input.txt")


@pytest.fixture(scope="session")
def openwebtext_vocab_path() -> Path:
    return _shared_file("openwebtext-vocab/vocab.txt")


@pytest.fixture(scope="module")
def temporary_prefect_server(tmp_path_factory):
    """A temporary Prefect server and database for the module's flow runs (PREFECT_HOME in a temp dir)."""
    from prefect.settings import PREFECT_HOME, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with temporary_settings({PREFECT_HOME: tmp_path_factory.mktemp("prefect-home")}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


@pytest.fixture(scope="session")
def api_server(tmp_path_factory):
    """One `prefect server start` for the tests that run several `cortexcraft pipeline` processes
    against it (PREFECT_API_URL in their env); stopped at the end of the session."""
    from prefect_server import prefect_server

    tmp = tmp_path_factory.mktemp("api-server")
    with prefect_server(tmp / "prefect-home", tmp / "server.log") as env:
        yield {"env": env, "api": env["PREFECT_API_URL"]}


# For models this small one thread is fastest (see tiny_runs.ONE_THREAD_ENV).
@pytest.fixture(scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
