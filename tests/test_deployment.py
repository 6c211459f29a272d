"""Deployments: prefect.yaml and flows/serve.py describe the same two deployments of the pipeline,
and (slow) a real Prefect server + process worker runs the on-demand deployment to a report that
headless Chromium shows in the Prefect UI."""
from __future__ import annotations

import asyncio
import json
import re
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import yaml

from flows.params import PipelineParams
from flows.serve import PREFECT_YAML, deployments, entrypoint_flow
from prefect_server import (CHROMIUM, CHROMIUM_ARGS, POOL, REPO, api_get, deployed_with_worker, open_report_artifact,
                            prefect_server, report_artifact, report_sample_first_lines, require_chromium,
                            run_deployment, tail, TINY_OVERRIDES, wait_for_flow_run, wait_until)



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


SERVED_YAML = """
deployments:
  - name: every-keyword
    entrypoint: flows/pipeline.py:pipeline
    description: all the keys flows/serve.py maps
    parameters: {params: {preset: cpu}}
    tags: [nightly, cpu]
    version: "2026.12"
    paused: true
    enforce_parameter_schema: false
    concurrency_limit: {limit: 2, collision_strategy: CANCEL_NEW, grace_period_seconds: 120}
    schedules:
      - cron: "0 3 * * 1"
        timezone: Europe/Berlin
        day_or: false
        slug: weekly
      - interval: 5400
        anchor_date: "2026-01-01T00:30:00+00:00"
        active: false
        parameters: {params: {preset: cpu, retrain: auto}}
      - interval: PT2H
      - rrule: "RRULE:FREQ=MONTHLY;BYDAY=2FR"
        timezone: America/Chicago
    work_pool: {name: cortexcraft-pool}
"""


def test_serve_maps_every_schedule_kind_and_deployment_setting_of_prefect_yaml(tmp_path):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    (tmp_path / "prefect.yaml").write_text(SERVED_YAML)
    (deployment,) = deployments(tmp_path / "prefect.yaml")
    assert (deployment.tags, deployment.version, deployment.paused, deployment.enforce_parameter_schema) == \
        (["nightly", "cpu"], "2026.12", True, False)
    assert deployment.concurrency_limit == 2
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    assert deployment.concurrency_options.grace_period_seconds == 120
    cron, every_90_minutes, every_2_hours, rrule = deployment.schedules
    assert (cron.schedule.cron, cron.schedule.timezone, cron.schedule.day_or, cron.slug, cron.active) == \
        ("0 3 * * 1", "Europe/Berlin", False, "weekly", True)
    assert every_90_minutes.schedule.interval == timedelta(minutes=90) and every_90_minutes.active is False
    assert every_90_minutes.schedule.anchor_date == datetime(2026, 1, 1, 0, 30, tzinfo=timezone.utc)
    assert every_90_minutes.parameters == {"params": {"preset": "cpu", "retrain": "auto"}}
    assert every_2_hours.schedule.interval == timedelta(hours=2)
    assert rrule.schedule.rrule.endswith("\nRRULE:FREQ=MONTHLY;BYDAY=2FR")
    assert rrule.schedule.timezone == "America/Chicago"


@pytest.mark.parametrize("edit, named", [
    (lambda d: d.update(sla=[{"name": "slow", "severity": "high"}]), "'sla'"),
    (lambda d: d.update(schedule={"cron": "0 3 * * *"}), "'schedule'"),
    (lambda d: d["schedules"][0].update(replaces="daily"), "'schedules.replaces'"),
    (lambda d: d["schedules"][0].update(anchor_date="2026-01-01"), "'schedules.anchor_date'"),
    (lambda d: d["schedules"][1].update(cron="0 3 * * *"), "a schedule with cron and interval"),
    (lambda d: d["concurrency_limit"].update(collision_strategy="DROP"), "invalid concurrency_limit"),
])
def test_serve_refuses_a_prefect_yaml_key_it_would_otherwise_ignore_naming_it(tmp_path, edit, named):
    from cortexcraft.errors import CortexCraftError

    spec = yaml.safe_load(SERVED_YAML)
    edit(spec["deployments"][0])
    (tmp_path / "prefect.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(CortexCraftError, match=f"deployment 'every-keyword' .*{re.escape(named)}"):
        deployments(tmp_path / "prefect.yaml")


# --- a real server, deploy, worker, run, browser ---------------------------------------------------

@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tinyshakespeare_path):
    """A Prefect server with the prefect.yaml deployments, a process worker, and one finished run
    of pipeline-on-demand (tiny model, real Tiny Shakespeare). Everything is stopped afterwards."""
    tmp = tmp_path_factory.mktemp("deployment")
    server_log = tmp / "server.log"

    with prefect_server(tmp / "prefect-home", server_log) as env, deployed_with_worker(tmp, env) as worker_log:
        api = env["PREFECT_API_URL"]
        params = {"params": {"source": str(tinyshakespeare_path), "data_dir": str(tmp / "data"),
                             "overrides": TINY_OVERRIDES}}
        run = wait_for_flow_run(api, run_deployment(env, "pipeline/pipeline-on-demand", params), worker_log)
        yield {"api": api, "ui": api.removesuffix("/api"), "tmp": tmp, "run": run, "params": params["params"],
               "server_log": server_log, "worker_log": worker_log}


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
    require_chromium()
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
        open_report_artifact(page, deployed["ui"], run["id"], report)
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

