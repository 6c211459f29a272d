"""Serve the pipeline deployments from this process: no work pool or worker needed.

    python -m flows.serve

Serves the deployments defined in prefect.yaml (same names, parameters, schedules, concurrency
limits and triggers), read from that file so the two ways of deploying cannot drift apart. Runs,
scheduled or started with `prefect deployment run`, execute while this process lives; stopping it
pauses the deployments' schedules. Relative paths (the default data_dir "data") resolve against
the directory this is started in: start it from the repository root.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow, serve
from prefect.events import DeploymentTriggerTypes
from pydantic import TypeAdapter
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"


def entrypoint_flow(entrypoint: str) -> Flow:
    """The flow named by a prefect.yaml entrypoint ``flows/pipeline.py:pipeline``, imported as a
    module of this package (not re-executed from its file path)."""
    path, _, name = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def deployment_trigger(deployment: str, number: int, spec: dict[str, Any]):
    """A prefect.yaml trigger as the object `prefect deploy` makes of it (same default name)."""
    return TypeAdapter(DeploymentTriggerTypes).validate_python({"name": f"{deployment}__automation_{number}", **spec})


def deployments(prefect_yaml: Path = PREFECT_YAML) -> list[RunnerDeployment]:
    spec: dict[str, Any] = yaml.safe_load(prefect_yaml.read_text())
    return [
        entrypoint_flow(d["entrypoint"]).to_deployment(
            name=d["name"],
            description=d.get("description"),
            parameters=d.get("parameters"),
            schedules=[Cron(s["cron"], timezone=s.get("timezone")) for s in d.get("schedules") or []],
            concurrency_limit=d.get("concurrency_limit"),
            triggers=[deployment_trigger(d["name"], i, spec) for i, spec in enumerate(d.get("triggers") or [], start=1)],
        )
        for d in spec["deployments"]
    ]


if __name__ == "__main__":
    serve(*deployments())
