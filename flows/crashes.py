"""Bounded automatic re-runs of deployment runs whose process died.

A flow-run process killed by SIGKILL, the OOM killer or a lost machine cannot report anything: its
worker marks the run Crashed and calls the flow's ``on_crashed`` hooks. ``rerun_crashed`` then
schedules the same run again (what ``prefect flow-run retry`` does) while it has run at most
``crash_retries`` + 1 times; each attempt finds finished stages Cached and resumes training from
the last checkpoint. A crash the flow-run process reported itself (it saw a signal or an exception,
e.g. an operator stopping it) is left alone.
"""
from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.logging.loggers import flow_run_logger
from prefect.states import Scheduled
from pydantic import ValidationError

from flows.params import PipelineParams

_RUNNING_HERE: set[UUID] = set()


def note_running_here() -> None:
    """Call at the start of a flow: its crash hooks in this process then know it did not die."""
    _RUNNING_HERE.add(FlowRunContext.get().flow_run.id)


def rerun_crashed(flow: Any, flow_run: Any, state: Any) -> None:
    """``on_crashed`` hook: schedule a crashed deployment run again, at most ``crash_retries`` times."""
    logger = flow_run_logger(flow_run)
    if flow_run.id in _RUNNING_HERE or flow_run.deployment_id is None:
        return
    try:
        allowed = PipelineParams.model_validate(flow_run.parameters.get("params") or {}).crash_retries
    except ValidationError:
        return
    with get_client(sync_client=True) as client:
        runs = client.read_flow_run(flow_run.id).run_count
        if runs > allowed:
            logger.warning("flow run crashed (%s) after %d attempts; not re-running it (crash_retries=%d)",
                           state.message, runs, allowed)
            return
        client.set_flow_run_state(flow_run.id, Scheduled(
            message=f"automatic re-run {runs} of {allowed} after a crash: {state.message}"), force=True)
    logger.warning("flow run crashed (%s); scheduled automatic re-run %d of %d", state.message, runs, allowed)
