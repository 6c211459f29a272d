"""One writer per stage output (slow): three `cortexcraft pipeline` processes started at the same
moment on one data directory, two alike and one with another model, all complete; every data stage
is computed by exactly one of them (the others wait for it and come out Cached), the shared run is
trained by one process, and the other model trains beside it."""
from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest

from cortexcraft.metrics import read_metrics
from prefect_server import REPO, api_post, stage_states, tail
from tasks.stage import STAGES

pytestmark = pytest.mark.slow

TINY = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=8", "max_iters=150", "warmup_iters=0",
        "eval_interval=25", "eval_iters=2", "checkpoint_interval=25", "max_new_tokens=20", "device=cpu"]


def run_at_once(commands: list[list[str]], logs: list, env: dict[str, str]) -> None:
    """Start every command at the same moment, each logging to its file; all must exit 0."""
    procs = []
    for command, log in zip(commands, logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0] * len(commands), "\n\n".join(tail(log) for log in logs)


def test_three_pipelines_at_once_compute_each_output_once(api_server, tmp_path, tinyshakespeare_path):
    data = tmp_path / "data"
    base = [sys.executable, "-m", "flows", "pipeline", "--source", str(tinyshakespeare_path),
            "--data-dir", str(data), *(f"--set={o}" for o in TINY)]
    commands = [base, base, base + ["--set=n_embd=48"]]
    since = datetime.now(timezone.utc).isoformat()
    logs = [tmp_path / f"pipeline-{i}.log" for i in range(3)]
    t0 = time.monotonic()
    run_at_once(commands, logs, api_server["env"])
    took = time.monotonic() - t0

    states = list(stage_states(api_server["api"], since).values())
    assert len(states) == 3
    for stage in ("download", "vocab", "shards"):
        assert sorted(s[stage] for s in states) == ["Cached", "Cached", "Completed"], (stage, states)
    alike = [s for s in states if "n_embd=48" not in s["overrides"]]
    other = [s for s in states if "n_embd=48" in s["overrides"]]
    assert sorted(s["train"] for s in alike) == ["Cached", "Completed"] and other[0]["train"] == "Completed"
    assert sorted(s["report"] for s in alike) == ["Cached", "Completed"] and other[0]["report"] == "Completed"
    assert set(states[0]) == set(STAGES) | {"revalidate", "register", "overrides"}
    # Never cached: they read the source and the registry.
    assert [(s["revalidate"], s["register"]) for s in states] == [("Completed", "Completed")] * 3
    # The identical pair registered one version between them; the other model the second.
    versions = sorted(p.name for p in (data / "models" / "cpu" / "versions").iterdir() if not p.name.startswith("."))
    assert versions == ["v1", "v2"]

    runs = sorted((data / "runs").glob("*"))
    assert len(runs) == 2
    for run in runs:
        # One trainer per run directory: every evaluation appears once, in order.
        assert [r["step"] for r in read_metrics(run)] == list(range(0, 151, 25))
    assert not list((data / ".locks").glob("*.lock"))
    print(f"\nthree pipelines on one data dir finished in {took:.1f} s; each data stage computed once")


PREPARE_IN_PARTS = """
import sys
from flows.params import PipelineParams
from flows.prepare import prepare
prepare(PipelineParams(source=sys.argv[1], data_dir=sys.argv[2], workers=2, part_mb=0.1))
"""


def test_two_preparations_in_parts_at_once_count_and_encode_each_part_once(api_server, tmp_path, tinyshakespeare_path):
    data = tmp_path / "data"
    since = datetime.now(timezone.utc).isoformat()
    logs = [tmp_path / f"prepare-{i}.log" for i in range(2)]
    command = [sys.executable, "-c", PREPARE_IN_PARTS, str(tinyshakespeare_path), str(data)]
    run_at_once([command] * len(logs), logs, api_server["env"])

    runs = api_post(api_server["api"], "/flow_runs/filter", {"flow_runs": {"start_time": {"after_": since}}})
    task_runs = api_post(api_server["api"], "/task_runs/filter",
                         {"flow_runs": {"id": {"any_": [r["id"] for r in runs]}}})
    states: dict[str, list[str]] = {}
    for task_run in task_runs:
        if task_run["name"].startswith(("count-part-", "encode-part-")):
            states.setdefault(task_run["name"], []).append(task_run["state"]["name"])
    counted = {name for name in states if name.startswith("count-part-")}
    assert len(counted) >= 10 and set(states) - counted == {name.replace("count", "encode") for name in counted}
    # Each part computed by one pipeline; the other, when it needed the part too, waited and found it done.
    assert all(sorted(s) in (["Completed"], ["Cached", "Completed"]) for s in states.values()), sorted(states.items())
    if not any(len(s) == 2 for s in states.values()):
        # On a quiet machine one preparation may finish every part before the other needs one.
        pytest.skip("the two preparations never needed a part at the same time on this run")
