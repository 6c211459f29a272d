"""Bounded automatic re-runs of deployment runs whose process died.

A flow-run process killed by SIGKILL, the OOM killer or a lost machine cannot report anything: its
worker marks the run Crashed and calls the flow's ``on_crashed`` hooks. ``rerun_crashed`` then
schedules the same run again (what ``prefect flow-run retry`` does) while it has run at most
``crash_retries`` + 1 times; each attempt finds finished stages Cached and resumes training from
the last checkpoint. A crash the flow-run process reported itself (it saw a signal or an exception,
e.g. an operator stopping it) is left alone.

The re-run cannot be scheduled from inside the hook: a Prefect 3.8 process worker runs the hook in
a short-lived subprocess and, once it returns, reports the crash a second time, which would turn a
run the hook had just scheduled back into Crashed. So the hook starts a detached process
(``python -m flows.crashes``) that waits for the worker's own report, then schedules the run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.logging.loggers import flow_run_logger
from prefect.states import Scheduled
from pydantic import ValidationError

from flows.params import PipelineParams

_RUNNING_HERE: set[UUID] = set()
# How long the detached process waits for the worker's second crash report before it goes ahead
# (a worker that died after its hook ran never sends one).
WORKER_REPORT_SECONDS = 20.0


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
    message = f"automatic re-run {runs} of {allowed} after a crash: {state.message}"
    # Without the flow run's id in its environment it is not taken for an attempt of the run.
    env = {name: value for name, value in os.environ.items() if name != "PREFECT__FLOW_RUN_ID"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    subprocess.Popen([sys.executable, "-m", "flows.crashes", str(flow_run.id), str(state.id), message],
                     env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    logger.warning("flow run crashed (%s); scheduling automatic re-run %d of %d", state.message, runs, allowed)


def schedule_after_worker_report(flow_run_id: UUID, hook_state_id: UUID, message: str) -> None:
    """Schedule the run again once the worker's own crash report replaced the state the hook saw.

    Anything else that moves the run meanwhile (an operator's retry or cancel) wins: the run is
    scheduled only if it is still Crashed.
    """
    deadline = time.monotonic() + WORKER_REPORT_SECONDS
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(flow_run_id).state
            if state is None or not state.is_crashed():
                return
            if state.id != hook_state_id or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        client.set_flow_run_state(flow_run_id, Scheduled(message=message), force=True)


if __name__ == "__main__":
    schedule_after_worker_report(UUID(sys.argv[1]), UUID(sys.argv[2]), sys.argv[3])
