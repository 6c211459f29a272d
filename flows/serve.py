"""Serve the pipeline deployments from this process: no work pool or worker needed.

    python -m flows.serve

Serves the deployments defined in prefect.yaml (same names, parameters, schedules, concurrency
limits, triggers, tags and versions), read from that file so the two ways of deploying cannot drift
apart: a key it cannot serve stops it with an error naming the key, never silently. Runs,
scheduled or started with `prefect deployment run`, execute while this process lives; stopping it
pauses the deployments' schedules. Relative paths (the default data_dir "data") resolve against
the directory this is started in: start it from the repository root.
"""
from __future__ import annotations

import importlib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow, serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentTriggerTypes
from prefect.schedules import Cron, Interval, RRule, Schedule
from pydantic import TypeAdapter, ValidationError

from cortexcraft.errors import CortexCraftError

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


# prefect.yaml deployment keys that to_deployment takes as they are, and those made into objects here.
PASSED_KEYS = {"name", "description", "parameters", "tags", "version", "version_type", "paused",
               "enforce_parameter_schema"}
BUILT_KEYS = {"entrypoint", "schedules", "concurrency_limit", "triggers"}
# Keys only `prefect deploy` uses: a serving process is its own worker and runs from this checkout.
DEPLOY_ONLY_KEYS = {"work_pool", "build", "push", "pull"}
SCHEDULE_KINDS = {"cron": Cron, "interval": Interval, "rrule": RRule}
SCHEDULE_OPTIONS = {"cron": {"timezone", "day_or"}, "interval": {"timezone", "anchor_date"}, "rrule": {"timezone"}}


def _unserved(deployment: str, key: str) -> CortexCraftError:
    return CortexCraftError(f"prefect.yaml deployment {deployment!r} sets {key!r}, which flows/serve.py cannot serve; "
                            f"remove it or deploy with `prefect deploy` and a worker")


def schedule(deployment: str, spec: dict[str, Any]) -> Schedule:
    """A prefect.yaml schedule (cron, interval in seconds or ISO 8601, or rrule, with its options,
    ``active``, ``parameters`` and ``slug``) as the Schedule `prefect deploy` would make of it."""
    kinds = [k for k in SCHEDULE_KINDS if k in spec]
    if len(kinds) != 1:
        raise CortexCraftError(f"prefect.yaml deployment {deployment!r} has a schedule with "
                               f"{' and '.join(kinds) or 'none'} of cron, interval, rrule; give exactly one")
    kind = kinds[0]
    options = {k: v for k, v in spec.items() if k != kind}
    unknown = set(options) - SCHEDULE_OPTIONS[kind] - {"active", "parameters", "slug"}
    if unknown:
        raise _unserved(deployment, f"schedules.{min(unknown)}")
    try:
        value = TypeAdapter(timedelta).validate_python(spec[kind]) if kind == "interval" else spec[kind]
        if "anchor_date" in options:
            options["anchor_date"] = TypeAdapter(datetime).validate_python(options["anchor_date"])
        return SCHEDULE_KINDS[kind](value, **options)
    except (ValidationError, ValueError, TypeError) as exc:
        raise CortexCraftError(f"prefect.yaml deployment {deployment!r} has an invalid {kind} schedule "
                               f"({str(exc).splitlines()[0]}); fix it in prefect.yaml") from None


def concurrency_limit(deployment: str, spec: int | dict[str, Any] | None) -> int | ConcurrencyLimitConfig | None:
    """An int, or ``{limit, collision_strategy: ENQUEUE | CANCEL_NEW, grace_period_seconds}``."""
    if not isinstance(spec, dict):
        return spec
    try:
        return ConcurrencyLimitConfig.model_validate(spec)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(map(str, error["loc"]))
        raise CortexCraftError(f"prefect.yaml deployment {deployment!r} has an invalid concurrency_limit "
                               f"({where}: {error['msg']}); fix it in prefect.yaml") from None


def runner_deployment(d: dict[str, Any]) -> RunnerDeployment:
    """One prefect.yaml deployment to serve; a key it cannot serve is an error naming it."""
    name = d.get("name", "?")
    unknown = set(d) - PASSED_KEYS - BUILT_KEYS - DEPLOY_ONLY_KEYS
    if unknown:
        raise _unserved(name, min(unknown))
    return entrypoint_flow(d["entrypoint"]).to_deployment(
        **{key: d[key] for key in PASSED_KEYS & set(d)},
        schedules=[schedule(name, s) for s in d.get("schedules") or []],
        concurrency_limit=concurrency_limit(name, d.get("concurrency_limit")),
        triggers=[deployment_trigger(name, i, spec) for i, spec in enumerate(d.get("triggers") or [], start=1)],
    )


def deployments(prefect_yaml: Path = PREFECT_YAML) -> list[RunnerDeployment]:
    return [runner_deployment(d) for d in yaml.safe_load(prefect_yaml.read_text())["deployments"]]


if __name__ == "__main__":
    try:
        served = deployments()
    except CortexCraftError as exc:
        raise SystemExit(f"flows.serve: error: {exc}") from None
    serve(*served)
