"""Exact caching through the command line (slow): `cortexcraft pipeline` run twice on one data
directory with an edit to the project's code in between re-runs only the stages whose code changed
and those after them. The pipeline runs from a copy of the project, so the edit never touches the
repository."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from prefect_server import stage_states, tail
from test_layering import copy_project

pytestmark = pytest.mark.slow

TINY = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=8", "max_iters=20", "warmup_iters=0",
        "eval_interval=10", "eval_iters=2", "checkpoint_interval=10", "max_new_tokens=20", "device=cpu"]
CACHED_STAGES = ("download", "vocab", "shards", "train", "report")


@pytest.fixture
def project(tmp_path: Path, tinyshakespeare_path: Path) -> dict[str, Path]:
    return {"src": copy_project(tmp_path / "src"), "corpus": tinyshakespeare_path, "data": tmp_path / "data",
            "log": tmp_path / "pipeline.log"}


def pipeline(project: dict[str, Path], api_server: dict) -> dict[str, str]:
    """Run `cortexcraft pipeline` (the console script's module) from the copy; its stage states."""
    since = datetime.now(timezone.utc).isoformat()
    env = {**api_server["env"], "PYTHONPATH": str(project["src"])}
    command = [sys.executable, "-m", "flows", "pipeline", "--source", str(project["corpus"]),
               "--data-dir", str(project["data"]), *(f"--set={o}" for o in TINY)]
    with open(project["log"], "w") as log:
        code = subprocess.run(command, cwd=project["src"], env=env, stdout=log, stderr=subprocess.STDOUT,
                              timeout=300).returncode
    assert code == 0, tail(project["log"])
    (states,) = stage_states(api_server["api"], since).values()
    return {stage: states[stage] for stage in CACHED_STAGES}


def edit(path: Path) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\nEDITED_BY_TEST = True\n")


def test_an_edit_to_the_report_code_reruns_only_the_report(project, api_server):
    assert set(pipeline(project, api_server).values()) == {"Completed"}
    # Each evaluation reaches the console once (the task used to log it again).
    log = project["log"].read_text()
    assert [log.count(f"step {step}/20: train loss") for step in (0, 10, 20)] == [1, 1, 1], log[-3000:]
    assert pipeline(project, api_server) == dict.fromkeys(CACHED_STAGES, "Cached")
    edit(project["src"] / "cortexcraft" / "report.py")
    assert pipeline(project, api_server) == {**dict.fromkeys(CACHED_STAGES, "Cached"), "report": "Completed"}


def test_an_edit_to_the_training_code_leaves_the_data_stages_cached(project, api_server):
    pipeline(project, api_server)
    edit(project["src"] / "cortexcraft" / "train.py")
    assert pipeline(project, api_server) == {"download": "Cached", "vocab": "Cached", "shards": "Cached",
                                             "train": "Completed", "report": "Completed"}
    assert len(os.listdir(project["data"] / "runs")) == 2  # the run of the edited code is a new one
