"""Crashes and retries through a real Prefect server and process worker (slow): a flow-run process
SIGKILLed during training leaves the run Crashed; `prefect flow-run retry`, the automatic re-run
(at most `crash_retries` times) and a new deployment run all resume from the last checkpoint and
end with weights bitwise equal to an uninterrupted run's. SIGTERM to the flow-run process saves a
checkpoint and ends the run Cancelled, never re-run by itself."""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from cortexcraft.checkpoint import list_checkpoints, read_checkpoint_state
from cortexcraft.fileio import read_json
from cortexcraft.train import train
from flows.params import PipelineParams
from prefect_server import (TERMINAL, api_get, deployed_with_worker, prefect, prefect_server, processes_with_env,
                            run_deployment, wait_until)
from tiny_runs import same_weights

pytestmark = pytest.mark.slow

OVERRIDES = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=8", "max_iters=240",
             "warmup_iters=0", "eval_interval=20", "eval_iters=2", "checkpoint_interval=10", "max_new_tokens=20",
             "device=cpu"]
STOP_SECONDS = 15


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash-retry")
    # The server's environment has OMP_NUM_THREADS=1, as the reference runs here: bitwise equality needs it.
    with prefect_server(tmp / "prefect-home", tmp / "server.log") as env, deployed_with_worker(tmp, env) as log:
        yield {"env": env, "api": env["PREFECT_API_URL"], "worker_log": log, "tmp": tmp}


def deployment_run(worker: dict, params: dict) -> str:
    return run_deployment(worker["env"], "pipeline/pipeline-on-demand", {"params": params})


def flow_run(worker: dict, run_id: str) -> dict | None:
    return api_get(worker["api"], f"/flow_runs/{run_id}")


def state_of(worker: dict, run_id: str) -> str | None:
    run = flow_run(worker, run_id)
    return run["state_type"] if run else None


def wait_for_state(worker: dict, run_id: str, states: set[str], timeout: float = 180) -> dict:
    return wait_until(f"flow run {run_id} to reach {states}",
                      lambda: (r := flow_run(worker, run_id)) and r["state_type"] in states and r,
                      timeout, worker["worker_log"])


def newest_step(data_dir: Path) -> int:
    steps = [int(p.name.split("_")[1]) for run in (data_dir / "runs").glob("*") for p in list_checkpoints(run)]
    return max(steps, default=0)


def signal_flow_run_process(run_id: str, past_step: int, data_dir: Path, signum: int, log: Path) -> int:
    """Wait until the run has checkpointed past ``past_step``, then signal its flow-run process."""
    wait_until(f"a checkpoint past step {past_step}", lambda: newest_step(data_dir) > past_step, 240, log, 0.2)
    (pid,) = wait_until("the flow-run process", lambda: processes_with_env("PREFECT__FLOW_RUN_ID", run_id), 30)
    os.kill(pid, signum)
    return pid


def reference_run(params: dict, record_dir: Path, tmp: Path) -> dict:
    """The same training, uninterrupted, in this process (on the pipeline's own shards)."""
    config = PipelineParams(**params).run_config()
    (shards,) = (record_dir / "shards").glob("*")
    return train(config, shards, tmp / "uninterrupted", progress=False)


def run_summary(data_dir: Path) -> dict:
    (run,) = (data_dir / "runs").glob("*")
    return read_json(run / "summary.json")


def assert_resumed_bitwise(worker: dict, run_id: str, params: dict, resumed_from: int, tmp: Path) -> None:
    """The run completes, having resumed at ``resumed_from``, with the uninterrupted run's weights."""
    done = wait_for_state(worker, run_id, TERMINAL)
    assert done["state_type"] == "COMPLETED", done["state"]
    data_dir = Path(params["data_dir"])
    summary = run_summary(data_dir)
    assert summary["resumed_from_step"] == resumed_from and summary["steps"] == 240
    reference = reference_run(params, data_dir, tmp)
    assert same_weights(Path(summary["checkpoint_last"]), Path(reference["checkpoint_last"]))


def params_for(tinyshakespeare_path: Path, data_dir: Path, **extra) -> dict:
    return {"source": str(tinyshakespeare_path), "data_dir": str(data_dir), "overrides": OVERRIDES, **extra}


