"""Shared fixtures. The real Tiny Shakespeare comes from one place: $CORTEXCRAFT_SHARED_DATA
(default ../shared/data beside the repository); tests that need it skip with a reason if absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Library loggers outside a flow run (plain library tests in a process that imported Prefect) should
# not warn that they cannot reach the API.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("CORTEXCRAFT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}; set CORTEXCRAFT_SHARED_DATA to the folder holding tinyshakespeare/input.txt")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tinyshakespeare_path(shared_data: Path) -> Path:
    path = shared_data / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found; set CORTEXCRAFT_SHARED_DATA to the folder holding tinyshakespeare/input.txt")
    return path


@pytest.fixture(scope="session")
def openwebtext_vocab_path(shared_data: Path) -> Path:
    path = shared_data / "openwebtext-vocab" / "vocab.txt"
    if not path.is_file():
        pytest.skip(f"{path} not found; set CORTEXCRAFT_SHARED_DATA to the folder holding openwebtext-vocab/vocab.txt")
    return path
