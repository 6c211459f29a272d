"""Deployments: prefect.yaml and flows/serve.py describe the same two deployments of the pipeline,
and (slow) a real Prefect server + process worker runs the on-demand deployment to a report that
headless Chromium shows in the Prefect UI."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import yaml

from flows.params import PipelineParams
from flows.serve import PREFECT_YAML, deployments, entrypoint_flow

REPO = Path(__file__).resolve().parent.parent
POOL = "cortexcraft-pool"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TINY_OVERRIDES = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=8", "max_iters=20",
                  "warmup_iters=0", "eval_interval=10", "eval_iters=2", "checkpoint_interval=10",
                  "max_new_tokens=40"]


def yaml_deployments() -> dict[str, dict]:
    spec = yaml.safe_load(PREFECT_YAML.read_text())
    return {d["name"]: d for d in spec["deployments"]}


def test_prefect_yaml_deploys_the_pipeline_flow_with_valid_parameters():
    specs = yaml_deployments()
    assert set(specs) == {"pipeline-on-demand", "retrain-nightly", "champion-card"}
    for spec in specs.values():
        path, _, _ = spec["entrypoint"].partition(":")
        assert (REPO / path).is_file()
        assert spec["work_pool"]["name"] == POOL
    for name in ("pipeline-on-demand", "retrain-nightly"):
        assert entrypoint_flow(specs[name]["entrypoint"]).name == "pipeline"
        PipelineParams(**specs[name]["parameters"]["params"])


def test_nightly_retraining_runs_daily_with_the_auto_policy():
    from prefect.server.schemas.schedules import CronSchedule

    spec = yaml_deployments()["retrain-nightly"]
    (schedule,) = spec["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    start = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    dates = asyncio.run(cron.get_dates(3, start=start))
    assert [(d.day, d.hour, d.minute) for d in dates] == [(2, 3, 0), (3, 3, 0), (4, 3, 0)]
    params = PipelineParams(**spec["parameters"]["params"])
    assert params.retrain == "auto" and params.retrain_iters > 0


def test_promotion_automation_fires_on_promotions_only():
    import uuid

    from prefect.events import DeploymentEventTrigger
    from prefect.server.events.schemas.automations import EventTrigger
    from prefect.server.events.schemas.events import ReceivedEvent

    spec = yaml_deployments()["champion-card"]
    assert entrypoint_flow(spec["entrypoint"]).name == "champion-card"
    (trigger,) = [d for d in deployments() if d.name == "champion-card"][0].triggers
    assert isinstance(trigger, DeploymentEventTrigger)
    # Evaluated as the server evaluates it (the slow three-night test sees it run for real).
    server_side = EventTrigger.model_validate(trigger.trigger_type(**trigger.model_dump()).model_dump())
    def event(name, resource="cortexcraft.model.cpu"):
        return ReceivedEvent(id=uuid.uuid4(), occurred=datetime.now(timezone.utc), event=name,
                             resource={"prefect.resource.id": resource}, payload={"version": "v2"})

    assert server_side.covers(event("cortexcraft.model.promoted"))
    assert not server_side.covers(event("cortexcraft.model.rejected"))
    assert not server_side.covers(event("cortexcraft.model.promoted", resource="prefect.flow-run.x"))
    assert set(trigger.parameters) == {"model", "version", "data_dir"}


def test_serve_offers_the_same_deployments_as_prefect_yaml():
    specs = yaml_deployments()
    served = {d.name: d for d in deployments()}
    assert set(served) == set(specs)
    for name, spec in specs.items():
        deployment = served[name]
        assert deployment.parameters == spec.get("parameters", {})
        assert deployment.concurrency_limit == spec.get("concurrency_limit")
        crons = [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules or []]
        assert crons == [(s["cron"], s["timezone"]) for s in spec.get("schedules", [])]
        assert [(t.expect, t.parameters) for t in deployment.triggers] == [
            (set(t["expect"]), t["parameters"]) for t in spec.get("triggers", [])]


# --- a real server, deploy, worker, run, browser ---------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # A session of its own, so stopping it also stops whatever it spawned.
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen, terms: int = 1) -> None:
    """SIGTERM the process group ``terms`` times (a process worker exits on the second), then
    SIGKILL whatever is left of the group."""
    for _ in range(terms):
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def prefect(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def isolated_prefect_env(home: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_API_HOST="127.0.0.1",
        # The port setting, not `server start --port`: the latter leaves the UI calling port 4200.
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # The worker polls every 10 s by default; the run would mostly wait.
        PREFECT_WORKER_QUERY_SECONDS="1",
    )
    return env


def wait_until(what: str, check, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail(log) if log else ''}")


def api_get(api: str, path: str):
    try:
        response = httpx.get(api + path, timeout=5)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tinyshakespeare_path):
    """A Prefect server with the prefect.yaml deployments, a process worker, and one finished run
    of pipeline-on-demand (tiny model, real Tiny Shakespeare). Everything is stopped afterwards."""
    tmp = tmp_path_factory.mktemp("deployment")
    port = free_port()
    env = isolated_prefect_env(tmp / "prefect-home", port)
    api = f"http://127.0.0.1:{port}/api"
    server_log, worker_log = tmp / "server.log", tmp / "worker.log"

    with ExitStack() as cleanup:
        server = start([sys.executable, "-m", "prefect", "server", "start"], env, server_log)
        cleanup.callback(stop, server)
        wait_until("the Prefect server", lambda: server.poll() is None and api_get(api, "/health"), 90, server_log)
        assert server.poll() is None, tail(server_log)

        prefect(env, "work-pool", "create", POOL, "--type", "process")
        prefect(env, "--no-prompt", "deploy", "--all")
        worker = start([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL], env, worker_log)
        cleanup.callback(stop, worker, 2)

        params = {"params": {"source": str(tinyshakespeare_path), "data_dir": str(tmp / "data"),
                             "overrides": TINY_OVERRIDES}}
        out = prefect(env, "deployment", "run", "pipeline/pipeline-on-demand", "--params", json.dumps(params))
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)

        def finished():
            run = api_get(api, f"/flow_runs/{run_id}")
            return run if run and run["state_type"] in TERMINAL else None

        run = wait_until("the flow run to finish", finished, 150, worker_log)
        yield {"api": api, "ui": f"http://127.0.0.1:{port}", "tmp": tmp, "run": run, "params": params["params"],
               "server_log": server_log, "worker_log": worker_log}


def report_artifact(api: str, run_id: str) -> dict:
    response = httpx.post(f"{api}/artifacts/filter", timeout=5,
                          json={"artifacts": {"flow_run_id": {"any_": [run_id]}, "type": {"any_": ["markdown"]}}})
    (report,) = [a for a in response.json() if a["key"].startswith("report-")]
    return report


@pytest.mark.slow
def test_on_demand_deployment_runs_on_a_process_worker_in_the_clone(deployed):
    api, run = deployed["api"], deployed["run"]
    assert run["state_type"] == "COMPLETED", tail(deployed["worker_log"])
    deployment = api_get(api, "/deployments/name/pipeline/pipeline-on-demand")
    assert run["deployment_id"] == deployment["id"]
    # The pull step points at the clone `prefect deploy` ran in, not a path fixed in prefect.yaml.
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert list((deployed["tmp"] / "data" / "reports").glob("*/report.md"))
    assert "data:image/" in report_artifact(api, run["id"])["data"]


@pytest.mark.slow
def test_server_schedules_nightly_runs_that_retrain_with_the_auto_policy(deployed):
    api = deployed["api"]
    nightly = api_get(api, "/deployments/name/pipeline/retrain-nightly")
    spec = yaml_deployments()["retrain-nightly"]
    assert nightly["schedules"][0]["schedule"]["cron"] == spec["schedules"][0]["cron"]
    assert nightly["parameters"] == spec["parameters"]

    def scheduled_retraining():
        response = httpx.post(f"{api}/flow_runs/filter", timeout=5, json={"flow_runs": {
            "deployment_id": {"any_": [nightly["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}})
        return response.json()

    upcoming = wait_until("scheduled runs of retrain-nightly", scheduled_retraining, 90, deployed["server_log"])
    for scheduled in upcoming:
        start_time = datetime.fromisoformat(scheduled["expected_start_time"].replace("Z", "+00:00"))
        assert (start_time.hour, start_time.minute, start_time.utcoffset()) == (3, 0, timedelta(0))
        assert scheduled["parameters"]["params"]["retrain"] == "auto"


@pytest.mark.slow
def test_report_with_samples_and_loss_curve_shows_in_the_prefect_ui(deployed):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found; install Debian's chromium (apt-get install chromium) for the UI test")
    from playwright.sync_api import sync_playwright

    run = deployed["run"]
    assert run["state_type"] == "COMPLETED", tail(deployed["worker_log"])
    report = report_artifact(deployed["api"], run["id"])
    prompts = PipelineParams(**deployed["params"]).run_config().sample.prompts
    sample_lines = report_sample_first_lines(report["data"])
    assert len(sample_lines) == len(prompts)
    screenshot = deployed["tmp"] / "report.png"

    with sync_playwright() as p:
        # Leaving sync_playwright closes the browser, also when a check fails.
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{deployed['ui']}/runs/flow-run/{run['id']}")
        page.get_by_text("Artifacts", exact=True).last.click()
        page.wait_for_url("**tab=Artifacts**")
        page.get_by_text(report["key"], exact=True).click()
        page.wait_for_url(f"**/artifacts/artifact/{report['id']}")
        image = page.locator('img[src^="data:image/"]')
        image.wait_for(state="visible")
        width, height = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        text = page.inner_text("body")
        page.screenshot(path=str(screenshot), full_page=True)

    assert width > 0 and height > 0
    for heading in ("CortexCraft run report", "Loss curve", "Samples"):
        assert heading in text
    for prompt in prompts:
        assert json.dumps(prompt) in text
    for line in sample_lines:
        assert line in text
    print(f"\nUI report {report['key']}: loss-curve image {width}x{height}; "
          f"first sample lines {sample_lines}; screenshot {screenshot}")


def report_sample_first_lines(markdown: str) -> list[str]:
    """The first non-blank line of each generated sample in the report's markdown."""
    samples = re.findall(r"\*\*Prompt\*\* `.*?`\s*\n\s*\n(`{3,})[^\n]*\n(.*?)\n\1", markdown, re.S)
    return [next((l.strip() for l in body.splitlines() if l.strip()), "") for _, body in samples]
