"""The basic-auth setup of docs/operations.md (slow): a server started with
PREFECT_SERVER_API_AUTH_STRING refuses clients without PREFECT_API_AUTH_STRING (401), and with it
`prefect deploy`, a process worker, a deployment run and `cortexcraft pipeline` all work."""
from __future__ import annotations

import json
import subprocess
import sys
from contextlib import ExitStack

import httpx
import pytest

from prefect_server import (POOL, REPO, TINY_OVERRIDES, api_get, prefect, prefect_server, run_deployment, start, stop,
                            tail, wait_for_flow_run)

pytestmark = pytest.mark.slow

CREDENTIALS = ("admin", "correct-horse-battery")
AUTH_STRING = ":".join(CREDENTIALS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    with prefect_server(tmp / "prefect-home", tmp / "server.log", PREFECT_SERVER_API_AUTH_STRING=AUTH_STRING) as env:
        yield {"tmp": tmp, "api": env["PREFECT_API_URL"], "anonymous": env,
               "client": {**env, "PREFECT_API_AUTH_STRING": AUTH_STRING}}


def test_without_or_with_wrong_credentials_the_api_answers_401(server):
    api = server["api"]
    assert httpx.post(f"{api}/flow_runs/filter", timeout=5).status_code == 401
    assert httpx.post(f"{api}/flow_runs/filter", timeout=5, auth=("admin", "wrong")).status_code == 401
    assert httpx.post(f"{api}/flow_runs/filter", timeout=5, auth=CREDENTIALS).status_code == 200
    refused = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "ls"], cwd=REPO, env=server["anonymous"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr


def test_deploy_worker_deployment_run_and_cli_work_with_credentials(server, tinyshakespeare_path):
    env, api, tmp = server["client"], server["api"], server["tmp"]
    worker_log = tmp / "worker.log"
    prefect(env, "work-pool", "create", POOL, "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--all")
    with ExitStack() as cleanup:
        worker = start([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL], env, worker_log)
        cleanup.callback(stop, worker, 2)
        params = {"source": str(tinyshakespeare_path), "data_dir": str(tmp / "data"), "overrides": TINY_OVERRIDES}
        run_id = run_deployment(env, "pipeline/pipeline-on-demand", {"params": params})
        run = wait_for_flow_run(api, run_id, worker_log, auth=CREDENTIALS)
        assert run["state_type"] == "COMPLETED", tail(worker_log)
    assert list((tmp / "data" / "reports").glob("*/report.md"))

    # The CLI against the same server and data: every stage comes from the deployment run's cache.
    cli = subprocess.run([sys.executable, "-m", "flows", "pipeline", "--source", str(tinyshakespeare_path),
                          "--data-dir", str(tmp / "data"), *[a for s in TINY_OVERRIDES for a in ("--set", s)]],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    runs = httpx.post(f"{api}/flow_runs/filter", timeout=5, auth=CREDENTIALS,
                      json={"flow_runs": {"id": {"not_any_": [run_id]}}}).json()
    (cli_run,) = [r for r in runs if r["state_type"] == "COMPLETED" and r["deployment_id"] is None]
    task_runs = httpx.post(f"{api}/task_runs/filter", timeout=5, auth=CREDENTIALS,
                           json={"flow_runs": {"id": {"any_": [cli_run["id"]]}}}).json()
    states = {t["name"].rsplit("-", 1)[0]: t["state_name"] for t in task_runs}
    # revalidate and register always run (the source is unchanged, the model already registered);
    # the stages are Cached.
    assert states.pop("revalidate") == states.pop("register") == "Completed" and set(states.values()) == {"Cached"}
    assert api_get(api, "/deployments/name/pipeline/pipeline-on-demand") is None  # still refused without auth
    print(f"\nauthenticated deployment run {run_id} and CLI run {cli_run['id']} completed; "
          f"params {json.dumps(params)[:80]}...")