def test_a_sigkilled_run_is_crashed_and_flow_run_retry_resumes_it_bitwise(
    worker, tmp_path, tinyshakespeare_path, one_thread
):
    data_dir = tmp_path / "data"
    params = params_for(tinyshakespeare_path, data_dir, crash_retries=0)
    run_id = deployment_run(worker, params)
    signal_flow_run_process(run_id, 20, data_dir, signal.SIGKILL, worker["worker_log"])
    crashed = wait_for_state(worker, run_id, TERMINAL)
    assert crashed["state_type"] == "CRASHED", crashed["state"]
    killed_at = newest_step(data_dir)
    time.sleep(5)  # crash_retries=0: nothing may re-run it
    assert state_of(worker, run_id) == "CRASHED"

    prefect(worker["env"], "flow-run", "retry", run_id)
    assert_resumed_bitwise(worker, run_id, params, killed_at, tmp_path)
    print(f"\nSIGKILLed at checkpoint step {killed_at}; `prefect flow-run retry` resumed it to 240, bitwise equal")


def test_crashed_runs_rerun_automatically_at_most_crash_retries_times_then_a_new_run_resumes(
    worker, tmp_path, tinyshakespeare_path, one_thread
):
    data_dir = tmp_path / "data"
    params = params_for(tinyshakespeare_path, data_dir, crash_retries=1)
    run_id = deployment_run(worker, params)
    first = signal_flow_run_process(run_id, 20, data_dir, signal.SIGKILL, worker["worker_log"])
    first_kill_step = newest_step(data_dir)
    # The on_crashed hook schedules the run again; the worker starts a new attempt that resumes.
    wait_until(
        "the automatic re-run",
        lambda: [p for p in processes_with_env("PREFECT__FLOW_RUN_ID", run_id) if p != first],
        180,
        worker["worker_log"],
    )
    signal_flow_run_process(run_id, first_kill_step, data_dir, signal.SIGKILL, worker["worker_log"])
    crashed = wait_for_state(worker, run_id, {"CRASHED"})
    time.sleep(8)  # a third attempt would be scheduled by now
    crashed = flow_run(worker, run_id)
    assert crashed["state_type"] == "CRASHED" and crashed["run_count"] == 2, crashed["state"]
    second_kill_step = newest_step(data_dir)
    assert second_kill_step > first_kill_step

    assert_resumed_bitwise(worker, deployment_run(worker, params), params, second_kill_step, tmp_path)
    print(
        f"\nkilled at steps {first_kill_step} and {second_kill_step}: one automatic re-run, then left Crashed; "
        f"a new deployment run resumed it to 240, bitwise equal"
    )


def test_sigterm_to_the_flow_run_process_checkpoints_and_cancels_the_run(worker, tmp_path, tinyshakespeare_path):
    data_dir = tmp_path / "data"
    params = params_for(tinyshakespeare_path, data_dir)
    run_id = deployment_run(worker, params)
    pid = signal_flow_run_process(run_id, 20, data_dir, signal.SIGTERM, worker["worker_log"])
    t0 = time.monotonic()
    wait_until(
        "the flow-run process to exit",
        lambda: pid not in processes_with_env("PREFECT__FLOW_RUN_ID", run_id),
        60,
        worker["worker_log"],
        0.1,
    )
    took = time.monotonic() - t0
    cancelled = wait_for_state(worker, run_id, TERMINAL)
    assert cancelled["state_type"] == "CANCELLED", cancelled["state"]
    match = re.match(r"training stopped by SIGTERM at step (\d+); checkpoint (\S+);", cancelled["state"]["message"])
    step, checkpoint = int(match.group(1)), Path(match.group(2))
    assert read_checkpoint_state(checkpoint)["step"] == step == newest_step(data_dir)
    print(f"\nworker's flow-run process stopped {took:.2f} s after SIGTERM, checkpoint at step {step}")
    assert took < STOP_SECONDS
    time.sleep(5)  # an operator's stop is not re-run automatically
    assert state_of(worker, run_id) == "CANCELLED"

    prefect(worker["env"], "flow-run", "retry", run_id)
    done = wait_for_state(worker, run_id, TERMINAL)
    assert done["state_type"] == "COMPLETED", done["state"]
    assert run_summary(data_dir)["resumed_from_step"] == step
